// norm.cu: the residual stream step with concept ablation, fused with the next rmsnorm.
// defines: resid_ablate_norm_fwd_{bf16,f32}, resid_ablate_norm_bwd_{bf16,f32}
//
// Math, per token row (d elements; Q: [k, d] f32 with orthonormal rows, k may be 0):
//   forward   s = a + b                    (b absent: s = a; the first layer's plain rmsnorm)
//             c_j = <Q_j, s>,  s <- s - Σ_j c_j Q_j       (s <- (I - QᵀQ) s)
//             resid = s;  rstd = 1 / sqrt(mean(s²) + eps);  normed = s · rstd · w
//   backward  g = dnormed · w
//             t = dresid + rstd · (g - s · rstd² · <g, s> / d)   (rmsnorm backward + skip path)
//             dresid <- t - Σ_j <Q_j, t> Q_j                        (the same projection)
// Storage T (bf16 or f32), all arithmetic in f32. In bf16 the statistics are taken from the
// rounded residual, the value the backward later reads, so forward and backward agree.
//
// Memory plan: one block per row (up to 256 threads; each thread owns the vector chunks
// c = tid, tid + blockDim, ... of N = 16 B worth of elements). The f32 row s lives in dynamic
// shared memory (d floats, then the k coefficients), so a, b, dnormed, resid are read from
// global memory once and resid / normed written once, 16 B per access. The k dot products
// are formed 8 directions at a time (8 register accumulators per thread, reduced over the
// block in a fixed order), reading Q through the read-only cache: Q is k·d·4 bytes, shared by
// every row, so it stays resident in L2. Without directions the shared row is still used
// (it saves re-reading a and b) and the Q passes are skipped.
//
// Determinism: every sum has a fixed order (per-thread chunk order, butterfly within warps,
// warps in index order). No atomics.

#include "common.cuh"

#define NORM_MAX_THREADS 256
#define DIR_GROUP 8

// Load / store N consecutive elements as floats: one 16-byte access when N fills a Vec<T>.
template <typename T, int N> __device__ __forceinline__ void load_n(const T* p, float* f) {
    if constexpr (N == Vec<T>::N) {
        Vec<T> v = load_vec(p);
#pragma unroll
        for (int e = 0; e < N; e++) f[e] = to_f32(v.v[e]);
    } else {
#pragma unroll
        for (int e = 0; e < N; e++) f[e] = to_f32(p[e]);
    }
}

template <typename T, int N> __device__ __forceinline__ void store_n(T* p, const float* f) {
    if constexpr (N == Vec<T>::N) {
        Vec<T> v;
#pragma unroll
        for (int e = 0; e < N; e++) v.v[e] = from_f32<T>(f[e]);
        store_vec(p, v);
    } else {
#pragma unroll
        for (int e = 0; e < N; e++) p[e] = from_f32<T>(f[e]);
    }
}

// N consecutive floats of Q (read-only path; float4 when N is a multiple of 4, in which case
// d is too and the address is 16-byte aligned).
template <int N> __device__ __forceinline__ void load_q(const float* p, float* f) {
    if constexpr (N % 4 == 0) {
#pragma unroll
        for (int e = 0; e < N; e += 4) {
            float4 x = __ldg(reinterpret_cast<const float4*>(p + e));
            f[e] = x.x;
            f[e + 1] = x.y;
            f[e + 2] = x.z;
            f[e + 3] = x.w;
        }
    } else {
#pragma unroll
        for (int e = 0; e < N; e++) f[e] = __ldg(p + e);
    }
}

// Sum each of G per-thread values over the block; results land in out[0..G) (shared memory),
// visible to every thread on return. red: shared scratch of 32·G floats.
template <int G>
__device__ __forceinline__ void block_sum_group(float (&acc)[G], float* red, float* out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
    for (int j = 0; j < G; j++) acc[j] = warp_sum(acc[j]);
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < G; j++) red[warp * G + j] = acc[j];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int j = 0; j < G; j++) {
            float x = lane < nwarps ? red[lane * G + j] : 0.0f;
            x = warp_sum(x);
            if (lane == 0) out[j] = x;
        }
    }
    __syncthreads();
}

// s <- s - Σ_j <Q_j, s> Q_j over the chunks this thread owns (s in shared memory).
// coef: shared, k rounded up to DIR_GROUP floats. Call from every thread of the block.
template <int N>
__device__ __forceinline__ void project_out(float* s, float* coef, float* red, const float* q,
                                            int k, int d) {
    const int nchunk = d / N;
    for (int j0 = 0; j0 < k; j0 += DIR_GROUP) {
        float acc[DIR_GROUP];
#pragma unroll
        for (int j = 0; j < DIR_GROUP; j++) acc[j] = 0.0f;
        for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
            float x[N];
#pragma unroll
            for (int e = 0; e < N; e++) x[e] = s[c * N + e];
#pragma unroll
            for (int j = 0; j < DIR_GROUP; j++) {
                if (j0 + j < k) {
                    float qv[N];
                    load_q<N>(q + (long long)(j0 + j) * d + c * N, qv);
#pragma unroll
                    for (int e = 0; e < N; e++) acc[j] = fmaf(x[e], qv[e], acc[j]);
                }
            }
        }
        block_sum_group<DIR_GROUP>(acc, red, coef + j0);
    }
    // Each thread rewrites only its own chunks, which only it reads: no barrier needed after.
    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
        float x[N];
#pragma unroll
        for (int e = 0; e < N; e++) x[e] = s[c * N + e];
        for (int j = 0; j < k; j++) {
            const float cj = coef[j];
            float qv[N];
            load_q<N>(q + (long long)j * d + c * N, qv);
#pragma unroll
            for (int e = 0; e < N; e++) x[e] = fmaf(-cj, qv[e], x[e]);
        }
#pragma unroll
        for (int e = 0; e < N; e++) s[c * N + e] = x[e];
    }
}

template <typename T, int N>
__device__ __forceinline__ void resid_ablate_norm_fwd(T* __restrict__ resid, T* __restrict__ normed,
                                                      float* __restrict__ rstd_out,
                                                      const T* __restrict__ a,
                                                      const T* __restrict__ b,
                                                      const float* __restrict__ q, int k,
                                                      const T* __restrict__ w, int d, float eps) {
    extern __shared__ float smem[];
    __shared__ float red[32 * DIR_GROUP];
    float* s = smem;
    float* coef = smem + d;
    const long long off = (long long)blockIdx.x * d;
    const int nchunk = d / N;

    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
        float x[N];
        load_n<T, N>(a + off + c * N, x);
        if (b != nullptr) {
            float y[N];
            load_n<T, N>(b + off + c * N, y);
#pragma unroll
            for (int e = 0; e < N; e++) x[e] += y[e];
        }
#pragma unroll
        for (int e = 0; e < N; e++) s[c * N + e] = x[e];
    }
    if (k > 0) project_out<N>(s, coef, red, q, k, d);

    float ss = 0.0f;
    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
        float x[N];
#pragma unroll
        for (int e = 0; e < N; e++) x[e] = s[c * N + e];
        store_n<T, N>(resid + off + c * N, x);
#pragma unroll
        for (int e = 0; e < N; e++) {
            x[e] = to_f32(from_f32<T>(x[e]));  // the stored value (identity for f32)
            s[c * N + e] = x[e];
            ss = fmaf(x[e], x[e], ss);
        }
    }
    ss = block_sum(ss, red);
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    if (threadIdx.x == 0) rstd_out[blockIdx.x] = r;

    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
        float x[N], wv[N];
        load_n<T, N>(w + c * N, wv);
#pragma unroll
        for (int e = 0; e < N; e++) x[e] = s[c * N + e] * r * wv[e];
        store_n<T, N>(normed + off + c * N, x);
    }
}

template <typename T, int N>
__device__ __forceinline__ void resid_ablate_norm_bwd(T* __restrict__ dresid,
                                                      const T* __restrict__ dnormed,
                                                      const T* __restrict__ resid,
                                                      const float* __restrict__ rstd,
                                                      const float* __restrict__ q, int k,
                                                      const T* __restrict__ w, int d) {
    extern __shared__ float smem[];
    __shared__ float red[32 * DIR_GROUP];
    float* t = smem;
    float* coef = smem + d;
    const long long off = (long long)blockIdx.x * d;
    const int nchunk = d / N;
    const float r = rstd[blockIdx.x];

    // <g, s> with g = dnormed · w; g is kept in shared memory (one f32 row is what fits for
    // large d), s and dresid are read in the second pass (s again: an L1/L2 hit).
    float gs = 0.0f;
    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
        float dn[N], wv[N], x[N];
        load_n<T, N>(dnormed + off + c * N, dn);
        load_n<T, N>(w + c * N, wv);
        load_n<T, N>(resid + off + c * N, x);
        float g[N];
#pragma unroll
        for (int e = 0; e < N; e++) {
            g[e] = dn[e] * wv[e];
            gs = fmaf(g[e], x[e], gs);
        }
#pragma unroll
        for (int e = 0; e < N; e++) t[c * N + e] = g[e];
    }
    gs = block_sum(gs, red);
    const float m = gs * r * r / (float)d;

    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
        float x[N], dr[N];
        load_n<T, N>(resid + off + c * N, x);
        load_n<T, N>(dresid + off + c * N, dr);
#pragma unroll
        for (int e = 0; e < N; e++) {
            const float g = t[c * N + e];
            dr[e] += r * (g - x[e] * m);
        }
        if (k > 0) {
#pragma unroll
            for (int e = 0; e < N; e++) t[c * N + e] = dr[e];
        } else {
            store_n<T, N>(dresid + off + c * N, dr);
        }
    }
    if (k > 0) {
        project_out<N>(t, coef, red, q, k, d);
        for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
            float x[N];
#pragma unroll
            for (int e = 0; e < N; e++) x[e] = t[c * N + e];
            store_n<T, N>(dresid + off + c * N, x);
        }
    }
}

// Entry points. The host launches one block per row with dynamic shared memory of
// (d + roundup(k, DIR_GROUP)) floats; the vector path is taken when d is a multiple of 16 B.
#define NORM_ENTRY(T, SUF)                                                                    \
    extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS)                            \
        resid_ablate_norm_fwd_##SUF(T* resid, T* normed, float* rstd, const T* a, const T* b, \
                                    const float* q, int k, const T* w, int d, float eps) {    \
        if (d % Vec<T>::N == 0)                                                               \
            resid_ablate_norm_fwd<T, Vec<T>::N>(resid, normed, rstd, a, b, q, k, w, d, eps);  \
        else                                                                                  \
            resid_ablate_norm_fwd<T, 1>(resid, normed, rstd, a, b, q, k, w, d, eps);          \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS)                            \
        resid_ablate_norm_bwd_##SUF(T* dresid, const T* dnormed, const T* resid,              \
                                    const float* rstd, const float* q, int k, const T* w,     \
                                    int d) {                                                  \
        if (d % Vec<T>::N == 0)                                                               \
            resid_ablate_norm_bwd<T, Vec<T>::N>(dresid, dnormed, resid, rstd, q, k, w, d);    \
        else                                                                                  \
            resid_ablate_norm_bwd<T, 1>(dresid, dnormed, resid, rstd, q, k, w, d);            \
    }

NORM_ENTRY(bf16, bf16)
NORM_ENTRY(float, f32)
