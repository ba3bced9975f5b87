// loss.cu: softmax cross-entropy over the vocabulary, gradient written in place.
// defines: cross_entropy_{bf16,f32}, ce_loss_accumulate_f32
//
// Math, per row with target t (t < 0: ignored row, loss 0, gradient 0):
//   M = max_j x_j,  S = Σ_j e^(x_j - M),  lse = M + ln S,  loss = lse - x_t
//   gradient (when requested, scale s):  x_j <- s · (e^(x_j - M) / S - [j = t])
// expf / logf are the IEEE-accurate versions (no --use_fast_math): the loss is compared
// against references to 1e-5 in f32.
//
// Memory plan: one block (512 threads) per row; pass 1 reads the row once with 16-byte loads,
// each thread keeping an online (max, sum) pair; the pairs are merged over the block in a fixed
// tree. Pass 2 (gradient) re-reads the row (an L2 hit for rows up to a few MB) and overwrites it.
// Per-row losses go to a scratch vector; ce_loss_accumulate_f32 (one block) then adds them in
// index order to the accumulator. No atomics, so the same inputs give bit-identical losses.

#include "common.cuh"

#define CE_THREADS 512

// Merge (m2, s2) into (m, s): the sum of exponentials relative to the larger maximum.
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == NEG_INF) return;  // both empty
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

__device__ __forceinline__ void lse_push(float& m, float& s, float x) {
    if (x == NEG_INF) return;
    if (x > m) {
        s = s * expf(m - x) + 1.0f;
        m = x;
    } else {
        s += expf(x - m);
    }
}

template <typename T, int N>
__device__ __forceinline__ void cross_entropy(T* __restrict__ logits,
                                              float* __restrict__ row_loss,
                                              const int* __restrict__ targets, int vocab,
                                              float grad_scale, int write_grad) {
    __shared__ float red_m[32], red_s[32];
    const long long row = blockIdx.x;
    T* p = logits + row * (long long)vocab;
    const int t = targets[row];
    const int nchunk = vocab / N;

    if (t < 0) {  // uniform over the block
        if (write_grad) {
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) p[i] = from_f32<T>(0.0f);
        }
        if (threadIdx.x == 0) row_loss[row] = 0.0f;
        return;
    }
    // Read x_t before any thread can overwrite the row (the reduction below has barriers).
    const float xt = to_f32(p[t]);

    float m = NEG_INF, s = 0.0f;
    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
        if constexpr (N == Vec<T>::N) {
            Vec<T> v = load_vec(p + c * N);
#pragma unroll
            for (int e = 0; e < N; e++) lse_push(m, s, to_f32(v.v[e]));
        } else {
            lse_push(m, s, to_f32(p[c]));
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(FULL_MASK, m, o);
        const float s2 = __shfl_xor_sync(FULL_MASK, s, o);
        lse_merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if (lane == 0) {
        red_m[warp] = m;
        red_s[warp] = s;
    }
    __syncthreads();
    m = lane < nwarps ? red_m[lane] : NEG_INF;
    s = lane < nwarps ? red_s[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(FULL_MASK, m, o);
        const float s2 = __shfl_xor_sync(FULL_MASK, s, o);
        lse_merge(m, s, m2, s2);
    }
    // Every lane of every warp now holds the same (m, s): all warps merged the same values in
    // the same order.
    if (threadIdx.x == 0) row_loss[row] = m + logf(s) - xt;
    if (!write_grad) return;

    const float inv_s = 1.0f / s;
    for (int c = threadIdx.x; c < nchunk; c += blockDim.x) {
        if constexpr (N == Vec<T>::N) {
            Vec<T> v = load_vec(p + c * N);
#pragma unroll
            for (int e = 0; e < N; e++) {
                const int j = c * N + e;
                float g = expf(to_f32(v.v[e]) - m) * inv_s - (j == t ? 1.0f : 0.0f);
                v.v[e] = from_f32<T>(g * grad_scale);
            }
            store_vec(p + c * N, v);
        } else {
            float g = expf(to_f32(p[c]) - m) * inv_s - (c == t ? 1.0f : 0.0f);
            p[c] = from_f32<T>(g * grad_scale);
        }
    }
}

#define CE_ENTRY(T, SUF)                                                                      \
    extern "C" __global__ void __launch_bounds__(CE_THREADS)                                  \
        cross_entropy_##SUF(T* logits, float* row_loss, const int* targets, int vocab,        \
                            float grad_scale, int write_grad) {                               \
        if (vocab % Vec<T>::N == 0)                                                           \
            cross_entropy<T, Vec<T>::N>(logits, row_loss, targets, vocab, grad_scale,         \
                                        write_grad);                                          \
        else                                                                                  \
            cross_entropy<T, 1>(logits, row_loss, targets, vocab, grad_scale, write_grad);    \
    }

CE_ENTRY(bf16, bf16)
CE_ENTRY(float, f32)

// acc[0] += Σ_i row_loss[i], one block, fixed order (thread-strided partial sums, then the
// block tree).
extern "C" __global__ void ce_loss_accumulate_f32(float* acc, const float* row_loss, int n) {
    __shared__ float red[32];
    float x = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) x += row_loss[i];
    x = block_sum(x, red);
    if (threadIdx.x == 0) acc[0] += x;
}
