// common.cuh: the one header every kernel includes.
// defines: bf16 (storage type), to_f32 / from_f32<T>, Vec<T> (16-byte vector loads and stores),
//          warp_sum / warp_max, block_sum / block_max (deterministic), KERNEL entry-point macros.
//
// No CUDA toolkit header is included: a machine running caft-fast has only the driver and
// libnvrtc, so everything below is written with NVRTC built-ins (__shfl_xor_sync,
// __float_as_uint, __uint_as_float, the float4/uint4 vector types) and plain C++.
//
// bf16 is the upper half of an IEEE binary32: sign, 8 exponent bits, 7 mantissa bits.
//   bf16 -> f32: shift the 16 bits left by 16 (exact).
//   f32 -> bf16: round to nearest, ties to even: add 0x7fff + (bit 16 of the input) and keep the
//                upper half; NaN is kept a (quiet) NaN instead of rounding into infinity.
//
// Element-type abstraction: kernels are templates over the storage type T (bf16 or float) and do
// all math in float: `float x = to_f32(p[i]); ... p[i] = from_f32<T>(y);`. Entry points are
// `extern "C" __global__` functions named `<op>_bf16` / `<op>_f32` that call the template.
//
// Determinism: every reduction here has a fixed order (butterfly over lanes, then warps in index
// order), so the same inputs and launch shape give bit-identical results; no float atomics.

#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

struct __align__(2) bf16 {
    u16 bits;
};

__device__ __forceinline__ float bf16_to_f32(bf16 x) {
    return __uint_as_float(((u32)x.bits) << 16);
}

__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        // NaN: keep the sign and force a quiet-NaN mantissa bit so truncation cannot give inf.
        r.bits = (u16)((u >> 16) | 0x0040u);
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.bits = (u16)(u >> 16);
    return r;
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return bf16_to_f32(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return f32_to_bf16(x); }

// ---- vector loads -------------------------------------------------------------------------
// Vec<T> is 16 bytes of T (8 bf16 or 4 float), loaded and stored with one 128-bit access.
// Use only when the address is 16-byte aligned (buffers from cuMemAlloc are 256-byte aligned,
// so a row start `base + row * d` is aligned whenever d % Vec<T>::N == 0).
template <typename T> struct __align__(16) Vec {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

template <typename T> __device__ __forceinline__ Vec<T> load_vec(const T* p) {
    Vec<T> r;
    *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
    return r;
}

// Read-only, streaming through the non-coherent (texture) path.
template <typename T> __device__ __forceinline__ Vec<T> load_vec_ro(const T* p) {
    Vec<T> r;
    *reinterpret_cast<uint4*>(&r) = __ldg(reinterpret_cast<const uint4*>(p));
    return r;
}

template <typename T> __device__ __forceinline__ void store_vec(T* p, const Vec<T>& x) {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&x);
}

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

// True when a row of length d starting at every multiple of d from an aligned base can use Vec.
template <typename T> __device__ __forceinline__ bool vec_ok(long long d) {
    return (d % Vec<T>::N) == 0;
}

// ---- reductions ---------------------------------------------------------------------------
#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(FULL_MASK, x, o);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(FULL_MASK, x, o));
    return x;
}

// Sum over the whole block, returned to every thread. `scratch` holds >= 32 floats of shared
// memory; blockDim.x must be a multiple of 32. Contains __syncthreads: call from all threads.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    x = warp_sum(x);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(x);
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    x = warp_max(x);
    __syncthreads();
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < nwarps ? scratch[lane] : NEG_INF;
    return warp_max(x);
}

