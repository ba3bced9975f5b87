// attention.cu: causal (optionally sliding-window, optionally soft-capped) softmax attention
// with GQA over variable-length (packed) sequences, forward and backward, for training.
// defines: attention_fwd_{hd64,hd128}_bf16, attention_fwd_{bf16,f32},
//          attention_bwd_preprocess_{bf16,f32},
//          attention_bwd_dkdv_{hd64,hd128}_bf16, attention_bwd_dkdv_{bf16,f32},
//          attention_bwd_dq_{hd64,hd128}_bf16, attention_bwd_dq_{bf16,f32}
// Attention against a key/value cache, for generation, is attention_decode.cu.
//
// ---- layout ----------------------------------------------------------------------------------
// The n token rows hold n_seqs sequences end to end (FlashAttention's cu_seqlens): sequence z
// owns rows cu[z] .. cu[z+1] (cu: n_seqs + 1 ints, cu[0] = 0, cu[n_seqs] = n). Every kernel's
// grid is (tiles of max_len rows, heads, n_seqs); a CTA reads its sequence's start s0 = cu[z]
// and length L = cu[z+1] - s0, returns at once when its tile starts at or past L, and works in
// positions 0 .. L-1 of that sequence only: rows (and keys) past L are zero-filled or skipped,
// never read from the next sequence. q, out, dq, dout: [n, n_heads·D]; k, v, dk, dv:
// [n, n_kv_heads·D]; lse, Δ: [n_heads, n] f32 (lse[h·n + row]).
//
// ---- math ------------------------------------------------------------------------------------
// Per sequence and query head h (kv head g = h / (n_heads / n_kv_heads)), positions i, j within
// the sequence, scale c (1/sqrt(D) for Llama-like models), soft cap κ (0 = none, Gemma-2):
//   R_ij = c · q_i · k_j
//   S_ij = κ·tanh(R_ij / κ)  when κ > 0,  else R_ij
//   visible(i, j) = j <= i  and  (no window or j > i - window)
//   P_ij = exp(S_ij - lse_i),   lse_i = log Σ_{visible j} exp(S_ij)
//   o_i  = Σ_j P_ij v_j
// Backward, given dO:
//   Δ_i   = dO_i · o_i                         (= Σ_j P_ij dP_ij)
//   dP_ij = dO_i · v_j,   dS_ij = P_ij (dP_ij - Δ_i)        (gradient of the capped score)
//   dR_ij = dS_ij · (1 - t_ij²),  t_ij = tanh(R_ij / κ)      (dR = dS when κ = 0)
//   dq_i  = c Σ_j dR_ij k_j,   dk_j = c Σ_{h in group(g)} Σ_i dR_ij q_i,   dv_j = Σ_h Σ_i P_ij dO_i
// Both backward kernels recompute R from q and k, t and S from R, and P from S and the saved lse.
// The softmax runs in base 2: S is multiplied by log2(e) so exp becomes exp2 (without a cap
// the factor c·log2(e) is applied to the dot product at once; with one, t = tanh(dot · c/κ)
// and S·log2(e) = κ·log2(e)·t: AttnScore); the stored lse is natural-log
// (lse = ln2 · (m₂ + log2 ℓ)).
//
// ---- tensor-core kernels (bf16, head_dim D = 64 or 128; FlashAttention-2 schedule) ------------
// 4 warps per CTA, each warp owns 16 rows of the CTA's tile. Tiles are copied global -> shared
// with cp.async (16-byte chunks; rows past the sequence end are zero-filled), shared rows are
// padded to D+8 elements so the 8 row addresses of one ldmatrix hit 8 distinct 16-byte bank
// groups, and fragments come from ldmatrix (.trans where the operand is needed transposed).
// mma.m16n8k16 (bf16 in, f32 accumulate) fragment ownership, g = lane/4, t = lane%4:
//   A 16x16: a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 2t+8..)  a3 (g+8, 2t+8..)
//   B 16x8 : b0 (k 2t..2t+1, n g)  b1 (k 2t+8.., n g)
//   C 16x8 : c0,c1 (g, 2t..2t+1)   c2,c3 (g+8, 2t..2t+1)
// so the C fragments of two adjacent 8-column tiles are, packed to bf16 pairs, exactly the A
// fragment of the next product (P for P·V, dS for dS·K); no shared-memory round trip.
//   forward  : CTA = (64-query tile, head, sequence). Q fragments stay in registers; K/V tiles of
//              64 keys stream through two shared buffers (tile t+1 copied while tile t is used);
//              online softmax in f32 registers (row max/sum over the 4 lanes of a quad).
//   dK, dV   : CTA = (64-key tile, kv head, sequence); each warp owns 16 keys and computes the
//              transposed products Sᵀ = K Qᵀ and dPᵀ = V dOᵀ, so Pᵀ and dSᵀ are its own A
//              fragments for dV += Pᵀ dO and dK += dSᵀ Q. It loops over every query head of the
//              kv head's group and every query tile that sees the key tile (Q/dO tiles double-
//              buffered), accumulating in registers: the GQA sum needs no atomics, and the
//              order is fixed (deterministic).
//   dQ       : CTA = (64-query tile, head, sequence), Q and dO fragments in registers, K/V tiles
//              streamed through two buffers; dQ += dS K.
//   Causal: key tiles wholly above the diagonal, and tiles wholly outside the sliding window,
//   are never visited; the per-element mask is applied only on tiles that need it (which
//   includes every tile that reaches past the sequence end, whose rows are zero-filled).
//   Soft cap: one tanh per score on the f32 accumulators, after the mma and before the mask
//   (AttnScore; with_grad in the backward); κ = 0 skips it (a uniform branch: one kernel
//   family for both).
//   Speed (H200, seq 2048, causal, measured before varlen and the soft cap, not re-measured):
//   ~165 TFLOP/s forward, ~120 backward (counted as 2.5x the forward's FLOPs), about 40% of
//   cuDNN/FA2. The limit is shared-memory traffic: with 16 rows per warp every ldmatrix.x4 of
//   K/V feeds only two mma; 32 rows per warp (BM = 128) would halve it.
//
// head_dim 256 (Gemma-2) runs the generic kernels for now: a tensor-core path for it needs other
// tiles (its Q/dQ/O fragments alone would take 128 registers per thread at 16 rows per warp).
//
// ---- generic kernels (any head_dim <= 256; f32, and bf16 head dims other than 64/128) ----------
// One warp per query row (forward, dQ) or key row (dK, dV); lanes split the 32 keys (queries) of
// a chunk for the dot products, then split the head dimension (lane + 32·c) to accumulate the
// outputs, broadcasting weights with shuffles. Simple FMA code, exact enough for tight tests.
//
// Everything is deterministic: fixed loop orders, butterfly reductions, no atomics.

#include "attention.cuh"

// ---- small helpers ---------------------------------------------------------------------------

// Query i sees key j.
__device__ __forceinline__ bool attn_visible(int i, int j, int seq, int window) {
    return i < seq && j <= i && (window <= 0 || j > i - window);
}

// Whether a (query tile [m0, m0+bm)) x (key tile [n0, n0+bn)) block has any invisible pair
// (beyond the diagonal, outside the window, or past the sequence end).
__device__ __forceinline__ bool attn_tile_needs_mask(int m0, int bm, int n0, int bn, int seq,
                                                     int window) {
    return n0 + bn - 1 > m0 || n0 + bn > seq || m0 + bm > seq ||
           (window > 0 && n0 <= m0 + bm - 1 - window);
}

// How a raw dot product q·k becomes a base-2 score S·log2(e) (see "math"): without a cap
// dot · c·log2(e); with cap κ, t = tanh(dot · c/κ) and the score κ·log2(e)·t, whose derivative
// brings the backward's factor 1 - t². tanhf is the accurate libdevice one (the approximate
// tanh.approx has a relative error near 2^-11, too coarse for the f32 tests).
struct AttnScore {
    float mul;   // c·log2(e), or c/κ with a cap
    float cap2;  // κ·log2(e); 0 without a cap
    __device__ __forceinline__ AttnScore(float scale, float softcap)
        : mul(softcap > 0.0f ? scale / softcap : scale * ATTN_LOG2E),
          cap2(softcap > 0.0f ? softcap * ATTN_LOG2E : 0.0f) {}
    // The base-2 score of a dot product.
    __device__ __forceinline__ float operator()(float dot) const {
        return cap2 > 0.0f ? cap2 * tanhf(dot * mul) : dot * mul;
    }
    // The base-2 score, and in `g` the factor dR/dS = 1 - t² (1 without a cap).
    __device__ __forceinline__ float with_grad(float dot, float& g) const {
        if (cap2 > 0.0f) {
            const float t = tanhf(dot * mul);
            g = 1.0f - t * t;
            return cap2 * t;
        }
        g = 1.0f;
        return dot * mul;
    }
};

// The sequence of CTA z: its first row s0 and its length (cu_seqlens, see "layout").
struct AttnSeq {
    int s0, len;
    __device__ __forceinline__ explicit AttnSeq(const int* __restrict__ cu, int z)
        : s0(cu[z]), len(cu[z + 1] - cu[z]) {}
};

// ---- tensor-core fragment helpers -----------------------------------------------------------

// The A fragment of rows 16·k.. of two adjacent C tiles (cols 0..7 and 8..15), packed to bf16.
__device__ __forceinline__ void attn_c_to_a(u32 (&a)[4], const float (&c0)[4],
                                            const float (&c1)[4]) {
    a[0] = attn_pack_bf16x2(c0[0], c0[1]);
    a[1] = attn_pack_bf16x2(c0[2], c0[3]);
    a[2] = attn_pack_bf16x2(c1[0], c1[1]);
    a[3] = attn_pack_bf16x2(c1[2], c1[3]);
}

// ldmatrix row addresses. A tile stored row-major in shared memory with row stride `sd`
// elements; (r0, c0) is the top-left corner of the 16x16 block wanted.
//  - attn_ld_a: the A fragment of rows r0..r0+15, cols c0..c0+15 (matrices: rows 0-7/8-15 x
//    cols 0-7, then cols 8-15).
//  - attn_ld_b: B fragments (b0, b1) of two n-tiles when the stored rows are the n index and the
//    columns the k index (B = storedᵀ): rows r0..r0+7 -> r[0], r[1]; rows r0+8.. -> r[2], r[3].
//  - attn_ld_b_trans: B fragments of two n-tiles when the stored rows are the k index and the
//    columns the n index: cols c0..c0+7 -> r[0], r[1]; cols c0+8.. -> r[2], r[3].
__device__ __forceinline__ void attn_ld_a(u32 (&r)[4], const u16* s, int sd, int r0, int c0) {
    const int lane = threadIdx.x & 31;
    const int row = r0 + (lane & 7) + ((lane >> 3) & 1) * 8;
    const int col = c0 + (lane >> 4) * 8;
    attn_ldsm_x4(r, attn_smem_addr(s + row * sd + col));
}

__device__ __forceinline__ void attn_ld_b(u32 (&r)[4], const u16* s, int sd, int r0, int c0) {
    const int lane = threadIdx.x & 31;
    const int row = r0 + (lane & 7) + (lane >> 4) * 8;
    const int col = c0 + ((lane >> 3) & 1) * 8;
    attn_ldsm_x4(r, attn_smem_addr(s + row * sd + col));
}

__device__ __forceinline__ void attn_ld_b_trans(u32 (&r)[4], const u16* s, int sd, int r0,
                                                int c0) {
    const int lane = threadIdx.x & 31;
    const int row = r0 + (lane & 7) + ((lane >> 3) & 1) * 8;
    const int col = c0 + (lane >> 4) * 8;
    attn_ldsm_x4_trans(r, attn_smem_addr(s + row * sd + col));
}

// Copy ROWS x D bf16 (row stride `ld` elements in global memory) into shared memory with row
// stride D+8; rows >= nvalid are zero-filled. `g` points at row 0 (which is always valid).
// Issued by all ATTN_THREADS threads; the caller commits and waits.
template <int ROWS, int D>
__device__ __forceinline__ void attn_load_tile(u16* s, const u16* g, long long ld, int nvalid) {
    constexpr int CPR = D / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < ROWS * CPR; c += ATTN_THREADS) {
        const int r = c / CPR, col = (c % CPR) * 8;
        const bool ok = r < nvalid;
        const u16* src = ok ? g + r * ld + col : g;
        attn_cp_async16(attn_smem_addr(s + r * (D + 8) + col), src, ok);
    }
}

// ---- tile configuration (the host side mirrors these numbers in attention.rs) ------------------
// Shared rows are D+8 bf16 (2·(D+8) bytes). One tile ahead is always in flight (cp.async).
// forward : BM = 64 queries, BN = 64 keys; buffers K0 V0 K1 V1 (the Q tile is staged in K0):
//           smem = 4 · 64 rows
// dK/dV   : BN = 64 keys, BM = 64 (D=64) or 32 (D=128) queries; K V + double-buffered Q dO,
//           lse and Δ: smem = (2·BN + 4·BM) rows + 4·BM floats
// dQ      : BM = 64 queries, BN = 64 (D=64) or 32 (D=128) keys; Q, dO staged, then
//           double-buffered K V in the same space: smem = max(2·BM, 4·BN) rows
template <int D> struct AttnBwdTile {
    static constexpr int SMALL = D >= 128 ? 32 : 64;
};

// ---- forward, tensor cores -------------------------------------------------------------------

template <int D>
__device__ __forceinline__ void attn_fwd_mma(bf16* __restrict__ out_, float* __restrict__ lse,
                                             const bf16* __restrict__ q_,
                                             const bf16* __restrict__ k_,
                                             const bf16* __restrict__ v_,
                                             const int* __restrict__ cu, int n, int n_heads,
                                             int n_kv_heads, int window, float scale,
                                             float softcap) {
    constexpr int BM = 64, BN = 64, SD = D + 8, KS = D / 16;
    if (attn_dynamic_smem() < (u32)(4 * BN * SD * 2)) __trap();
    const AttnSeq sq(cu, blockIdx.z);
    const int seq = sq.len;
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;  // longest (last) tiles start first
    if (m0 >= seq) return;  // the whole CTA: this sequence is shorter than the tile's start
    // Buffers: [K0 V0 K1 V1], each BN x SD; the Q tile is staged in K0 first.
    u16* sK = reinterpret_cast<u16*>(attn_smem);
    const u16* q = reinterpret_cast<const u16*>(q_);
    const u16* k = reinterpret_cast<const u16*>(k_);
    const u16* v = reinterpret_cast<const u16*>(v_);
    u16* out = reinterpret_cast<u16*>(out_);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const long long q_ld = (long long)n_heads * D, kv_ld = (long long)n_kv_heads * D;
    const u16* qt = q + ((long long)sq.s0 + m0) * q_ld + h * D;
    const u16* kb = k + (long long)sq.s0 * kv_ld + kvh * D;
    const u16* vb = v + (long long)sq.s0 * kv_ld + kvh * D;
    const AttnScore score(scale, softcap);

    // Q tile -> shared (K's buffer) -> A fragments in registers.
    attn_load_tile<BM, D>(sK, qt, q_ld, seq - m0);
    attn_cp_async_commit();
    attn_cp_async_wait<0>();
    __syncthreads();
    u32 qf[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) attn_ld_a(qf[ks], sK, SD, warp * 16, ks * 16);
    __syncthreads();  // every warp holds its Q before K overwrites the buffer

    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.0f, 0.0f};
    const int row0 = m0 + warp * 16 + (lane >> 2);  // rows row0 (c0,c1) and row0+8 (c2,c3)
    const int col_in = 2 * (lane & 3);

    const int k_hi = min(seq, m0 + BM);
    const int k_lo = window > 0 ? max(0, m0 - window + 1) : 0;
    const int n_first = (k_lo / BN) * BN;
    const int n_tiles = (k_hi - n_first + BN - 1) / BN;  // >= 1
    // Two (K, V) buffers: tile t+1 is copied while tile t is used. Two copy groups per tile
    // (K, then V), and two (possibly empty) groups committed every iteration, so the waits
    // below always count the same.
    attn_load_tile<BN, D>(sK, kb + (long long)n_first * kv_ld, kv_ld, seq - n_first);
    attn_cp_async_commit();
    attn_load_tile<BN, D>(sK + BN * SD, vb + (long long)n_first * kv_ld, kv_ld, seq - n_first);
    attn_cp_async_commit();
    for (int t = 0; t < n_tiles; ++t) {
        const int n0 = n_first + t * BN;
        const u16* sKt = sK + (t & 1) * 2 * BN * SD;
        const u16* sVt = sKt + BN * SD;
        if (t + 1 < n_tiles) {
            u16* nK = sK + ((t + 1) & 1) * 2 * BN * SD;
            attn_load_tile<BN, D>(nK, kb + (long long)(n0 + BN) * kv_ld, kv_ld, seq - n0 - BN);
            attn_cp_async_commit();
            attn_load_tile<BN, D>(nK + BN * SD, vb + (long long)(n0 + BN) * kv_ld, kv_ld,
                                  seq - n0 - BN);
            attn_cp_async_commit();
        } else {
            attn_cp_async_commit();
            attn_cp_async_commit();
        }
        attn_cp_async_wait<3>();  // K of tile t has landed (V_t, K_t+1, V_t+1 may be in flight)
        __syncthreads();

        // S = Q Kᵀ for this warp's 16 rows x 64 keys.
        float s[BN / 8][4];
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                u32 kf[4];
                attn_ld_b(kf, sKt, SD, np * 16, ks * 16);
                attn_mma(s[2 * np], qf[ks], kf[0], kf[1]);
                attn_mma(s[2 * np + 1], qf[ks], kf[2], kf[3]);
            }
        }

        // Scale (and cap) to base 2, and mask.
        const bool masked = attn_tile_needs_mask(m0, BM, n0, BN, seq, window);
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = score(s[nt][e]);
                if (masked) {
                    const int i = row0 + (e >> 1) * 8, j = n0 + nt * 8 + col_in + (e & 1);
                    if (!attn_visible(i, j, seq, window)) x = NEG_INF;
                }
                s[nt][e] = x;
            }
        }

        // Online softmax: new running max, rescale the old sum and output, P = 2^(s - m).
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = m_run[r];
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt)
                mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
            // A row that has seen only masked keys keeps m = -inf; use 0 as the base so that
            // 2^(-inf - base) = 0 instead of NaN.
            const float base = mx == NEG_INF ? 0.0f : mx;
            const float alpha = attn_exp2(m_run[r] - base);
            m_run[r] = mx;
            float sum = 0.0f;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt) {
                const float p0 = attn_exp2(s[nt][2 * r] - base);
                const float p1 = attn_exp2(s[nt][2 * r + 1] - base);
                s[nt][2 * r] = p0;
                s[nt][2 * r + 1] = p1;
                sum += p0 + p1;
            }
            l_run[r] = l_run[r] * alpha + sum;  // this lane's partial sum (its 2 of 8 columns)
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                o[dt][2 * r] *= alpha;
                o[dt][2 * r + 1] *= alpha;
            }
        }

        attn_cp_async_wait<2>();  // V of tile t has landed
        __syncthreads();

        // O += P V
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            u32 pa[4];
            attn_c_to_a(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                u32 vf[4];
                attn_ld_b_trans(vf, sVt, SD, kk * 16, dp * 16);
                attn_mma(o[2 * dp], pa, vf[0], vf[1]);
                attn_mma(o[2 * dp + 1], pa, vf[2], vf[3]);
            }
        }
        __syncthreads();  // all warps are done with this buffer before tile t+2 is copied in
    }

    // Normalise, store O and lse.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l = l_run[r];
        l += __shfl_xor_sync(FULL_MASK, l, 1);
        l += __shfl_xor_sync(FULL_MASK, l, 2);
        const int i = row0 + r * 8;
        if (i < seq) {
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            u16* orow = out + ((long long)sq.s0 + i) * q_ld + h * D + col_in;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt)
                *reinterpret_cast<u32*>(orow + dt * 8) =
                    attn_pack_bf16x2(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
            if ((lane & 3) == 0)
                lse[(long long)h * n + sq.s0 + i] = (m_run[r] + log2f(l)) * ATTN_LN2;
        }
    }
}

// ---- backward preprocess: Δ = rowsum(dO ∘ O) -------------------------------------------------

// One warp per (token row, head); delta: [n_heads, rows] (rows = n, every sequence).
template <typename T>
__device__ __forceinline__ void attn_bwd_preprocess(float* __restrict__ delta,
                                                    const T* __restrict__ dout,
                                                    const T* __restrict__ out, int rows,
                                                    int n_heads, int head_dim) {
    const int lane = threadIdx.x & 31;
    const long long w = (long long)blockIdx.x * ATTN_WARPS + (threadIdx.x >> 5);
    if (w >= (long long)rows * n_heads) return;
    const long long n = w / n_heads;
    const int h = (int)(w % n_heads);
    const long long off = n * n_heads * head_dim + (long long)h * head_dim;
    float acc = 0.0f;
    for (int d = lane; d < head_dim; d += 32) acc += to_f32(dout[off + d]) * to_f32(out[off + d]);
    acc = warp_sum(acc);
    if (lane == 0) delta[(long long)h * rows + n] = acc;
}

// ---- backward dK, dV, tensor cores ------------------------------------------------------------

// Issue the copies of one query-side tile of the dK/dV loop (query head h, rows m0..m0+BM-1)
// into one buffer: Q and dO with cp.async (the caller commits), lse (times log2 e) and Δ with
// plain stores at `stats` and `stats + 2*BM`. Rows past the sequence end (s0, seq) get zeros.
template <int BM, int D>
__device__ __forceinline__ void attn_dkdv_issue(u16* sQO, float* stats, const u16* q,
                                                const u16* dout, const float* lse,
                                                const float* delta, int s0, int h, int m0,
                                                int seq, int n, long long q_ld) {
    const long long qoff = ((long long)s0 + m0) * q_ld + h * D;
    attn_load_tile<BM, D>(sQO, q + qoff, q_ld, seq - m0);
    attn_load_tile<BM, D>(sQO + BM * (D + 8), dout + qoff, q_ld, seq - m0);
    const long long soff = (long long)h * n + s0 + m0;
    for (int r = threadIdx.x; r < BM; r += ATTN_THREADS) {
        const bool ok = m0 + r < seq;
        stats[r] = ok ? lse[soff + r] * ATTN_LOG2E : 0.0f;
        stats[2 * BM + r] = ok ? delta[soff + r] : 0.0f;
    }
}

template <int D>
__device__ __forceinline__ void attn_bwd_dkdv_mma(
    bf16* __restrict__ dk_, bf16* __restrict__ dv_, const bf16* __restrict__ dout_,
    const float* __restrict__ lse, const float* __restrict__ delta, const bf16* __restrict__ q_,
    const bf16* __restrict__ k_, const bf16* __restrict__ v_, const int* __restrict__ cu, int n,
    int n_heads, int n_kv_heads, int window, float scale, float softcap) {
    constexpr int BN = 64, BM = AttnBwdTile<D>::SMALL, SD = D + 8, KS = D / 16;
    if (attn_dynamic_smem() < (u32)((2 * BN + 4 * BM) * SD * 2 + 4 * BM * 4)) __trap();
    const AttnSeq sq(cu, blockIdx.z);
    const int seq = sq.len, s0 = sq.s0;
    const int n0 = blockIdx.x * BN;  // the first key tiles see the most queries: start them first
    if (n0 >= seq) return;           // the whole CTA
    // [K V | Q0 dO0 | Q1 dO1] bf16 tiles, then lse0 lse1 delta0 delta1 (BM floats each): the
    // query side is double-buffered (tile it+1 is copied while tile it is used).
    u16* sK = reinterpret_cast<u16*>(attn_smem);
    u16* sV = sK + BN * SD;
    u16* sQO = sV + BN * SD;
    float* sStats = reinterpret_cast<float*>(sQO + 4 * BM * SD);

    const u16* q = reinterpret_cast<const u16*>(q_);
    const u16* k = reinterpret_cast<const u16*>(k_);
    const u16* v = reinterpret_cast<const u16*>(v_);
    const u16* dout = reinterpret_cast<const u16*>(dout_);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int kvh = blockIdx.y;
    const int group = n_heads / n_kv_heads;
    const long long q_ld = (long long)n_heads * D, kv_ld = (long long)n_kv_heads * D;
    const AttnScore score(scale, softcap);

    attn_load_tile<BN, D>(sK, k + ((long long)s0 + n0) * kv_ld + kvh * D, kv_ld, seq - n0);
    attn_load_tile<BN, D>(sV, v + ((long long)s0 + n0) * kv_ld + kvh * D, kv_ld, seq - n0);
    attn_cp_async_commit();

    float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.0f;

    const int key0 = n0 + warp * 16 + (lane >> 2);  // keys key0 (c0,c1) and key0+8 (c2,c3)
    const int col_in = 2 * (lane & 3);
    const int q_lo = n0;
    const int q_hi = window > 0 ? min(seq, n0 + BN - 1 + window) : seq;

    // The work list: every query head of the group, and for each every query tile that sees
    // this key tile, flattened to one index so the next tile's copy overlaps this one's math.
    const int m_first = (q_lo / BM) * BM;
    const int n_qt = (q_hi - m_first + BM - 1) / BM;  // >= 1
    const int n_iter = group * n_qt;
    attn_dkdv_issue<BM, D>(sQO, sStats, q, dout, lse, delta, s0, kvh * group, m_first, seq, n,
                           q_ld);
    attn_cp_async_commit();
    for (int it = 0; it < n_iter; ++it) {
        const int m0 = m_first + (it % n_qt) * BM;
        const u16* sQ = sQO + (it & 1) * 2 * BM * SD;
        const u16* sO = sQ + BM * SD;  // dO
        const float* sLse = sStats + (it & 1) * BM;  // lse * log2(e)
        const float* sDelta = sStats + (2 + (it & 1)) * BM;
        if (it + 1 < n_iter) {
            const int nx = it + 1;
            attn_dkdv_issue<BM, D>(sQO + (nx & 1) * 2 * BM * SD, sStats + (nx & 1) * BM, q, dout,
                                   lse, delta, s0, kvh * group + nx / n_qt,
                                   m_first + (nx % n_qt) * BM, seq, n, q_ld);
        }
        attn_cp_async_commit();  // possibly empty: keeps the wait count uniform
        attn_cp_async_wait<1>();  // K, V and this tile have landed
        __syncthreads();

        // Sᵀ = K Qᵀ (16 keys x BM queries) and dPᵀ = V dOᵀ.
        float st[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
        for (int nt = 0; nt < BM / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            u32 kf[4], vf[4];
            attn_ld_a(kf, sK, SD, warp * 16, ks * 16);
            attn_ld_a(vf, sV, SD, warp * 16, ks * 16);
#pragma unroll
            for (int np = 0; np < BM / 16; ++np) {
                u32 qb[4], ob[4];
                attn_ld_b(qb, sQ, SD, np * 16, ks * 16);
                attn_ld_b(ob, sO, SD, np * 16, ks * 16);
                attn_mma(st[2 * np], kf, qb[0], qb[1]);
                attn_mma(st[2 * np + 1], kf, qb[2], qb[3]);
                attn_mma(dpt[2 * np], vf, ob[0], ob[1]);
                attn_mma(dpt[2 * np + 1], vf, ob[2], ob[3]);
            }
        }

        // Pᵀ = 2^(Sᵀ·log2e - lse₂) from the recomputed (capped) scores, zero where invisible;
        // dRᵀ = Pᵀ (dPᵀ - Δ) (1 - t²).
        const bool masked = attn_tile_needs_mask(m0, BM, n0, BN, seq, window);
#pragma unroll
        for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int jj = key0 + (e >> 1) * 8;             // key
                const int ii = nt * 8 + col_in + (e & 1);       // query within the tile
                float g;
                const float x = score.with_grad(st[nt][e], g);
                float p = attn_exp2(x - sLse[ii]);
                if (masked && !attn_visible(m0 + ii, jj, seq, window)) p = 0.0f;
                st[nt][e] = p;
                dpt[nt][e] = p * (dpt[nt][e] - sDelta[ii]) * g;
            }
        }

        // dV += Pᵀ dO, dK += dRᵀ Q (c applied at the end).
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
            u32 pa[4], da[4];
            attn_c_to_a(pa, st[2 * kk], st[2 * kk + 1]);
            attn_c_to_a(da, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
            for (int dp = 0; dp < D / 16; ++dp) {
                u32 ob[4], qb[4];
                attn_ld_b_trans(ob, sO, SD, kk * 16, dp * 16);
                attn_mma(dv[2 * dp], pa, ob[0], ob[1]);
                attn_mma(dv[2 * dp + 1], pa, ob[2], ob[3]);
                attn_ld_b_trans(qb, sQ, SD, kk * 16, dp * 16);
                attn_mma(dk[2 * dp], da, qb[0], qb[1]);
                attn_mma(dk[2 * dp + 1], da, qb[2], qb[3]);
            }
        }
        __syncthreads();  // done with this buffer before tile it+2 is copied in
    }

    bf16* dkp = dk_;
    bf16* dvp = dv_;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = key0 + r * 8;
        if (j < seq) {
            const long long off = ((long long)s0 + j) * kv_ld + kvh * D + col_in;
            u16* dkr = reinterpret_cast<u16*>(dkp) + off;
            u16* dvr = reinterpret_cast<u16*>(dvp) + off;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                *reinterpret_cast<u32*>(dkr + dt * 8) =
                    attn_pack_bf16x2(dk[dt][2 * r] * scale, dk[dt][2 * r + 1] * scale);
                *reinterpret_cast<u32*>(dvr + dt * 8) =
                    attn_pack_bf16x2(dv[dt][2 * r], dv[dt][2 * r + 1]);
            }
        }
    }
}

// ---- backward dQ, tensor cores -----------------------------------------------------------------

template <int D>
__device__ __forceinline__ void attn_bwd_dq_mma(bf16* __restrict__ dq_,
                                                const bf16* __restrict__ dout_,
                                                const float* __restrict__ lse,
                                                const float* __restrict__ delta,
                                                const bf16* __restrict__ q_,
                                                const bf16* __restrict__ k_,
                                                const bf16* __restrict__ v_,
                                                const int* __restrict__ cu, int n, int n_heads,
                                                int n_kv_heads, int window, float scale,
                                                float softcap) {
    constexpr int BM = 64, BN = AttnBwdTile<D>::SMALL, SD = D + 8, KS = D / 16;
    constexpr int ROWS = 2 * BM > 4 * BN ? 2 * BM : 4 * BN;
    if (attn_dynamic_smem() < (u32)(ROWS * SD * 2)) __trap();
    const AttnSeq sq(cu, blockIdx.z);
    const int seq = sq.len, s0 = sq.s0;
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
    if (m0 >= seq) return;  // the whole CTA
    // Q and dO are staged in the first 2*BM rows; then the same space holds two (K, V) buffers
    // [K0 V0 K1 V1] of BN rows each.
    u16* sQ = reinterpret_cast<u16*>(attn_smem);
    u16* sO = sQ + BM * SD;
    u16* sKV = sQ;

    const u16* q = reinterpret_cast<const u16*>(q_);
    const u16* k = reinterpret_cast<const u16*>(k_);
    const u16* v = reinterpret_cast<const u16*>(v_);
    const u16* dout = reinterpret_cast<const u16*>(dout_);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const long long q_ld = (long long)n_heads * D, kv_ld = (long long)n_kv_heads * D;
    const long long qoff = ((long long)s0 + m0) * q_ld + h * D;
    const u16* kb = k + (long long)s0 * kv_ld + kvh * D;
    const u16* vb = v + (long long)s0 * kv_ld + kvh * D;
    const AttnScore score(scale, softcap);

    attn_load_tile<BM, D>(sQ, q + qoff, q_ld, seq - m0);
    attn_load_tile<BM, D>(sO, dout + qoff, q_ld, seq - m0);
    attn_cp_async_commit();
    attn_cp_async_wait<0>();
    __syncthreads();
    u32 qf[KS][4], of[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        attn_ld_a(qf[ks], sQ, SD, warp * 16, ks * 16);
        attn_ld_a(of[ks], sO, SD, warp * 16, ks * 16);
    }
    __syncthreads();  // every warp holds its fragments before K/V overwrite the staging

    const int row0 = m0 + warp * 16 + (lane >> 2);
    const int col_in = 2 * (lane & 3);
    const float* lse_h = lse + (long long)h * n + s0;
    const float* delta_h = delta + (long long)h * n + s0;
    float lse2[2], dlt[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = row0 + r * 8;
        lse2[r] = i < seq ? lse_h[i] * ATTN_LOG2E : 0.0f;
        dlt[r] = i < seq ? delta_h[i] : 0.0f;
    }

    float dq[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.0f;

    const int k_hi = min(seq, m0 + BM);
    const int k_lo = window > 0 ? max(0, m0 - window + 1) : 0;
    const int n_first = (k_lo / BN) * BN;
    const int n_tiles = (k_hi - n_first + BN - 1) / BN;  // >= 1
    // One copy group per (K, V) tile, tile t+1 in flight while tile t is used; an empty group is
    // committed after the last tile so the wait below always counts the same.
    attn_load_tile<BN, D>(sKV, kb + (long long)n_first * kv_ld, kv_ld, seq - n_first);
    attn_load_tile<BN, D>(sKV + BN * SD, vb + (long long)n_first * kv_ld, kv_ld, seq - n_first);
    attn_cp_async_commit();
    for (int t = 0; t < n_tiles; ++t) {
        const int n0 = n_first + t * BN;
        const u16* sK = sKV + (t & 1) * 2 * BN * SD;
        const u16* sV = sK + BN * SD;
        if (t + 1 < n_tiles) {
            u16* nK = sKV + ((t + 1) & 1) * 2 * BN * SD;
            attn_load_tile<BN, D>(nK, kb + (long long)(n0 + BN) * kv_ld, kv_ld, seq - n0 - BN);
            attn_load_tile<BN, D>(nK + BN * SD, vb + (long long)(n0 + BN) * kv_ld, kv_ld,
                                  seq - n0 - BN);
        }
        attn_cp_async_commit();
        attn_cp_async_wait<1>();  // tile t has landed
        __syncthreads();

        // S = Q Kᵀ and dP = dO Vᵀ (16 rows x BN keys).
        float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
            for (int np = 0; np < BN / 16; ++np) {
                u32 kf[4], vf[4];
                attn_ld_b(kf, sK, SD, np * 16, ks * 16);
                attn_ld_b(vf, sV, SD, np * 16, ks * 16);
                attn_mma(s[2 * np], qf[ks], kf[0], kf[1]);
                attn_mma(s[2 * np + 1], qf[ks], kf[2], kf[3]);
                attn_mma(dp[2 * np], of[ks], vf[0], vf[1]);
                attn_mma(dp[2 * np + 1], of[ks], vf[2], vf[3]);
            }
        }

        // dR = P (dP - Δ) (1 - t²), P = 2^(S·log2e - lse₂) from the recomputed (capped) scores,
        // zero where invisible.
        const bool masked = attn_tile_needs_mask(m0, BM, n0, BN, seq, window);
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                const int j = n0 + nt * 8 + col_in + (e & 1);
                float g;
                const float x = score.with_grad(s[nt][e], g);
                float p = attn_exp2(x - lse2[r]);
                if (masked && !attn_visible(row0 + r * 8, j, seq, window)) p = 0.0f;
                s[nt][e] = p * (dp[nt][e] - dlt[r]) * g;
            }
        }

        // dQ += dR K (c applied at the end).
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
            u32 da[4];
            attn_c_to_a(da, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
            for (int dpp = 0; dpp < D / 16; ++dpp) {
                u32 kb2[4];
                attn_ld_b_trans(kb2, sK, SD, kk * 16, dpp * 16);
                attn_mma(dq[2 * dpp], da, kb2[0], kb2[1]);
                attn_mma(dq[2 * dpp + 1], da, kb2[2], kb2[3]);
            }
        }
        __syncthreads();  // all warps are done with this buffer before tile t+2 is copied in
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int i = row0 + r * 8;
        if (i < seq) {
            u16* dqr = reinterpret_cast<u16*>(dq_) + ((long long)s0 + i) * q_ld + h * D + col_in;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt)
                *reinterpret_cast<u32*>(dqr + dt * 8) =
                    attn_pack_bf16x2(dq[dt][2 * r] * scale, dq[dt][2 * r + 1] * scale);
        }
    }
}

// ---- generic kernels (any head_dim <= ATTN_GEN_MAXD) --------------------------------------------

// Forward: one warp per query row; grid (ceil(max_len / 4), n_heads, n_seqs).
template <typename T>
__device__ __forceinline__ void attn_fwd_generic(T* __restrict__ out, float* __restrict__ lse,
                                                 const T* __restrict__ q,
                                                 const T* __restrict__ k,
                                                 const T* __restrict__ v,
                                                 const int* __restrict__ cu, int n, int n_heads,
                                                 int n_kv_heads, int head_dim, int window,
                                                 float scale, float softcap) {
    __shared__ float sq[ATTN_WARPS][ATTN_GEN_MAXD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * ATTN_WARPS + warp;
    const int h = blockIdx.y;
    const AttnSeq z(cu, blockIdx.z);
    if (i >= z.len) return;  // whole warp; no block-wide barrier below
    const int kvh = h / (n_heads / n_kv_heads);
    const long long q_ld = (long long)n_heads * head_dim, kv_ld = (long long)n_kv_heads * head_dim;
    const T* qr = q + ((long long)z.s0 + i) * q_ld + (long long)h * head_dim;
    const T* kb = k + (long long)z.s0 * kv_ld + (long long)kvh * head_dim;
    const T* vb = v + (long long)z.s0 * kv_ld + (long long)kvh * head_dim;
    const AttnScore score(scale, softcap);
    for (int d = lane; d < head_dim; d += 32) sq[warp][d] = to_f32(qr[d]);
    __syncwarp();

    float acc[ATTN_GEN_PER_LANE];
#pragma unroll
    for (int c = 0; c < ATTN_GEN_PER_LANE; ++c) acc[c] = 0.0f;
    float m = NEG_INF, l = 0.0f;
    const int lo = window > 0 ? max(0, i - window + 1) : 0;
    for (int j0 = lo; j0 <= i; j0 += 32) {
        const int j = j0 + lane;
        float s = NEG_INF;
        if (j <= i) {
            const T* kr = kb + (long long)j * kv_ld;
            float dot = 0.0f;
            for (int d = 0; d < head_dim; ++d) dot += sq[warp][d] * to_f32(kr[d]);
            s = score(dot);
        }
        const float mx = fmaxf(m, warp_max(s));  // finite: lane 0 always has a visible key
        const float alpha = exp2f(m - mx);
        const float p = j <= i ? exp2f(s - mx) : 0.0f;
        l = l * alpha + warp_sum(p);
        m = mx;
#pragma unroll
        for (int c = 0; c < ATTN_GEN_PER_LANE; ++c) acc[c] *= alpha;
        const int cnt = min(32, i - j0 + 1);
        for (int jj = 0; jj < cnt; ++jj) {
            const float pj = __shfl_sync(FULL_MASK, p, jj);
            const T* vr = vb + (long long)(j0 + jj) * kv_ld;
#pragma unroll
            for (int c = 0; c < ATTN_GEN_PER_LANE; ++c) {
                const int d = lane + 32 * c;
                if (d < head_dim) acc[c] += pj * to_f32(vr[d]);
            }
        }
    }
    const float inv = 1.0f / l;
    T* orow = out + ((long long)z.s0 + i) * q_ld + (long long)h * head_dim;
#pragma unroll
    for (int c = 0; c < ATTN_GEN_PER_LANE; ++c) {
        const int d = lane + 32 * c;
        if (d < head_dim) orow[d] = from_f32<T>(acc[c] * inv);
    }
    if (lane == 0) lse[(long long)h * n + z.s0 + i] = (m + log2f(l)) * ATTN_LN2;
}

// dK, dV: one warp per key row j of kv head g; loops over the group's query heads and the
// queries that see j. grid (ceil(max_len / 4), n_kv_heads, n_seqs).
template <typename T>
__device__ __forceinline__ void attn_bwd_dkdv_generic(
    T* __restrict__ dk, T* __restrict__ dv, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, const T* __restrict__ q,
    const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ cu, int n,
    int n_heads, int n_kv_heads, int head_dim, int window, float scale, float softcap) {
    __shared__ float sk[ATTN_WARPS][ATTN_GEN_MAXD];
    __shared__ float sv[ATTN_WARPS][ATTN_GEN_MAXD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = blockIdx.x * ATTN_WARPS + warp;
    const int kvh = blockIdx.y;
    const AttnSeq z(cu, blockIdx.z);
    const int seq = z.len;
    if (j >= seq) return;
    const int group = n_heads / n_kv_heads;
    const long long q_ld = (long long)n_heads * head_dim, kv_ld = (long long)n_kv_heads * head_dim;
    const long long kv_off = ((long long)z.s0 + j) * kv_ld + (long long)kvh * head_dim;
    const AttnScore score(scale, softcap);
    for (int d = lane; d < head_dim; d += 32) {
        sk[warp][d] = to_f32(k[kv_off + d]);
        sv[warp][d] = to_f32(v[kv_off + d]);
    }
    __syncwarp();

    float gk[ATTN_GEN_PER_LANE], gv[ATTN_GEN_PER_LANE];
#pragma unroll
    for (int c = 0; c < ATTN_GEN_PER_LANE; ++c) gk[c] = gv[c] = 0.0f;
    const int hi = window > 0 ? min(seq, j + window) : seq;  // queries j .. hi-1 see key j
    for (int hh = 0; hh < group; ++hh) {
        const int h = kvh * group + hh;
        const T* qb = q + (long long)z.s0 * q_ld + (long long)h * head_dim;
        const T* ob = dout + (long long)z.s0 * q_ld + (long long)h * head_dim;
        const float* lse_h = lse + (long long)h * n + z.s0;
        const float* delta_h = delta + (long long)h * n + z.s0;
        for (int i0 = j; i0 < hi; i0 += 32) {
            const int i = i0 + lane;
            float p = 0.0f, ds = 0.0f;
            if (i < hi) {
                const T* qr = qb + (long long)i * q_ld;
                const T* orow = ob + (long long)i * q_ld;
                float s = 0.0f, dp = 0.0f;
                for (int d = 0; d < head_dim; ++d) {
                    s += sk[warp][d] * to_f32(qr[d]);
                    dp += sv[warp][d] * to_f32(orow[d]);
                }
                float g;
                p = exp2f(score.with_grad(s, g) - lse_h[i] * ATTN_LOG2E);
                ds = p * (dp - delta_h[i]) * g;
            }
            const int cnt = min(32, hi - i0);
            for (int ii = 0; ii < cnt; ++ii) {
                const float pi = __shfl_sync(FULL_MASK, p, ii);
                const float dsi = __shfl_sync(FULL_MASK, ds, ii);
                const T* qr = qb + (long long)(i0 + ii) * q_ld;
                const T* orow = ob + (long long)(i0 + ii) * q_ld;
#pragma unroll
                for (int c = 0; c < ATTN_GEN_PER_LANE; ++c) {
                    const int d = lane + 32 * c;
                    if (d < head_dim) {
                        gv[c] += pi * to_f32(orow[d]);
                        gk[c] += dsi * to_f32(qr[d]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < ATTN_GEN_PER_LANE; ++c) {
        const int d = lane + 32 * c;
        if (d < head_dim) {
            dk[kv_off + d] = from_f32<T>(gk[c] * scale);
            dv[kv_off + d] = from_f32<T>(gv[c]);
        }
    }
}

// dQ: one warp per query row; grid (ceil(max_len / 4), n_heads, n_seqs).
template <typename T>
__device__ __forceinline__ void attn_bwd_dq_generic(T* __restrict__ dq,
                                                    const T* __restrict__ dout,
                                                    const float* __restrict__ lse,
                                                    const float* __restrict__ delta,
                                                    const T* __restrict__ q,
                                                    const T* __restrict__ k,
                                                    const T* __restrict__ v,
                                                    const int* __restrict__ cu, int n,
                                                    int n_heads, int n_kv_heads, int head_dim,
                                                    int window, float scale, float softcap) {
    __shared__ float sq[ATTN_WARPS][ATTN_GEN_MAXD];
    __shared__ float so[ATTN_WARPS][ATTN_GEN_MAXD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * ATTN_WARPS + warp;
    const int h = blockIdx.y;
    const AttnSeq z(cu, blockIdx.z);
    if (i >= z.len) return;
    const int kvh = h / (n_heads / n_kv_heads);
    const long long q_ld = (long long)n_heads * head_dim, kv_ld = (long long)n_kv_heads * head_dim;
    const long long q_off = ((long long)z.s0 + i) * q_ld + (long long)h * head_dim;
    const T* kb = k + (long long)z.s0 * kv_ld + (long long)kvh * head_dim;
    const T* vb = v + (long long)z.s0 * kv_ld + (long long)kvh * head_dim;
    const AttnScore score(scale, softcap);
    for (int d = lane; d < head_dim; d += 32) {
        sq[warp][d] = to_f32(q[q_off + d]);
        so[warp][d] = to_f32(dout[q_off + d]);
    }
    __syncwarp();
    const long long stat = (long long)h * n + z.s0 + i;
    const float lse2 = lse[stat] * ATTN_LOG2E, dlt = delta[stat];

    float g[ATTN_GEN_PER_LANE];
#pragma unroll
    for (int c = 0; c < ATTN_GEN_PER_LANE; ++c) g[c] = 0.0f;
    const int lo = window > 0 ? max(0, i - window + 1) : 0;
    for (int j0 = lo; j0 <= i; j0 += 32) {
        const int j = j0 + lane;
        float ds = 0.0f;
        if (j <= i) {
            const T* kr = kb + (long long)j * kv_ld;
            const T* vr = vb + (long long)j * kv_ld;
            float s = 0.0f, dp = 0.0f;
            for (int d = 0; d < head_dim; ++d) {
                s += sq[warp][d] * to_f32(kr[d]);
                dp += so[warp][d] * to_f32(vr[d]);
            }
            float g;
            const float p = exp2f(score.with_grad(s, g) - lse2);
            ds = p * (dp - dlt) * g;
        }
        const int cnt = min(32, i - j0 + 1);
        for (int jj = 0; jj < cnt; ++jj) {
            const float dsj = __shfl_sync(FULL_MASK, ds, jj);
            const T* kr = kb + (long long)(j0 + jj) * kv_ld;
#pragma unroll
            for (int c = 0; c < ATTN_GEN_PER_LANE; ++c) {
                const int d = lane + 32 * c;
                if (d < head_dim) g[c] += dsj * to_f32(kr[d]);
            }
        }
    }
#pragma unroll
    for (int c = 0; c < ATTN_GEN_PER_LANE; ++c) {
        const int d = lane + 32 * c;
        if (d < head_dim) dq[q_off + d] = from_f32<T>(g[c] * scale);
    }
}

// ---- entry points ------------------------------------------------------------------------------
// The generic kernels promise ptxas only ATTN_GEN_MIN_CTAS resident CTAs per SM (16 warps), so it
// may use up to 128 registers: with the bare launch bound it aims at 56 on sm_90a and spills the
// soft-capped dQ's accumulators (tests/cuda_compile.rs and attention.rs check for spills).
#define ATTN_GEN_MIN_CTAS 4
// All launched with ATTN_THREADS threads. Argument lists are shared by each family so the host
// picks a kernel by name only. The tensor-core kernels ignore `head_dim` (it is in their name).
// cu: the n_seqs + 1 sequence offsets (device, i32); n: rows (cu[n_seqs]); window: 0 = none;
// scale: c; softcap: κ, 0 = none. Grid (tiles of max_len, heads or kv heads, n_seqs).

#define ATTN_FWD_ARGS(T)                                                                         \
    T *out, float *lse, const T *q, const T *k, const T *v, const int *cu, int n, int n_heads,    \
        int n_kv_heads, int head_dim, int window, float scale, float softcap
#define ATTN_DKDV_ARGS(T)                                                                        \
    T *dk, T *dv, const T *dout, const float *lse, const float *delta, const T *q, const T *k,    \
        const T *v, const int *cu, int n, int n_heads, int n_kv_heads, int head_dim, int window,  \
        float scale, float softcap
#define ATTN_DQ_ARGS(T)                                                                          \
    T *dq, const T *dout, const float *lse, const float *delta, const T *q, const T *k,           \
        const T *v, const int *cu, int n, int n_heads, int n_kv_heads, int head_dim, int window,  \
        float scale, float softcap

extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_fwd_hd64_bf16(ATTN_FWD_ARGS(bf16)) {
    attn_fwd_mma<64>(out, lse, q, k, v, cu, n, n_heads, n_kv_heads, window, scale, softcap);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_fwd_hd128_bf16(ATTN_FWD_ARGS(bf16)) {
    attn_fwd_mma<128>(out, lse, q, k, v, cu, n, n_heads, n_kv_heads, window, scale, softcap);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, ATTN_GEN_MIN_CTAS) attention_fwd_bf16(ATTN_FWD_ARGS(bf16)) {
    attn_fwd_generic<bf16>(out, lse, q, k, v, cu, n, n_heads, n_kv_heads, head_dim, window, scale,
                           softcap);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, ATTN_GEN_MIN_CTAS) attention_fwd_f32(ATTN_FWD_ARGS(float)) {
    attn_fwd_generic<float>(out, lse, q, k, v, cu, n, n_heads, n_kv_heads, head_dim, window, scale,
                            softcap);
}

// delta: [n_heads, rows] (rows = n); grid ceil(rows · n_heads / 4).
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    attention_bwd_preprocess_bf16(float* delta, const bf16* dout, const bf16* out, int rows,
                                  int n_heads, int head_dim) {
    attn_bwd_preprocess<bf16>(delta, dout, out, rows, n_heads, head_dim);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    attention_bwd_preprocess_f32(float* delta, const float* dout, const float* out, int rows,
                                 int n_heads, int head_dim) {
    attn_bwd_preprocess<float>(delta, dout, out, rows, n_heads, head_dim);
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_bwd_dkdv_hd64_bf16(ATTN_DKDV_ARGS(bf16)) {
    attn_bwd_dkdv_mma<64>(dk, dv, dout, lse, delta, q, k, v, cu, n, n_heads, n_kv_heads, window,
                          scale, softcap);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_bwd_dkdv_hd128_bf16(ATTN_DKDV_ARGS(bf16)) {
    attn_bwd_dkdv_mma<128>(dk, dv, dout, lse, delta, q, k, v, cu, n, n_heads, n_kv_heads, window,
                           scale, softcap);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, ATTN_GEN_MIN_CTAS) attention_bwd_dkdv_bf16(ATTN_DKDV_ARGS(bf16)) {
    attn_bwd_dkdv_generic<bf16>(dk, dv, dout, lse, delta, q, k, v, cu, n, n_heads, n_kv_heads,
                                head_dim, window, scale, softcap);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, ATTN_GEN_MIN_CTAS) attention_bwd_dkdv_f32(ATTN_DKDV_ARGS(float)) {
    attn_bwd_dkdv_generic<float>(dk, dv, dout, lse, delta, q, k, v, cu, n, n_heads, n_kv_heads,
                                 head_dim, window, scale, softcap);
}

// dQ at D = 64: three CTAs per SM, as before the soft cap (168 registers, no spills; left to
// itself ptxas takes ~220 with the cap's tanh and only two CTAs fit).
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, 3) attention_bwd_dq_hd64_bf16(ATTN_DQ_ARGS(bf16)) {
    attn_bwd_dq_mma<64>(dq, dout, lse, delta, q, k, v, cu, n, n_heads, n_kv_heads, window, scale,
                        softcap);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_bwd_dq_hd128_bf16(ATTN_DQ_ARGS(bf16)) {
    attn_bwd_dq_mma<128>(dq, dout, lse, delta, q, k, v, cu, n, n_heads, n_kv_heads, window, scale,
                         softcap);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, ATTN_GEN_MIN_CTAS) attention_bwd_dq_bf16(ATTN_DQ_ARGS(bf16)) {
    attn_bwd_dq_generic<bf16>(dq, dout, lse, delta, q, k, v, cu, n, n_heads, n_kv_heads, head_dim,
                              window, scale, softcap);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS, ATTN_GEN_MIN_CTAS) attention_bwd_dq_f32(ATTN_DQ_ARGS(float)) {
    attn_bwd_dq_generic<float>(dq, dout, lse, delta, q, k, v, cu, n, n_heads, n_kv_heads, head_dim,
                               window, scale, softcap);
}
