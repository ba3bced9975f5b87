// ptx.cuh: the inline-PTX wrappers of the attention kernels, one small function per
// instruction, and nothing else. Every `asm` of the kernels lives here, so that the CPU emulation
// (tests/cuda_emulated) can build the kernels with its own ptx.cuh, which defines C++ stand-ins
// under the same names (tests/cuda_emulated/ptx_emu.hpp).
// defines: attn_exp2, attn_pack_bf16x2, attn_cp_async16, attn_cp_async_commit,
//          attn_cp_async_wait<N>, attn_ldsm_x4, attn_ldsm_x4_trans, attn_mma, attn_dynamic_smem

#pragma once

#include "common.cuh"

// 2^x with the hardware approximation (rel. error ~2^-22); ex2(-inf) = 0.
__device__ __forceinline__ float attn_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Two floats to a bf16 pair (round to nearest even): `lo` in bits 0..15, `hi` in 16..31.
__device__ __forceinline__ u32 attn_pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// 16-byte global -> shared copy; when `pred` is false nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void attn_cp_async16(u32 dst, const void* src, bool pred) {
    const int n = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n)
                 : "memory");
}

__device__ __forceinline__ void attn_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Wait until at most N committed groups of this thread are still in flight.
template <int N> __device__ __forceinline__ void attn_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void attn_ldsm_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void attn_ldsm_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// c += a · [b0 b1]  (m16n8k16, bf16 inputs, f32 accumulators)
__device__ __forceinline__ void attn_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Bytes of dynamic shared memory this launch was given.
__device__ __forceinline__ u32 attn_dynamic_smem() {
    u32 r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}
