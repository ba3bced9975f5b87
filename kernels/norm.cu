// norm.cu: the residual stream step with concept ablation, fused with the next rmsnorm.
// defines: resid_ablate_norm_{fwd,bwd}_r{1,2,4}_{bf16,f32} (R rows per block)
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
// Memory plan: a block of up to 256 threads handles R consecutive rows (R = 1, 2 or 4,
// chosen by the host so the rows fit in shared memory); each thread owns the vector chunks
// c = tid, tid + blockDim, ... of N = 16 B worth of elements in every one of the R rows. The
// f32 rows live in dynamic shared memory (R·d floats, then R·kpad coefficients, then a small
// staging area), so a, b, dnormed, resid are read from global memory once and resid / normed
// written once, 16 B per access. Q is k·d·4 bytes shared by every row and stays in L2; it is
// read twice per block (dot products, then the subtraction), each Q chunk applied to all R
// rows while in registers, so its L2 traffic per row is 1/R of a row-per-block kernel's. The
// dot products are formed G directions at a time (R·G ≤ 32 register accumulators per thread,
// reduced over the block in a fixed order). Without directions the Q passes are skipped.
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

// Directions reduced per pass for R rows: R·G accumulators per thread stay at 32 or fewer.
template <int R> struct DirGroup {
    static constexpr int G = (32 / R) < DIR_GROUP ? (32 / R) : DIR_GROUP;
};

// For the R rows s[r·d ..] of this block: s_r <- s_r - Σ_j <Q_j, s_r> Q_j over the chunks this
// thread owns. Each Q chunk is loaded once and applied to all R rows, so Q is read from L2
// twice per R rows instead of twice per row. coef: shared, R·kpad floats (row r's coefficients
// at r·kpad). Call from every thread of the block.
template <int N, int R>
__device__ __forceinline__ void project_out(float* s, float* coef, int kpad, float* red,
                                            const float* q, int k, int d) {
    constexpr int G = DirGroup<R>::G;
    const int nchunk = d / N;
    for (int j0 = 0; j0 < k; j0 += G) {
        float acc[R * G];
#pragma unroll
        for (int i = 0; i < R * G; i++) acc[i] = 0.0f;
        for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
#pragma unroll
            for (int j = 0; j < G; j++) {
                if (j0 + j < k) {
                    float qv[N];
                    load_q<N>(q + (long long)(j0 + j) * d + c * N, qv);
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        const float* x = s + r * d + c * N;
#pragma unroll
                        for (int e = 0; e < N; e++) acc[r * G + j] = fmaf(x[e], qv[e], acc[r * G + j]);
                    }
                }
            }
        }
        // out[r·G + j] -> coef[r·kpad + j0 + j]: reduce into a staging area, then scatter.
        float* stage = coef + R * kpad;
        block_sum_group<R * G>(acc, red, stage);
        if (threadIdx.x < R * G) {
            const int r = threadIdx.x / G, j = threadIdx.x % G;
            if (j0 + j < k) coef[r * kpad + j0 + j] = stage[threadIdx.x];
        }
        __syncthreads();
    }
    // Each thread rewrites only its own chunks, which only it reads: no barrier needed after.
    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
        float x[R][N];
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int e = 0; e < N; e++) x[r][e] = s[r * d + c * N + e];
        for (int j = 0; j < k; j++) {
            float qv[N];
            load_q<N>(q + (long long)j * d + c * N, qv);
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float cj = coef[r * kpad + j];
#pragma unroll
                for (int e = 0; e < N; e++) x[r][e] = fmaf(-cj, qv[e], x[r][e]);
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int e = 0; e < N; e++) s[r * d + c * N + e] = x[r][e];
    }
}

// Shared memory of one block, in floats, all dynamic (static __shared__ arrays would be
// allocated once per inlined template instance): R rows, R·kpad coefficients, 32 staging,
// 32·32 reduction scratch, 4 row statistics.
// (The host computes the same: see `norm_rows_per_block` in backend.rs.)

template <typename T, int N, int R>
__device__ __forceinline__ void resid_ablate_norm_fwd(T* __restrict__ resid, T* __restrict__ normed,
                                                      float* __restrict__ rstd_out,
                                                      const T* __restrict__ a,
                                                      const T* __restrict__ b,
                                                      const float* __restrict__ q, int k,
                                                      const T* __restrict__ w, int n, int d,
                                                      float eps) {
    extern __shared__ float smem[];
    const int kpad = (k + DIR_GROUP - 1) / DIR_GROUP * DIR_GROUP;
    float* s = smem;
    float* coef = smem + R * d;
    float* red = coef + R * kpad + 32;  // after the staging area
    float* stats = red + 32 * 32;
    const int row0 = blockIdx.x * R;
    const int nchunk = d / N;

    // Rows past the end of the batch (the last block) compute on zeros and store nothing.
    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            float x[N];
            if (row0 + r < n) {
                const long long off = (long long)(row0 + r) * d + c * N;
                load_n<T, N>(a + off, x);
                if (b != nullptr) {
                    float y[N];
                    load_n<T, N>(b + off, y);
#pragma unroll
                    for (int e = 0; e < N; e++) x[e] += y[e];
                }
            } else {
#pragma unroll
                for (int e = 0; e < N; e++) x[e] = 0.0f;
            }
#pragma unroll
            for (int e = 0; e < N; e++) s[r * d + c * N + e] = x[e];
        }
    }
    if (k > 0) project_out<N, R>(s, coef, kpad, red, q, k, d);

    float ss[R];
#pragma unroll
    for (int r = 0; r < R; r++) ss[r] = 0.0f;
    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            float x[N];
#pragma unroll
            for (int e = 0; e < N; e++) x[e] = s[r * d + c * N + e];
            if (row0 + r < n) store_n<T, N>(resid + (long long)(row0 + r) * d + c * N, x);
#pragma unroll
            for (int e = 0; e < N; e++) {
                x[e] = to_f32(from_f32<T>(x[e]));  // the stored value (identity for f32)
                s[r * d + c * N + e] = x[e];
                ss[r] = fmaf(x[e], x[e], ss[r]);
            }
        }
    }
    block_sum_group<R>(ss, red, stats);
    if (threadIdx.x < R && row0 + (int)threadIdx.x < n)
        rstd_out[row0 + threadIdx.x] = 1.0f / sqrtf(stats[threadIdx.x] / (float)d + eps);

    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
        float wv[N];
        load_n<T, N>(w + c * N, wv);
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (row0 + r >= n) continue;
            const float rs = 1.0f / sqrtf(stats[r] / (float)d + eps);
            float x[N];
#pragma unroll
            for (int e = 0; e < N; e++) x[e] = s[r * d + c * N + e] * rs * wv[e];
            store_n<T, N>(normed + (long long)(row0 + r) * d + c * N, x);
        }
    }
}

template <typename T, int N, int R>
__device__ __forceinline__ void resid_ablate_norm_bwd(T* __restrict__ dresid,
                                                      const T* __restrict__ dnormed,
                                                      const T* __restrict__ resid,
                                                      const float* __restrict__ rstd,
                                                      const float* __restrict__ q, int k,
                                                      const T* __restrict__ w, int n, int d) {
    extern __shared__ float smem[];
    const int kpad = (k + DIR_GROUP - 1) / DIR_GROUP * DIR_GROUP;
    float* t = smem;
    float* coef = smem + R * d;
    float* red = coef + R * kpad + 32;  // after the staging area
    float* stats = red + 32 * 32;
    const int row0 = blockIdx.x * R;
    const int nchunk = d / N;

    // <g, s> per row with g = dnormed · w; g is kept in shared memory, s and dresid are read
    // in the second pass (s again: an L1/L2 hit).
    float gs[R];
#pragma unroll
    for (int r = 0; r < R; r++) gs[r] = 0.0f;
    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
        float wv[N];
        load_n<T, N>(w + c * N, wv);
#pragma unroll
        for (int r = 0; r < R; r++) {
            float g[N];
            if (row0 + r < n) {
                const long long off = (long long)(row0 + r) * d + c * N;
                float dn[N], x[N];
                load_n<T, N>(dnormed + off, dn);
                load_n<T, N>(resid + off, x);
#pragma unroll
                for (int e = 0; e < N; e++) {
                    g[e] = dn[e] * wv[e];
                    gs[r] = fmaf(g[e], x[e], gs[r]);
                }
            } else {
#pragma unroll
                for (int e = 0; e < N; e++) g[e] = 0.0f;
            }
#pragma unroll
            for (int e = 0; e < N; e++) t[r * d + c * N + e] = g[e];
        }
    }
    block_sum_group<R>(gs, red, stats);

    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
#pragma unroll
        for (int r = 0; r < R; r++) {
            float dr[N];
            if (row0 + r < n) {
                const long long off = (long long)(row0 + r) * d + c * N;
                const float rs = rstd[row0 + r];
                const float m = stats[r] * rs * rs / (float)d;
                float x[N];
                load_n<T, N>(resid + off, x);
                load_n<T, N>(dresid + off, dr);
#pragma unroll
                for (int e = 0; e < N; e++) dr[e] += rs * (t[r * d + c * N + e] - x[e] * m);
                if (k == 0) store_n<T, N>(dresid + off, dr);
            } else {
#pragma unroll
                for (int e = 0; e < N; e++) dr[e] = 0.0f;
            }
            if (k > 0) {
#pragma unroll
                for (int e = 0; e < N; e++) t[r * d + c * N + e] = dr[e];
            }
        }
    }
    if (k > 0) {
        project_out<N, R>(t, coef, kpad, red, q, k, d);
        for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                if (row0 + r >= n) continue;
                float x[N];
#pragma unroll
                for (int e = 0; e < N; e++) x[e] = t[r * d + c * N + e];
                store_n<T, N>(dresid + (long long)(row0 + r) * d + c * N, x);
            }
        }
    }
}

// Entry points. The host launches ceil(n / R) blocks of R rows each (R one of 1, 2, 4, chosen so the rows fit in shared memory) with dynamic shared memory of
// R·d + R·roundup(k, DIR_GROUP) + 32 + 1024 + 4 floats; the vector path is taken when d is a multiple of
// 16 B. More rows per block means Q (shared by every row) is read from L2 fewer times.
// One entry point per (direction, R, type): a single template instance per kernel keeps the
// register allocation of each as tight as the one-row kernel's (one kernel holding every R
// spilled).
#define NORM_ENTRY(T, SUF, R)                                                                 \
    extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS, 2)                          \
        resid_ablate_norm_fwd_r##R##_##SUF(T* resid, T* normed, float* rstd, const T* a,      \
                                           const T* b, const float* q, int k, const T* w,     \
                                           int n, int d, float eps) {                         \
        if (d % Vec<T>::N == 0)                                                               \
            resid_ablate_norm_fwd<T, Vec<T>::N, R>(resid, normed, rstd, a, b, q, k, w, n, d,  \
                                                   eps);                                      \
        else                                                                                  \
            resid_ablate_norm_fwd<T, 1, R>(resid, normed, rstd, a, b, q, k, w, n, d, eps);    \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS, 2)                          \
        resid_ablate_norm_bwd_r##R##_##SUF(T* dresid, const T* dnormed, const T* resid,       \
                                           const float* rstd, const float* q, int k,          \
                                           const T* w, int n, int d) {                        \
        if (d % Vec<T>::N == 0)                                                               \
            resid_ablate_norm_bwd<T, Vec<T>::N, R>(dresid, dnormed, resid, rstd, q, k, w, n,  \
                                                   d);                                        \
        else                                                                                  \
            resid_ablate_norm_bwd<T, 1, R>(dresid, dnormed, resid, rstd, q, k, w, n, d);      \
    }

NORM_ENTRY(bf16, bf16, 1)
NORM_ENTRY(bf16, bf16, 2)
NORM_ENTRY(bf16, bf16, 4)
NORM_ENTRY(float, f32, 1)
NORM_ENTRY(float, f32, 2)
NORM_ENTRY(float, f32, 4)
