// norm.cu: the residual stream step with concept ablation, fused with the next rmsnorm.
// defines: resid_ablate_norm_{fwd,bwd}_{bf16,f32}_{c1r4,c2r2,c4r1,s}
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
// Memory plan. A block of up to 256 threads handles R consecutive rows; thread t owns the
// chunks c = t + i·blockDim (i < C) of N elements (N: 16 bytes of T, or 1 when d does not
// allow vectors) in each of its R rows, and keeps them in registers from the first read to the
// last write: a, b, dnormed, resid and dresid are read from global memory once, resid, normed
// and dresid written once, 16 B per access, and shared memory only carries the reductions
// (staging rows in shared memory costs scalar, bank-conflicted passes over each row: see
// docs/benchmarks.md).
// Q is k·d·4 bytes read by every block, so it lives in L1/L2; each Q chunk a thread loads
// serves its R rows, so Q traffic per row is 2·k·d·4 / R bytes (dot products, then the
// subtraction). The dot products are formed G directions at a time (R·G ≤ 32 accumulators
// per thread) and reduced over the block with a transposing butterfly: V values per lane
// become one fully-reduced value per lane group in V-1 + log2(32/V) shuffles, not 5·V.
// The host picks (C, R) from d with C·R = 4 chunks of registers per thread (scalar path:
// C = 8 single elements, R = 1).
//
// Determinism: every sum has a fixed order (per-thread chunk order, butterfly within warps,
// warps in index order). No atomics.

#include "common.cuh"

#define NORM_MAX_THREADS 256
#define NORM_MAX_WARPS (NORM_MAX_THREADS / 32)
#define DIR_GROUP 8

// N consecutive elements kept in their storage type (bf16 pairs packed in 32-bit registers,
// half the registers of floats), converted where used by get(e). Zero bits are +0.0.
template <typename T, int N> struct __align__(N * sizeof(T) == 16 ? 16 : alignof(T)) Raw {
    T v[N];
    __device__ __forceinline__ float get(int e) const { return to_f32(v[e]); }
};
template <> struct __align__(16) Raw<bf16, 8> {
    u32 w[4];  // element 2i in the low half of w[i], 2i + 1 in the high half (little-endian)
    __device__ __forceinline__ float get(int e) const {
        const u32 x = w[e >> 1];
        return __uint_as_float((e & 1) ? (x & 0xffff0000u) : (x << 16));
    }
};

template <typename T, int N> __device__ __forceinline__ Raw<T, N> zero_raw() {
    Raw<T, N> r;
    u32* bits = reinterpret_cast<u32*>(&r);
    static_assert(sizeof(Raw<T, N>) % 4 == 0 || N == 1, "Raw holds whole 32-bit words");
    if constexpr (sizeof(Raw<T, N>) % 4 == 0) {
#pragma unroll
        for (int i = 0; i < (int)(sizeof(Raw<T, N>) / 4); i++) bits[i] = 0u;
    } else {
        r.v[0] = from_f32<T>(0.0f);
    }
    return r;
}

template <typename T, int N> __device__ __forceinline__ Raw<T, N> load_raw(const T* p) {
    Raw<T, N> r;
    if constexpr (N == Vec<T>::N) {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        *reinterpret_cast<uint4*>(&r) = u;
    } else {
#pragma unroll
        for (int e = 0; e < N; e++) r.v[e] = p[e];
    }
    return r;
}

// Chunk c of the norm weight, zeros past the row's end (so padding lanes contribute nothing).
template <typename T, int N>
__device__ __forceinline__ void load_w(const T* w, int c, int nchunk, float* f) {
    if (c < nchunk) {
        load_n<T, N>(w + c * N, f);
    } else {
#pragma unroll
        for (int e = 0; e < N; e++) f[e] = 0.0f;
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

// One halving step of the transposing butterfly below and the ones after it: a lane keeps the
// half of its H·2 values selected by its lane bit O and adds the partner's (lane ^ O) copy of
// that half, which the partner sends. Template recursion keeps every index a constant.
template <int H, int O> __device__ __forceinline__ void halve_and_swap(float* v, int lane) {
    if constexpr (H >= 1) {
        const bool upper = (lane & O) != 0;
#pragma unroll
        for (int i = 0; i < H; i++) {
            const float send = upper ? v[i] : v[i + H];
            const float keep = upper ? v[i + H] : v[i];
            v[i] = keep + __shfl_xor_sync(FULL_MASK, send, O);
        }
        halve_and_swap<H / 2, O / 2>(v, lane);
    }
}

// Sum each of V per-thread values over the block (V a power of two, at most 32). Returns,
// in thread t < V, the block total of value t (0 elsewhere). red: shared scratch of
// NORM_MAX_WARPS·V floats. Contains __syncthreads: call from every thread.
//
// Within a warp, a transposing butterfly: after log2(V) halving steps (offsets 16, 8, ...)
// lane l holds a partial of value l >> (5 - log2 V) summed over the lanes that differ in the
// top log2(V) lane bits; plain butterflies over the remaining low bits complete the warp sum.
// V - 1 + log2(32 / V) shuffles instead of 5·V.
template <int V> __device__ __forceinline__ float block_sum_many(float (&v)[V], float* red) {
    static_assert(V >= 1 && V <= 32 && (V & (V - 1)) == 0, "V must be a power of two <= 32");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    constexpr int LANES_PER_VALUE = 32 / V;
    halve_and_swap<V / 2, 16>(v, lane);
    float x = v[0];
#pragma unroll
    for (int o = LANES_PER_VALUE / 2; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
    __syncthreads();  // red may still be read by the previous call
    if (lane % LANES_PER_VALUE == 0) red[warp * V + lane / LANES_PER_VALUE] = x;
    __syncthreads();
    float total = 0.0f;
    if ((int)threadIdx.x < V) {
        for (int w = 0; w < nwarps; w++) total += red[w * V + threadIdx.x];
    }
    return total;
}

// For the R rows held in x (chunks c = threadIdx.x + i·blockDim, i < C, of N floats each):
// x_r <- x_r - Σ_j <Q_j, x_r> Q_j. coef: shared, R·kpad floats. Call from every thread.
template <int N, int C, int R>
__device__ __forceinline__ void project_out(float (&x)[R][C][N], float* coef, float* red,
                                            const float* __restrict__ q, int k, int d) {
    constexpr int G = (32 / R) < DIR_GROUP ? (32 / R) : DIR_GROUP;
    const int nchunk = d / N;
    const int kpad = (k + DIR_GROUP - 1) / DIR_GROUP * DIR_GROUP;
    for (int j0 = 0; j0 < k; j0 += G) {
        float acc[R * G];
#pragma unroll
        for (int a = 0; a < R * G; a++) acc[a] = 0.0f;
#pragma unroll
        for (int i = 0; i < C; i++) {
            const int c = threadIdx.x + i * blockDim.x;
            if (c < nchunk) {
#pragma unroll
                for (int j = 0; j < G; j++) {
                    if (j0 + j < k) {
                        float qv[N];
                        load_q<N>(q + (long long)(j0 + j) * d + c * N, qv);
#pragma unroll
                        for (int r = 0; r < R; r++)
#pragma unroll
                            for (int e = 0; e < N; e++)
                                acc[r * G + j] = fmaf(x[r][i][e], qv[e], acc[r * G + j]);
                    }
                }
            }
        }
        const float total = block_sum_many<R * G>(acc, red);
        if ((int)threadIdx.x < R * G) {
            const int r = threadIdx.x / G, j = j0 + threadIdx.x % G;
            if (j < k) coef[r * kpad + j] = total;
        }
    }
    __syncthreads();  // every coefficient written before any is read
#pragma unroll
    for (int i = 0; i < C; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c < nchunk) {
            for (int j = 0; j < k; j++) {
                float qv[N];
                load_q<N>(q + (long long)j * d + c * N, qv);
#pragma unroll
                for (int r = 0; r < R; r++) {
                    const float cj = coef[r * kpad + j];
#pragma unroll
                    for (int e = 0; e < N; e++) x[r][i][e] = fmaf(-cj, qv[e], x[r][i][e]);
                }
            }
        }
    }
}

// Rows past n (the last block) hold zeros and store nothing.
template <typename T, int N, int C, int R>
__device__ __forceinline__ void resid_ablate_norm_fwd(T* __restrict__ resid, T* __restrict__ normed,
                                                      float* __restrict__ rstd_out,
                                                      const T* __restrict__ a,
                                                      const T* __restrict__ b,
                                                      const float* __restrict__ q, int k,
                                                      const T* __restrict__ w, int n, int d,
                                                      float eps) {
    extern __shared__ float smem[];  // R·kpad direction coefficients
    __shared__ float red[NORM_MAX_WARPS * 32];
    __shared__ float stats[R];
    const int nchunk = d / N;
    const int row0 = blockIdx.x * R;

    // Every load of the block is issued before any is used.
    float x[R][C][N];
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int i = 0; i < C; i++) {
            const int c = threadIdx.x + i * blockDim.x;
            if (row0 + r < n && c < nchunk) {
                const long long off = (long long)(row0 + r) * d + c * N;
                load_n<T, N>(a + off, x[r][i]);
                if (b != nullptr) {
                    float y[N];
                    load_n<T, N>(b + off, y);
#pragma unroll
                    for (int e = 0; e < N; e++) x[r][i][e] += y[e];
                }
            } else {
#pragma unroll
                for (int e = 0; e < N; e++) x[r][i][e] = 0.0f;
            }
        }
    }
    if (k > 0) project_out<N, C, R>(x, smem, red, q, k, d);

    float ss[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        ss[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < C; i++) {
            const int c = threadIdx.x + i * blockDim.x;
            if (row0 + r < n && c < nchunk)
                store_n<T, N>(resid + (long long)(row0 + r) * d + c * N, x[r][i]);
#pragma unroll
            for (int e = 0; e < N; e++) {
                x[r][i][e] = to_f32(from_f32<T>(x[r][i][e]));  // the stored value (f32: itself)
                ss[r] = fmaf(x[r][i][e], x[r][i][e], ss[r]);
            }
        }
    }
    const float total = block_sum_many<R>(ss, red);
    if ((int)threadIdx.x < R) {
        const float rs = 1.0f / sqrtf(total / (float)d + eps);
        stats[threadIdx.x] = rs;
        if (row0 + (int)threadIdx.x < n) rstd_out[row0 + threadIdx.x] = rs;
    }
    __syncthreads();

#pragma unroll
    for (int i = 0; i < C; i++) {
        const int c = threadIdx.x + i * blockDim.x;
        if (c >= nchunk) continue;
        float wv[N];
        load_n<T, N>(w + c * N, wv);
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (row0 + r >= n) continue;
            const float rs = stats[r];
            float y[N];
#pragma unroll
            for (int e = 0; e < N; e++) y[e] = x[r][i][e] * rs * wv[e];
            store_n<T, N>(normed + (long long)(row0 + r) * d + c * N, y);
        }
    }
}

template <typename T, int N, int C, int R>
__device__ __forceinline__ void resid_ablate_norm_bwd(T* __restrict__ dresid,
                                                      const T* __restrict__ dnormed,
                                                      const T* __restrict__ resid,
                                                      const float* __restrict__ rstd,
                                                      const float* __restrict__ q, int k,
                                                      const T* __restrict__ w, int n, int d) {
    extern __shared__ float smem[];  // R·kpad direction coefficients
    __shared__ float red[NORM_MAX_WARPS * 32];
    __shared__ float stats[R];
    const int nchunk = d / N;
    const int row0 = blockIdx.x * R;

    // dnormed, resid and dresid stay in storage precision until t is formed.
    Raw<T, N> dn[R][C], s[R][C], dr[R][C];
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int i = 0; i < C; i++) {
            const int c = threadIdx.x + i * blockDim.x;
            if (row0 + r < n && c < nchunk) {
                const long long off = (long long)(row0 + r) * d + c * N;
                dn[r][i] = load_raw<T, N>(dnormed + off);
                s[r][i] = load_raw<T, N>(resid + off);
                dr[r][i] = load_raw<T, N>(dresid + off);
            } else {
                dn[r][i] = zero_raw<T, N>();
                s[r][i] = zero_raw<T, N>();
                dr[r][i] = zero_raw<T, N>();
            }
        }
    }
    // <g, s> per row, g = dnormed · w.
    // w is re-read (an L1 hit) where it is needed rather than held in registers.
    float gs[R];
#pragma unroll
    for (int r = 0; r < R; r++) gs[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < C; i++) {
        float wv[N];
        load_w<T, N>(w, threadIdx.x + i * blockDim.x, nchunk, wv);
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int e = 0; e < N; e++)
                gs[r] = fmaf(dn[r][i].get(e) * wv[e], s[r][i].get(e), gs[r]);
    }
    const float total = block_sum_many<R>(gs, red);
    if ((int)threadIdx.x < R) stats[threadIdx.x] = total;
    __syncthreads();

    float rr[R], m[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        rr[r] = row0 + r < n ? rstd[row0 + r] : 0.0f;
        m[r] = stats[r] * rr[r] * rr[r] / (float)d;
    }
    float t[R][C][N];
#pragma unroll
    for (int i = 0; i < C; i++) {
        float wv[N];
        load_w<T, N>(w, threadIdx.x + i * blockDim.x, nchunk, wv);
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int e = 0; e < N; e++) {
                const float g = dn[r][i].get(e) * wv[e];
                t[r][i][e] = dr[r][i].get(e) + rr[r] * (g - s[r][i].get(e) * m[r]);
            }
    }
    if (k > 0) project_out<N, C, R>(t, smem, red, q, k, d);

#pragma unroll
    for (int r = 0; r < R; r++) {
        if (row0 + r >= n) continue;
#pragma unroll
        for (int i = 0; i < C; i++) {
            const int c = threadIdx.x + i * blockDim.x;
            if (c < nchunk) store_n<T, N>(dresid + (long long)(row0 + r) * d + c * N, t[r][i]);
        }
    }
}

// Entry points, one per (chunks per thread C, rows per block R) and a scalar one for rows
// whose length is not a multiple of 16 bytes (C = 8 single elements, R = 1). The host
// launches ceil(n / R) blocks of up to NORM_MAX_THREADS threads with R·kpad floats of dynamic
// shared memory (kpad: k rounded up to DIR_GROUP).
#define NORM_VARIANT(T, SUF, NAME, N, C, R)                                                   \
    extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS, 2)                         \
        resid_ablate_norm_fwd_##SUF##_##NAME(T* resid, T* normed, float* rstd, const T* a,    \
                                             const T* b, const float* q, int k, const T* w,   \
                                             int n, int d, float eps) {                       \
        resid_ablate_norm_fwd<T, N, C, R>(resid, normed, rstd, a, b, q, k, w, n, d, eps);     \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(NORM_MAX_THREADS, 2)                         \
        resid_ablate_norm_bwd_##SUF##_##NAME(T* dresid, const T* dnormed, const T* resid,     \
                                             const float* rstd, const float* q, int k,        \
                                             const T* w, int n, int d) {                      \
        resid_ablate_norm_bwd<T, N, C, R>(dresid, dnormed, resid, rstd, q, k, w, n, d);       \
    }

#define NORM_ENTRY(T, SUF)                          \
    NORM_VARIANT(T, SUF, c1r4, Vec<T>::N, 1, 4)     \
    NORM_VARIANT(T, SUF, c2r2, Vec<T>::N, 2, 2)     \
    NORM_VARIANT(T, SUF, c4r1, Vec<T>::N, 4, 1)     \
    NORM_VARIANT(T, SUF, s, 1, 8, 1)

NORM_ENTRY(bf16, bf16)
NORM_ENTRY(float, f32)
