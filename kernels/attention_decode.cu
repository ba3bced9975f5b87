// attention_decode.cu: attention of new rows against a per-sequence key/value cache, for
// generation (prefill and decoding steps), with GQA, an optional sliding window and optional
// logit soft-capping (Gemma-2), with the scores of training (attention.cu, "math"):
// S = c·q·k, then κ·tanh(S/κ) when the cap κ > 0.
// defines: attention_cache_append_{bf16,f32}, attention_cached_{bf16,f32},
//          attention_cached_combine_{bf16,f32}

#include "attention.cuh"

// ---- generation: attention against a key/value cache -----------------------------------------
//
// Layouts (host: Backend::attention_cached): caches [batch*cap, kv_ld] with kv_ld = n_kv_heads·D,
// sequence b owning rows b·cap .. (b+1)·cap indexed by a shared timeline; q, out
// [batch*new, n_heads·D]; k, v [batch*new, kv_ld]. New row i of sequence b sits at timeline
// t = past + i and sees keys j with lo(t) <= j <= t, lo(t) = max(start[b], t - window + 1).
//
// attention_cache_append_*: copies k, v into cache rows past .. past+new of every sequence
//   (grid-stride, 16-byte vectors when kv_ld allows). A launch of its own, before the attention:
//   the attention CTAs of one call read rows other CTAs' new keys land in.
//
// attention_cached_*: one CTA per (tile of R new rows, key split, kv head and chunk of its query
//   heads, sequence). Its NQ = R x (heads of the chunk) <= ACACHE_QMAX query vectors share the
//   kv head, so every K/V row of the CTA's key range is read from global memory once for all of
//   them. For a decoding step R = 1: each cached row is read once per (sequence, kv head), or once
//   per ACACHE_QMAX query heads when a group is larger. Keys stream in tiles of KT rows (64, 32 or
//   16; the host picks the largest whose double-buffered K/V staging fits ~72 KB) through two
//   shared buffers with cp.async (tile t+1 in flight while tile t is used). Per tile:
//     scores  thread (key kk = tid % KT, query vectors tid/KT + i·128/KT): dot products over the
//             head dim from shared memory (K rows at an odd number of 16-byte chunks apart, so
//             the 8 rows of one quarter-warp hit 8 distinct bank groups; Q broadcast, stored f32
//             and pre-scaled by c·log2 e, or by c/κ with a cap), masked to -inf, into a
//             [NQ, KT] score tile;
//     softmax one warp per query vector: with a cap first s <- κ·log2(e)·tanh(s) on the
//             visible scores; running max m and sum l (base 2, f32), p = 2^(s - m)
//             in place, and the factor alpha that rescales the older partial output;
//     P·V     thread = (16-byte chunk of the head dim, query vector, key part): accumulates
//             Σ_j p_j v_j over the keys kk ≡ part (mod KP) of every tile in f32 registers; KP
//             key parts keep all 128 threads busy when NQ·D is small (KP·NQ·chunks <= 128).
//   At the end the KP partial outputs are summed in a fixed order through shared memory and
//   divided by l (0 when a row sees no key: left padding). With S > 1 key splits (when the
//   grid would not fill the GPU, e.g. decoding a small batch), each split writes its unnormalised
//   output and (m, l) to an f32 workspace and attention_cached_combine_* merges them:
//   o = Σ_s 2^(m_s - M) o_s / Σ_s 2^(m_s - M) l_s, M = max_s m_s, in split order.
//   Cost: decoding reads the cache once (the ideal); a prefill of T new rows runs R rows per CTA
//   against up to T keys with FMA (no tensor cores), O(T²·heads·D) work at FMA speed, roughly
//   10x slower than attention_fwd_hd* would be: acceptable for prompts of a few thousand tokens.
//   Deterministic: fixed loop orders and butterfly reductions; the plan (R, S, KT) is a function
//   of the shape and the GPU's SM count only.

// Query vectors per CTA, and the largest key tile (the host mirrors both in attention.rs).
#define ACACHE_QMAX 8
#define ACACHE_MAX_KT 64

template <typename T>
__device__ __forceinline__ void attn_cache_append(T* __restrict__ k_cache, T* __restrict__ v_cache,
                                                  const T* __restrict__ k,
                                                  const T* __restrict__ v, long long rows,
                                                  int new_rows, int past, int cap, int kv_ld) {
    constexpr int N = Vec<T>::N;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (kv_ld % N == 0) {
        const int cpr = kv_ld / N;
        for (long long x = first; x < rows * cpr; x += stride) {
            const long long r = x / cpr, col = (x % cpr) * N;
            const long long b = r / new_rows, i = r % new_rows;
            const long long dst = (b * cap + past + i) * kv_ld + col, src = r * kv_ld + col;
            store_vec(k_cache + dst, load_vec_ro(k + src));
            store_vec(v_cache + dst, load_vec_ro(v + src));
        }
    } else {
        for (long long x = first; x < rows * kv_ld; x += stride) {
            const long long r = x / kv_ld, col = x % kv_ld;
            const long long b = r / new_rows, i = r % new_rows;
            const long long dst = (b * cap + past + i) * kv_ld + col;
            k_cache[dst] = k[x];
            v_cache[dst] = v[x];
        }
    }
}

// Stage `kt` cache rows (K and V, row stride kv_ld elements in global memory, `nvalid` of them
// valid) into shared memory at row stride `sd`: 16-byte cp.async chunks when the head dim is a
// multiple of the vector width (`vec`; the caller commits and waits), else element copies; rows
// past nvalid and columns past head_dim (up to dpad) are zero-filled.
template <typename T>
__device__ __forceinline__ void attn_cached_stage(T* sK, T* sV, const T* kg, const T* vg,
                                                  long long kv_ld, int nvalid, int kt, int sd,
                                                  int dpad, int head_dim, bool vec) {
    constexpr int N = Vec<T>::N;
    if (vec) {
        const int dc = dpad / N;
        for (int x = threadIdx.x; x < kt * dc; x += ATTN_THREADS) {
            const int r = x / dc, c = (x % dc) * N;
            const bool ok = r < nvalid;
            const long long off = ok ? (long long)r * kv_ld + c : 0;
            attn_cp_async16(attn_smem_addr(sK + r * sd + c), kg + off, ok);
            attn_cp_async16(attn_smem_addr(sV + r * sd + c), vg + off, ok);
        }
    } else {
        for (int x = threadIdx.x; x < kt * dpad; x += ATTN_THREADS) {
            const int r = x / dpad, d = x % dpad;
            const bool ok = r < nvalid && d < head_dim;
            const long long off = (long long)r * kv_ld + d;
            sK[r * sd + d] = ok ? kg[off] : from_f32<T>(0.0f);
            sV[r * sd + d] = ok ? vg[off] : from_f32<T>(0.0f);
        }
    }
}

template <typename T>
__device__ __forceinline__ void attn_cached(T* __restrict__ out, float* __restrict__ part,
                                            const T* __restrict__ q,
                                            const T* __restrict__ k_cache,
                                            const T* __restrict__ v_cache,
                                            const u32* __restrict__ start, int new_rows,
                                            int past, int cap, int n_heads, int n_kv_heads,
                                            int head_dim, int window, float scale,
                                            float softcap, int rows_per_cta, int heads_per_cta, int splits,
                                            int kt) {
    constexpr int N = Vec<T>::N;
    // Score items per thread (KT x NQ over 128 threads) and P·V items per thread (at most
    // NQ x D/N chunks over 128 threads when KP = 1).
    constexpr int QK_ITEMS = ACACHE_QMAX * ACACHE_MAX_KT / ATTN_THREADS;
    constexpr int PV_ITEMS = ACACHE_QMAX * (ATTN_GEN_MAXD / N) / ATTN_THREADS;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;

    // Which rows, heads and keys this CTA serves.
    const int group = n_heads / n_kv_heads;
    const int hchunks = gridDim.y / n_kv_heads;  // chunks of heads_per_cta query heads
    const int kvh = blockIdx.y / hchunks, hc = blockIdx.y % hchunks;
    const int b = blockIdx.z;
    const int split = blockIdx.x % splits, i0 = (blockIdx.x / splits) * rows_per_cta;
    const int nrows = min(rows_per_cta, new_rows - i0);
    const int h0 = kvh * group + hc * heads_per_cta;
    const int nh = min(heads_per_cta, group - hc * heads_per_cta);  // heads of this CTA
    const int nq = nrows * nh;  // query vector qv = (row i0 + qv / nh, head h0 + qv % nh)

    const int dpad = (head_dim + N - 1) / N * N;  // head dim padded to whole 16-byte chunks
    const int dc = dpad / N;
    const int sd = (dc | 1) * N;  // shared row stride: an odd number of 16-byte chunks
    const bool vec = head_dim % N == 0;

    // Shared memory: [2 buffers][K, V][kt][sd] T, then f32 Q [QMAX][dpad], scores [QMAX][kt],
    // alpha, m, l [QMAX]. After the key loop the K/V buffers hold the key-part partial outputs.
    T* sKV = reinterpret_cast<T*>(attn_smem);
    float* sQ = reinterpret_cast<float*>(sKV + 4 * kt * sd);
    float* sS = sQ + ACACHE_QMAX * dpad;
    float* sAlpha = sS + ACACHE_QMAX * kt;
    float* sM = sAlpha + ACACHE_QMAX;
    float* sL = sM + ACACHE_QMAX;
    const u32 need = (u32)(4 * kt * sd * (int)sizeof(T)) +
                     (u32)(4 * ACACHE_QMAX * (dpad + kt + 3));
    if (attn_dynamic_smem() < need || kt > ACACHE_MAX_KT || ATTN_THREADS % kt != 0 ||
        nq > ACACHE_QMAX || head_dim > ATTN_GEN_MAXD)
        __trap();

    // Key range: the union of the rows' ranges (lo is non-decreasing in t), cut into `splits`
    // pieces of whole tiles; this CTA takes piece `split`, [s_lo, s_hi).
    const int st = (int)min(start[b], 0x7fffffffu);
    const int t0 = past + i0;
    const int lo = max(st, window > 0 ? t0 - window + 1 : 0), hi = t0 + nrows - 1;
    const int len = max(0, hi - lo + 1);
    const int per = ((len + splits - 1) / splits + kt - 1) / kt * kt;
    const int s_lo = lo + split * per;
    const int s_hi = min(hi + 1, s_lo + per);
    const int n_tiles = s_hi > s_lo ? (s_hi - s_lo + kt - 1) / kt : 0;

    const long long q_ld = (long long)n_heads * head_dim, kv_ld = (long long)n_kv_heads * head_dim;
    const long long rows_total = (long long)gridDim.z * new_rows;
    // Q's factor, so that a dot product is the base-2 score, or with a cap the tanh argument.
    const float qmul = softcap > 0.0f ? scale / softcap : scale * ATTN_LOG2E;
    for (int x = tid; x < nq * dpad; x += ATTN_THREADS) {
        const int qv = x / dpad, d = x % dpad;
        const long long row = (long long)b * new_rows + i0 + qv / nh;
        const int h = h0 + qv % nh;
        sQ[qv * dpad + d] = d < head_dim ? to_f32(q[row * q_ld + (long long)h * head_dim + d]) * qmul
                                         : 0.0f;
    }

    const T* kb = k_cache + (long long)b * cap * kv_ld + (long long)kvh * head_dim;
    const T* vb = v_cache + (long long)b * cap * kv_ld + (long long)kvh * head_dim;

    // Work split (see the file comment). Score items: key kk, query vectors qv0 + u·qstep.
    const int kk = tid % kt, qv0 = tid / kt, qstep = ATTN_THREADS / kt;
    // P·V items x = tid + 128·i: chunk x % dc, query vector (x / dc) % nq, key part x / (dc·nq).
    int kp = 1;
    while (2 * kp * nq * dc <= ATTN_THREADS && 2 * kp * nq <= 32 && 2 * kp <= kt) kp *= 2;
    const int n_pv = nq * dc * kp;
    float acc[PV_ITEMS][N];
#pragma unroll
    for (int i = 0; i < PV_ITEMS; ++i)
#pragma unroll
        for (int e = 0; e < N; ++e) acc[i][e] = 0.0f;
    // Running max and sum of query vectors warp and warp + 4 (replicated over the lanes).
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.0f, 0.0f};

    // Tile `it` (keys s_lo + it·kt ..) goes to buffer it & 1: [K | V] of kt rows each.
    auto stage = [&](int it) {
        const int j0 = s_lo + it * kt;
        T* sK = sKV + (it & 1) * 2 * kt * sd;
        attn_cached_stage<T>(sK, sK + kt * sd, kb + (long long)j0 * kv_ld,
                             vb + (long long)j0 * kv_ld, kv_ld, min(kt, s_hi - j0), kt, sd, dpad,
                             head_dim, vec);
    };
    if (n_tiles > 0) stage(0);
    attn_cp_async_commit();
    for (int it = 0; it < n_tiles; ++it) {
        const int buf = it & 1;
        if (it + 1 < n_tiles) stage(it + 1);
        attn_cp_async_commit();   // possibly empty: keeps the wait count uniform
        attn_cp_async_wait<1>();  // this thread's copies of tile `it` have landed
        __syncthreads();          // everyone's have (and sQ is written, on the first tile)
        const T* tK = sKV + buf * 2 * kt * sd;
        const T* tV = tK + kt * sd;

        // Scores (base 2, masked).
        {
            float dot[QK_ITEMS];
#pragma unroll
            for (int u = 0; u < QK_ITEMS; ++u) dot[u] = 0.0f;
            const T* kr = tK + kk * sd;
#pragma unroll 1
            for (int c = 0; c < dc; ++c) {
                const Vec<T> kv = *reinterpret_cast<const Vec<T>*>(kr + c * N);
                float kf[N];
#pragma unroll
                for (int e = 0; e < N; ++e) kf[e] = to_f32(kv.v[e]);
#pragma unroll
                for (int u = 0; u < QK_ITEMS; ++u) {
                    const int qv = qv0 + u * qstep;
                    if (qv < nq) {
                        const float4* q4 = reinterpret_cast<const float4*>(sQ + qv * dpad + c * N);
#pragma unroll
                        for (int e = 0; e < N / 4; ++e) {
                            const float4 qq = q4[e];
                            dot[u] += qq.x * kf[4 * e] + qq.y * kf[4 * e + 1] +
                                      qq.z * kf[4 * e + 2] + qq.w * kf[4 * e + 3];
                        }
                    }
                }
            }
            const int j = s_lo + it * kt + kk;
#pragma unroll
            for (int u = 0; u < QK_ITEMS; ++u) {
                const int qv = qv0 + u * qstep;
                if (qv < nq) {
                    const int t = t0 + qv / nh;
                    const int lo_t = max(st, window > 0 ? t - window + 1 : 0);
                    const bool visible = j < s_hi && j <= t && j >= lo_t;
                    sS[qv * kt + kk] = visible ? dot[u] : NEG_INF;
                }
            }
        }
        __syncthreads();

        // Online softmax, one warp per query vector.
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const int qv = warp + 4 * u;
            if (qv < nq) {  // warp-uniform
                float* srow = sS + qv * kt;
                if (softcap > 0.0f) {  // the cap, here rather than in the register-heavy dots
                    const float cap2 = softcap * ATTN_LOG2E;
                    for (int x = lane; x < kt; x += 32)
                        if (srow[x] != NEG_INF) srow[x] = cap2 * tanhf(srow[x]);
                }
                float mx = m_run[u];
                for (int x = lane; x < kt; x += 32) mx = fmaxf(mx, srow[x]);
                mx = warp_max(mx);
                // A row that has seen only masked keys keeps m = -inf; use 0 as the base so that
                // 2^(-inf - base) = 0 instead of NaN.
                const float base = mx == NEG_INF ? 0.0f : mx;
                float sum = 0.0f;
                for (int x = lane; x < kt; x += 32) {
                    const float p = exp2f(srow[x] - base);
                    srow[x] = p;
                    sum += p;
                }
                sum = warp_sum(sum);
                const float alpha = exp2f(m_run[u] - base);
                l_run[u] = l_run[u] * alpha + sum;
                m_run[u] = mx;
                if (lane == 0) sAlpha[qv] = alpha;
            }
        }
        __syncthreads();

        // O = alpha·O + P V over this thread's key part.
#pragma unroll
        for (int i = 0; i < PV_ITEMS; ++i) {
            const int x = tid + i * ATTN_THREADS;
            if (x < n_pv) {
                const int c = (x % dc) * N, qv = (x / dc) % nq, kpart = x / (dc * nq);
                const float alpha = sAlpha[qv];
#pragma unroll
                for (int e = 0; e < N; ++e) acc[i][e] *= alpha;
                const float* prow = sS + qv * kt;
#pragma unroll 2
                for (int key = kpart; key < kt; key += kp) {
                    const float p = prow[key];
                    const Vec<T> vv = *reinterpret_cast<const Vec<T>*>(tV + key * sd + c);
#pragma unroll
                    for (int e = 0; e < N; ++e) acc[i][e] += p * to_f32(vv.v[e]);
                }
            }
        }
        __syncthreads();  // done with this buffer before tile it+2 is staged into it
    }

    // Sum the key parts in a fixed order (through the now idle K/V buffers), then normalise.
#pragma unroll
    for (int u = 0; u < 2; ++u) {
        const int qv = warp + 4 * u;
        if (qv < nq && lane == 0) {
            sM[qv] = m_run[u];
            sL[qv] = l_run[u];
        }
    }
    float* red = reinterpret_cast<float*>(attn_smem);  // [kp][nq][dpad]
#pragma unroll
    for (int i = 0; i < PV_ITEMS; ++i) {
        const int x = tid + i * ATTN_THREADS;
        if (x < n_pv) {
            const int c = (x % dc) * N, qv = (x / dc) % nq, kpart = x / (dc * nq);
            float* dst = red + (kpart * nq + qv) * dpad + c;
#pragma unroll
            for (int e = 0; e < N; ++e) dst[e] = acc[i][e];
        }
    }
    __syncthreads();
    for (int x = tid; x < nq * head_dim; x += ATTN_THREADS) {
        const int qv = x / head_dim, d = x % head_dim;
        float o = 0.0f;
        for (int p = 0; p < kp; ++p) o += red[(p * nq + qv) * dpad + d];
        const long long row = (long long)b * new_rows + i0 + qv / nh;
        const long long col = (long long)(h0 + qv % nh) * head_dim + d;
        if (splits == 1) {
            const float l = sL[qv];
            out[row * q_ld + col] = from_f32<T>(l > 0.0f ? o / l : 0.0f);
        } else {
            part[(split * rows_total + row) * q_ld + col] = o;
        }
    }
    if (splits > 1 && tid < nq) {
        const long long row = (long long)b * new_rows + i0 + tid / nh;
        const int h = h0 + tid % nh;
        float* ml = part + (long long)splits * rows_total * q_ld;  // [splits][rows][n_heads][2]
        ml[((split * rows_total + row) * n_heads + h) * 2] = sM[tid];
        ml[((split * rows_total + row) * n_heads + h) * 2 + 1] = sL[tid];
    }
}

// Merge the key splits: part = [splits][rows][n_heads·D] outputs, then [splits][rows][n_heads]
// (m, l) pairs. One thread per output element, grid-stride.
template <typename T>
__device__ __forceinline__ void attn_cached_combine(T* __restrict__ out,
                                                    const float* __restrict__ part, int rows,
                                                    int n_heads, int head_dim, int splits) {
    const long long total = (long long)rows * n_heads * head_dim;
    const long long heads_total = (long long)rows * n_heads;
    const float* ml = part + (long long)splits * total;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long x = (long long)blockIdx.x * blockDim.x + threadIdx.x; x < total; x += stride) {
        const long long rh = x / head_dim;  // row · n_heads + head
        float m = NEG_INF;
        for (int s = 0; s < splits; ++s) m = fmaxf(m, ml[(s * heads_total + rh) * 2]);
        const float base = m == NEG_INF ? 0.0f : m;
        float l = 0.0f, o = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float w = exp2f(ml[(s * heads_total + rh) * 2] - base);
            l += ml[(s * heads_total + rh) * 2 + 1] * w;
            o += part[s * total + x] * w;
        }
        out[x] = from_f32<T>(l > 0.0f ? o / l : 0.0f);
    }
}

// Shared memory holds attention_cached_* to about three CTAs per SM (the host's key-tile budget),
// so promising ptxas only that many lets it use up to 168 registers: with the bare launch bound
// it aims lower and spills around the soft cap's tanhf.
#define ACACHE_MIN_CTAS 3

#define ATTN_APPEND_ARGS(T)                                                                      \
    T *k_cache, T *v_cache, const T *k, const T *v, long long rows, int new_rows, int past,       \
        int cap, int kv_ld
#define ATTN_CACHED_ARGS(T)                                                                      \
    T *out, float *part, const T *q, const T *k_cache, const T *v_cache, const u32 *start,        \
        int new_rows, int past, int cap, int n_heads, int n_kv_heads, int head_dim, int window,   \
        float scale, float softcap, int rows_per_cta, int heads_per_cta, int splits, int kt
#define ATTN_COMBINE_ARGS(T)                                                                     \
    T *out, const float *part, int rows, int n_heads, int head_dim, int splits

extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_cache_append_bf16(ATTN_APPEND_ARGS(bf16)) {
    attn_cache_append<bf16>(k_cache, v_cache, k, v, rows, new_rows, past, cap, kv_ld);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_cache_append_f32(ATTN_APPEND_ARGS(float)) {
    attn_cache_append<float>(k_cache, v_cache, k, v, rows, new_rows, past, cap, kv_ld);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, ACACHE_MIN_CTAS) attention_cached_bf16(ATTN_CACHED_ARGS(bf16)) {
    attn_cached<bf16>(out, part, q, k_cache, v_cache, start, new_rows, past, cap, n_heads,
                      n_kv_heads, head_dim, window, scale, softcap, rows_per_cta, heads_per_cta,
                      splits, kt);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, ACACHE_MIN_CTAS) attention_cached_f32(ATTN_CACHED_ARGS(float)) {
    attn_cached<float>(out, part, q, k_cache, v_cache, start, new_rows, past, cap, n_heads,
                       n_kv_heads, head_dim, window, scale, softcap, rows_per_cta, heads_per_cta,
                       splits, kt);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_cached_combine_bf16(ATTN_COMBINE_ARGS(bf16)) {
    attn_cached_combine<bf16>(out, part, rows, n_heads, head_dim, splits);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_cached_combine_f32(ATTN_COMBINE_ARGS(float)) {
    attn_cached_combine<float>(out, part, rows, n_heads, head_dim, splits);
}
