// attention.cuh: what the training kernels (attention.cu) and the decoding kernels
// (attention_decode.cu) share: block size, math constants, the inline-PTX wrappers (ptx.cuh),
// the shared-memory address helper and the dynamic shared memory array.

#pragma once

#include "common.cuh"
#include "ptx.cuh"

#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_LN2 0.6931471805599453f
// Largest head_dim the generic kernels accept (8 accumulators per lane).
#define ATTN_GEN_MAXD 256
#define ATTN_GEN_PER_LANE (ATTN_GEN_MAXD / 32)
// Warps (and rows) per CTA of every kernel.
#define ATTN_WARPS 4
#define ATTN_THREADS (ATTN_WARPS * 32)

// The 32-bit shared-memory address of a generic pointer into shared memory (the operand form
// ldmatrix and cp.async take).
__device__ __forceinline__ u32 attn_smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

extern __shared__ __align__(16) unsigned char attn_smem[];
