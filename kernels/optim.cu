// optim.cu: the optimizer over the flat f32 LoRA buffers.
// defines: adamw_f32, sum_squares_partial_f32
//
// AdamW, torch.optim.AdamW semantics, operation by operation as the CPU reference does it, with
// the step's scalars formed on the host in f64 and rounded to f32 once:
//   g = grad · grad_scale
//   p = p · decay                          decay = 1 - lr · wd
//   m = m + w1 · (g - m)                   w1 = 1 - β1            (torch's lerp)
//   v = v · β2 + (1 - β2) · g²
//   p = p + neg_step · m / (sqrt(v) / bc2_sqrt + eps)     neg_step = -lr / (1 - β1^t),
//                                                         bc2_sqrt = sqrt(1 - β2^t)
// Memory plan: one pass, 16 bytes per access (float4) for the four buffers when the length
// is a multiple of 4 (20 bytes read + 12 written per parameter), grid-stride loop.
//
// Σ g²: pass 1 here, a fixed number of blocks (chosen by the host from the length only) each
// writing one partial sum (thread-strided sums, then the block tree); pass 2 on the host adds the
// partials in index order in f64. Fixed order throughout: bit-identical on repeat.

#include "common.cuh"

__device__ __forceinline__ void adamw_one(float& p, float grad, float& m, float& v,
                                          float grad_scale, float decay, float w1, float beta2,
                                          float one_minus_beta2, float bc2_sqrt, float eps,
                                          float neg_step) {
    const float g = grad * grad_scale;
    p = p * decay;
    m = m + w1 * (g - m);
    v = v * beta2 + one_minus_beta2 * g * g;
    const float denom = sqrtf(v) / bc2_sqrt + eps;
    p = p + neg_step * (m / denom);
}

extern "C" __global__ void adamw_f32(float* __restrict__ p, const float* __restrict__ g,
                                     float* __restrict__ m, float* __restrict__ v, long long len,
                                     float grad_scale, float decay, float w1, float beta2,
                                     float one_minus_beta2, float bc2_sqrt, float eps,
                                     float neg_step) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (len % 4 == 0) {
        float4* p4 = reinterpret_cast<float4*>(p);
        const float4* g4 = reinterpret_cast<const float4*>(g);
        float4* m4 = reinterpret_cast<float4*>(m);
        float4* v4 = reinterpret_cast<float4*>(v);
        for (long long i = start; i < len / 4; i += stride) {
            float4 pp = p4[i], mm = m4[i], vv = v4[i];
            const float4 gg = g4[i];
            adamw_one(pp.x, gg.x, mm.x, vv.x, grad_scale, decay, w1, beta2, one_minus_beta2,
                      bc2_sqrt, eps, neg_step);
            adamw_one(pp.y, gg.y, mm.y, vv.y, grad_scale, decay, w1, beta2, one_minus_beta2,
                      bc2_sqrt, eps, neg_step);
            adamw_one(pp.z, gg.z, mm.z, vv.z, grad_scale, decay, w1, beta2, one_minus_beta2,
                      bc2_sqrt, eps, neg_step);
            adamw_one(pp.w, gg.w, mm.w, vv.w, grad_scale, decay, w1, beta2, one_minus_beta2,
                      bc2_sqrt, eps, neg_step);
            p4[i] = pp;
            m4[i] = mm;
            v4[i] = vv;
        }
    } else {
        for (long long i = start; i < len; i += stride) {
            float pp = p[i], mm = m[i], vv = v[i];
            adamw_one(pp, g[i], mm, vv, grad_scale, decay, w1, beta2, one_minus_beta2, bc2_sqrt,
                      eps, neg_step);
            p[i] = pp;
            m[i] = mm;
            v[i] = vv;
        }
    }
}

// partial[blockIdx.x] = Σ g[i]² over the elements i this block's threads visit.
extern "C" __global__ void sum_squares_partial_f32(float* __restrict__ partial,
                                                   const float* __restrict__ g, long long len) {
    __shared__ float red[32];
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long start = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    float acc = 0.0f;
    if (len % 4 == 0) {
        const float4* g4 = reinterpret_cast<const float4*>(g);
        for (long long i = start; i < len / 4; i += stride) {
            const float4 x = g4[i];
            acc = fmaf(x.x, x.x, acc);
            acc = fmaf(x.y, x.y, acc);
            acc = fmaf(x.z, x.z, acc);
            acc = fmaf(x.w, x.w, acc);
        }
    } else {
        for (long long i = start; i < len; i += stride) acc = fmaf(g[i], g[i], acc);
    }
    acc = block_sum(acc, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}
