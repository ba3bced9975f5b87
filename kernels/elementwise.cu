// elementwise.cu: the memory-bound per-element ops.
// defines: embedding_{bf16,f32}, add_bias_{bf16,f32}, {swiglu,geglu}_{fwd,bwd}_{bf16,f32},
//          rope_{bf16,f32}, scale_{bf16,f32}, softcap_{fwd,bwd}_{bf16,f32},
//          cast_from_f32_{bf16,f32}, cast_to_f32_{bf16,f32}
//
// Math (storage T, arithmetic f32):
//   embedding   out[i, :] = table[ids[i], :]
//   add_bias    y[i, j] += bias[j]
//   swiglu      out = silu(g) · u,  silu(g) = g · σ(g),  σ(g) = 1 / (1 + e^-g)
//   swiglu_bwd  dg = dout · u · σ(g) · (1 + g · (1 - σ(g))),  du = dout · silu(g)
//   geglu       out = gelu(g) · u,  gelu(g) = g/2 · (1 + t),  t = tanh(a (g + b g³)),
//               a = √(2/π), b = 0.044715 (PyTorch's gelu(approximate="tanh"), Gemma-2)
//   geglu_bwd   dg = dout · u · ((1 + t)/2 + g/2 · (1 - t²) · a · (1 + 3 b g²)),  du = dout · gelu(g)
//   scale       x = s · x  (s is rounded to T by the host)
//   softcap     x = c · tanh(x / c);  bwd: dx = dx · (1 - (y / c)²) from the capped y
//   rope        pairs (i, i + hd/2) of each head at position p = pos[row] (each row's own
//               position: within its sequence in training, on the timeline in generation):
//               x1' = x1 cos θ - x2 sin θ,  x2' = x2 cos θ + x1 sin θ   (θ -> -θ for the inverse)
//               A position outside the table (p < 0 or p >= n_pos) traps: the host cannot see
//               device positions, so the kernel is what keeps the table read in bounds.
//   casts       f32 <-> T, round to nearest even.
//
// Memory plan: each thread handles one 16-byte vector of T when the row length allows it (so
// each warp moves 512 contiguous bytes per access), one element otherwise; grid-stride loops
// over the flat buffer with a grid sized by the host. Embedding and add_bias use one block row
// per token row. Rope is one thread per 16 bytes of rotated pairs (one pair when hd/2 does not
// allow vectors); the cos/sin table (f32, small) is read through the read-only cache. Nothing here reduces, so results are trivially deterministic.

#include "common.cuh"

// ---- embedding --------------------------------------------------------------------------
// grid.x = n rows (chunked by grid.y for large n is unnecessary: n < 2^31), block threads loop
// over the row's d elements.
template <typename T>
__device__ __forceinline__ void embedding(T* __restrict__ out, const T* __restrict__ table,
                                          const u32* __restrict__ ids, int d) {
    const long long row = blockIdx.x;
    const T* src = table + (long long)ids[row] * d;
    T* dst = out + row * d;
    if (d % Vec<T>::N == 0) {
        for (int c = threadIdx.x; c < d / Vec<T>::N; c += blockDim.x)
            store_vec(dst + c * Vec<T>::N, load_vec_ro(src + c * Vec<T>::N));
    } else {
        for (int i = threadIdx.x; i < d; i += blockDim.x) dst[i] = src[i];
    }
}

// ---- bias -------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void add_bias(T* __restrict__ y, const T* __restrict__ bias, int d) {
    const long long row = blockIdx.x;
    T* p = y + row * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        p[i] = from_f32<T>(to_f32(p[i]) + to_f32(bias[i]));
}

// ---- gated MLP activations (SwiGLU, GeGLU) ------------------------------------------------
// One template for both: `Act::f(g)` is the activation, `Act::grad(g, u, dout, dg, du)` the
// backward.
struct Silu {
    static __device__ __forceinline__ float f(float g) { return g / (1.0f + expf(-g)); }
    static __device__ __forceinline__ void grad(float g, float u, float dout, float& dg,
                                                float& du) {
        const float sig = 1.0f / (1.0f + expf(-g));
        du = dout * (g * sig);
        dg = dout * u * sig * (1.0f + g * (1.0f - sig));
    }
};

struct GeluTanh {
    static constexpr float A = 0.7978845608f;  // √(2/π)
    static constexpr float B = 0.044715f;
    static __device__ __forceinline__ float f(float g) {
        return 0.5f * g * (1.0f + tanhf(A * (g + B * g * g * g)));
    }
    static __device__ __forceinline__ void grad(float g, float u, float dout, float& dg,
                                                float& du) {
        const float t = tanhf(A * (g + B * g * g * g));
        du = dout * (0.5f * g * (1.0f + t));
        dg = dout * u * (0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * A * (1.0f + 3.0f * B * g * g));
    }
};

template <typename T, typename Act>
__device__ __forceinline__ void glu_fwd(T* __restrict__ out, const T* __restrict__ gate,
                                        const T* __restrict__ up, long long len) {
    constexpr int N = Vec<T>::N;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long nvec = len / N;
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < nvec; c += stride) {
        Vec<T> g = load_vec(gate + c * N), u = load_vec(up + c * N), o;
#pragma unroll
        for (int e = 0; e < N; e++)
            o.v[e] = from_f32<T>(Act::f(to_f32(g.v[e])) * to_f32(u.v[e]));
        store_vec(out + c * N, o);
    }
    // Tail (len not a multiple of N): handled by the first threads of block 0.
    if (blockIdx.x == 0) {
        for (long long i = nvec * N + threadIdx.x; i < len; i += blockDim.x)
            out[i] = from_f32<T>(Act::f(to_f32(gate[i])) * to_f32(up[i]));
    }
}

template <typename T, typename Act>
__device__ __forceinline__ void glu_bwd(T* __restrict__ dgate, T* __restrict__ dup,
                                        const T* __restrict__ dout, const T* __restrict__ gate,
                                        const T* __restrict__ up, long long len) {
    constexpr int N = Vec<T>::N;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long nvec = len / N;
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < nvec; c += stride) {
        Vec<T> g = load_vec(gate + c * N), u = load_vec(up + c * N), d = load_vec(dout + c * N);
        Vec<T> dg, du;
#pragma unroll
        for (int e = 0; e < N; e++) {
            float a, b;
            Act::grad(to_f32(g.v[e]), to_f32(u.v[e]), to_f32(d.v[e]), a, b);
            dg.v[e] = from_f32<T>(a);
            du.v[e] = from_f32<T>(b);
        }
        store_vec(dgate + c * N, dg);
        store_vec(dup + c * N, du);
    }
    if (blockIdx.x == 0) {
        for (long long i = nvec * N + threadIdx.x; i < len; i += blockDim.x) {
            float a, b;
            Act::grad(to_f32(gate[i]), to_f32(up[i]), to_f32(dout[i]), a, b);
            dgate[i] = from_f32<T>(a);
            dup[i] = from_f32<T>(b);
        }
    }
}

// ---- rope -------------------------------------------------------------------------------
// x: [rows, n_heads * hd]; pos: [rows] i32; table: [n_pos, hd/2] of (cos, sin) pairs. sign = +1
// forward, -1 inverse. One thread per M consecutive pairs (i0 .. i0 + M) of one (row, head): M = 16 bytes
// of T when hd/2 allows it, so x1, x2 and the table are each read with 16-byte accesses, and
// the index arithmetic (64-bit divisions) is paid once per M pairs.
template <typename T, int M>
__device__ __forceinline__ void rope(T* __restrict__ x, const float* __restrict__ table,
                                     const int* __restrict__ positions, long long rows,
                                     int n_heads, int hd, int n_pos, float sign) {
    const int half = hd / 2, per_head = half / M;
    const long long total = rows * n_heads * per_head;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += stride) {
        const int i0 = (int)(t % per_head) * M;
        const long long rh = t / per_head;  // row * n_heads + head
        const long long row = rh / n_heads;
        const int pos = positions[row];
        if (pos < 0 || pos >= n_pos) __trap();
        const float* cs = table + ((long long)pos * half + i0) * 2;
        float c[M], s[M];
        if constexpr (M % 2 == 0) {
#pragma unroll
            for (int e = 0; e < M; e += 2) {
                const float4 v = __ldg(reinterpret_cast<const float4*>(cs + 2 * e));
                c[e] = v.x;
                s[e] = sign * v.y;
                c[e + 1] = v.z;
                s[e + 1] = sign * v.w;
            }
        } else {
#pragma unroll
            for (int e = 0; e < M; e++) {
                const float2 v = __ldg(reinterpret_cast<const float2*>(cs + 2 * e));
                c[e] = v.x;
                s[e] = sign * v.y;
            }
        }
        T* p = x + rh * hd + i0;
        float x1[M], x2[M], y1[M], y2[M];
        load_n<T, M>(p, x1);
        load_n<T, M>(p + half, x2);
#pragma unroll
        for (int e = 0; e < M; e++) {
            y1[e] = x1[e] * c[e] - x2[e] * s[e];
            y2[e] = x2[e] * c[e] + x1[e] * s[e];
        }
        store_n<T, M>(p, y1);
        store_n<T, M>(p + half, y2);
    }
}

// ---- scale, soft-cap ----------------------------------------------------------------------
// One element per thread, grid-stride (these run once per forward on the embedding, and per
// lm-head chunk on the logits).
template <typename T>
__device__ __forceinline__ void scale(T* __restrict__ x, float s, long long len) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride)
        x[i] = from_f32<T>(to_f32(x[i]) * s);
}

template <typename T>
__device__ __forceinline__ void softcap_fwd(T* __restrict__ x, float cap, long long len) {
    const float inv = 1.0f / cap;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride)
        x[i] = from_f32<T>(cap * tanhf(to_f32(x[i]) * inv));
}

template <typename T>
__device__ __forceinline__ void softcap_bwd(T* __restrict__ dx, const T* __restrict__ y, float cap,
                                            long long len) {
    const float inv = 1.0f / cap;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride) {
        const float t = to_f32(y[i]) * inv;
        dx[i] = from_f32<T>(to_f32(dx[i]) * (1.0f - t * t));
    }
}

// ---- casts ------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ void cast_from_f32(T* __restrict__ dst, const float* __restrict__ src,
                                              long long len) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride)
        dst[i] = from_f32<T>(src[i]);
}

template <typename T>
__device__ __forceinline__ void cast_to_f32(float* __restrict__ dst, const T* __restrict__ src,
                                            long long len) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < len; i += stride)
        dst[i] = to_f32(src[i]);
}

#define ELEMENTWISE_ENTRY(T, SUF)                                                             \
    extern "C" __global__ void embedding_##SUF(T* out, const T* table, const u32* ids, int d) { \
        embedding<T>(out, table, ids, d);                                                     \
    }                                                                                         \
    extern "C" __global__ void add_bias_##SUF(T* y, const T* bias, int d) {                   \
        add_bias<T>(y, bias, d);                                                              \
    }                                                                                         \
    extern "C" __global__ void swiglu_fwd_##SUF(T* out, const T* gate, const T* up,           \
                                                long long len) {                              \
        glu_fwd<T, Silu>(out, gate, up, len);                                                 \
    }                                                                                         \
    extern "C" __global__ void swiglu_bwd_##SUF(T* dgate, T* dup, const T* dout,              \
                                                const T* gate, const T* up, long long len) {  \
        glu_bwd<T, Silu>(dgate, dup, dout, gate, up, len);                                    \
    }                                                                                         \
    extern "C" __global__ void geglu_fwd_##SUF(T* out, const T* gate, const T* up,            \
                                               long long len) {                               \
        glu_fwd<T, GeluTanh>(out, gate, up, len);                                             \
    }                                                                                         \
    extern "C" __global__ void geglu_bwd_##SUF(T* dgate, T* dup, const T* dout,               \
                                               const T* gate, const T* up, long long len) {   \
        glu_bwd<T, GeluTanh>(dgate, dup, dout, gate, up, len);                                \
    }                                                                                         \
    extern "C" __global__ void scale_##SUF(T* x, float s, long long len) {                    \
        scale<T>(x, s, len);                                                                  \
    }                                                                                         \
    extern "C" __global__ void softcap_fwd_##SUF(T* x, float cap, long long len) {            \
        softcap_fwd<T>(x, cap, len);                                                          \
    }                                                                                         \
    extern "C" __global__ void softcap_bwd_##SUF(T* dx, const T* y, float cap, long long len) { \
        softcap_bwd<T>(dx, y, cap, len);                                                      \
    }                                                                                         \
    extern "C" __global__ void rope_##SUF(T* x, const float* table, const int* pos,           \
                                          long long rows, int n_heads, int hd, int n_pos,     \
                                          float sign) {                                       \
        if ((hd / 2) % Vec<T>::N == 0)                                                        \
            rope<T, Vec<T>::N>(x, table, pos, rows, n_heads, hd, n_pos, sign);                \
        else                                                                                  \
            rope<T, 1>(x, table, pos, rows, n_heads, hd, n_pos, sign);                        \
    }                                                                                         \
    extern "C" __global__ void cast_from_f32_##SUF(T* dst, const float* src, long long len) { \
        cast_from_f32<T>(dst, src, len);                                                      \
    }                                                                                         \
    extern "C" __global__ void cast_to_f32_##SUF(float* dst, const T* src, long long len) {   \
        cast_to_f32<T>(dst, src, len);                                                        \
    }

ELEMENTWISE_ENTRY(bf16, bf16)
ELEMENTWISE_ENTRY(float, f32)
