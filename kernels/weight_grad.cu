// weight_grad.cu: full fine-tuning's gradients of the weights themselves (biases, norm gains, the
// embedding table) and the forward's copy of the f32 master weights. (The gradient of a linear
// weight, dyᵀ x, is one cuBLAS GEMM: src/backend/cuda/weight_grad.rs.)
// defines: colsum_bias_{bf16,f32}, colsum_norm_{bf16,f32}, colsum_finish_f32,
//          embedding_bwd_{bf16,f32}, params_to_act_{bf16,f32}
//
// Math (activations T, arithmetic and gradients f32; every gradient accumulates, +=):
//   bias_bwd         db[j] += Σ_i dy[i, j]
//   norm_weight_bwd  dw[j] += Σ_i dnormed[i, j] · (x[i, j] · rstd[i])   (x · rstd rounded to f32
//                    as the forward forms it, then one fused multiply-add per row)
//   embedding_bwd    dtable[id, j] += dx[i, j] for every row i with ids[i] = id
//   params_to_act    dst[i] = T(src[i] + add)   (the sum in f32, then rounded to nearest even)
//
// Column sums (bias_bwd, norm_weight_bwd), two passes, no atomics, so the result is bit-identical
// on repeat and on any GPU:
//   pass 1 colsum_<term>: grid (column tiles, row chunks), a thread per column, threads along
//          the row (a warp reads 32 consecutive elements of one row: coalesced); each thread sums
//          its column over the chunk's rows in order and writes partial[chunk, j].
//   pass 2 colsum_finish_f32: a thread per column adds partial[0..chunks, j] in chunk order, then
//          adds that sum to the gradient.
// The host picks rows per chunk from n alone (at least 64, at most 128 chunks), so the order of
// the sum does not depend on the GPU.
//
// Embedding: the host turns the token ids into a CSR (each distinct id once, and its rows in
// increasing order); one block per distinct id, threads over the row's d elements, each thread
// starting from the table's value and adding the rows in order, as the CPU reference does (so the
// result equals the CPU's bit for bit). Distinct ids write distinct table rows: no conflicts.

#include "common.cuh"

// ---- column sums ------------------------------------------------------------------------
// The term of row i, column j, at flat index at = i·d + j.
template <typename T> struct BiasTerm {
    static __device__ __forceinline__ float add(float acc, const T* a, const T*, const float*,
                                                long long at, int) {
        return acc + to_f32(a[at]);
    }
};

template <typename T> struct NormTerm {
    static __device__ __forceinline__ float add(float acc, const T* dn, const T* x,
                                                const float* rstd, long long at, int i) {
        const float normed = to_f32(x[at]) * rstd[i];  // the forward's x · rstd, in f32
        return fmaf(to_f32(dn[at]), normed, acc);
    }
};

// partial[blockIdx.y, j] = Σ over rows [r0, min(n, r0 + rows_per_chunk)) of Term, r0 =
// blockIdx.y · rows_per_chunk; j = blockIdx.x · blockDim.x + threadIdx.x < d.
template <typename T, typename Term>
__device__ __forceinline__ void colsum_partial(float* __restrict__ partial,
                                               const T* __restrict__ a, const T* __restrict__ x,
                                               const float* __restrict__ rstd, int n, int d,
                                               int rows_per_chunk) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = min(n, r0 + rows_per_chunk);
    float acc = 0.0f;
    for (int i = r0; i < r1; i++) acc = Term::add(acc, a, x, rstd, (long long)i * d + j, i);
    partial[(long long)blockIdx.y * d + j] = acc;
}

// out[j] += Σ_c partial[c, j], c = 0 .. chunks - 1 in order; grid-stride over the d columns.
extern "C" __global__ void colsum_finish_f32(float* __restrict__ out,
                                             const float* __restrict__ partial, int chunks,
                                             int d) {
    const int stride = gridDim.x * blockDim.x;
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < d; j += stride) {
        float s = 0.0f;
        for (int c = 0; c < chunks; c++) s += partial[(long long)c * d + j];
        out[j] += s;
    }
}

// ---- embedding --------------------------------------------------------------------------
// csr (i32): rows[n] (token rows grouped by id, increasing within an id) | starts[u + 1] (the
// first entry in rows of each distinct id, then n) | ids[u] (the distinct ids). table points at
// the gradient's slice (the host adds the offset); grid.x = u.
template <typename T>
__device__ __forceinline__ void embedding_bwd(float* __restrict__ table, const T* __restrict__ dx,
                                              const int* __restrict__ csr, int n, int u, int d) {
    const int* rows = csr;
    const int* starts = csr + n;
    const int* ids = csr + n + u + 1;
    const int b = blockIdx.x;
    const int s = starts[b], e = starts[b + 1];
    float* dst = table + (long long)ids[b] * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float acc = dst[j];
        for (int k = s; k < e; k++) acc += to_f32(dx[(long long)rows[k] * d + j]);
        dst[j] = acc;
    }
}

// ---- master weights -> the forward's copy -------------------------------------------------
// src points at the master slice (the host adds the offset: no alignment to vectorise on), one
// element per thread, grid-stride.
template <typename T>
__device__ __forceinline__ void params_to_act(T* __restrict__ dst, const float* __restrict__ src,
                                              float add, long long len) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride)
        dst[i] = from_f32<T>(src[i] + add);
}

#define WEIGHT_GRAD_ENTRY(T, SUF)                                                             \
    extern "C" __global__ void colsum_bias_##SUF(float* partial, const T* dy, int n, int d,   \
                                                 int rows_per_chunk) {                        \
        colsum_partial<T, BiasTerm<T>>(partial, dy, nullptr, nullptr, n, d, rows_per_chunk);  \
    }                                                                                         \
    extern "C" __global__ void colsum_norm_##SUF(float* partial, const T* dnormed, const T* x, \
                                                 const float* rstd, int n, int d,             \
                                                 int rows_per_chunk) {                        \
        colsum_partial<T, NormTerm<T>>(partial, dnormed, x, rstd, n, d, rows_per_chunk);      \
    }                                                                                         \
    extern "C" __global__ void embedding_bwd_##SUF(float* table, const T* dx, const int* csr, \
                                                   int n, int u, int d) {                     \
        embedding_bwd<T>(table, dx, csr, n, u, d);                                            \
    }                                                                                         \
    extern "C" __global__ void params_to_act_##SUF(T* dst, const float* src, float add,       \
                                                   long long len) {                           \
        params_to_act<T>(dst, src, add, len);                                                 \
    }

WEIGHT_GRAD_ENTRY(bf16, bf16)
WEIGHT_GRAD_ENTRY(float, f32)
