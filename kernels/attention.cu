// attention.cu: causal (optionally sliding-window) softmax attention with GQA, forward and
// backward, for training; and attention against a key/value cache, for generation.
// defines: attention_fwd_{hd64,hd128}_bf16, attention_fwd_{bf16,f32},
//          attention_bwd_preprocess_{bf16,f32},
//          attention_bwd_dkdv_{hd64,hd128}_bf16, attention_bwd_dkdv_{bf16,f32},
//          attention_bwd_dq_{hd64,hd128}_bf16, attention_bwd_dq_{bf16,f32},
//          generation with a key/value cache (section at the end of the file):
//          attention_cache_append_{bf16,f32}, attention_cached_{bf16,f32},
//          attention_cached_combine_{bf16,f32}
//
// ---- math ------------------------------------------------------------------------------------
// Per batch b and query head h (kv head g = h / (n_heads / n_kv_heads)), with c = 1/sqrt(D):
//   S_ij = c · q_i · k_j        visible(i, j) = j <= i  and  (no window or j > i - window)
//   P_ij = exp(S_ij - lse_i),   lse_i = log Σ_{visible j} exp(S_ij)
//   o_i  = Σ_j P_ij v_j
// Backward, given dO:
//   Δ_i   = dO_i · o_i                         (= Σ_j P_ij dP_ij)
//   dP_ij = dO_i · v_j,   dS_ij = P_ij (dP_ij - Δ_i)
//   dq_i  = c Σ_j dS_ij k_j,   dk_j = c Σ_{h in group(g)} Σ_i dS_ij q_i,   dv_j = Σ_h Σ_i P_ij dO_i
// The softmax runs in base 2: scores are multiplied by c·log2(e) so exp becomes exp2; the
// stored lse is natural-log (lse = ln2 · (m₂ + log2 ℓ)).
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
//   forward  : CTA = (64-query tile, head, batch). Q fragments stay in registers; K/V tiles of
//              64 keys stream through two shared buffers (tile t+1 copied while tile t is used);
//              online softmax in f32 registers (row max/sum over the 4 lanes of a quad).
//   dK, dV   : CTA = (64-key tile, kv head, batch); each warp owns 16 keys and computes the
//              transposed products Sᵀ = K Qᵀ and dPᵀ = V dOᵀ, so Pᵀ and dSᵀ are its own A
//              fragments for dV += Pᵀ dO and dK += dSᵀ Q. It loops over every query head of the
//              kv head's group and every query tile that sees the key tile (Q/dO tiles double-
//              buffered), accumulating in registers: the GQA sum needs no atomics, and the
//              order is fixed (deterministic).
//   dQ       : CTA = (64-query tile, head, batch), Q and dO fragments in registers, K/V tiles
//              streamed through two buffers; dQ += dS K.
//   Causal: key tiles wholly above the diagonal, and tiles wholly outside the sliding window,
//   are never visited; the per-element mask is applied only on tiles that need it.
//   Speed (H200, seq 2048, causal): ~165 TFLOP/s forward, ~120 backward (counted as 2.5x the
//   forward's FLOPs), about 40% of cuDNN/FA2. The limit is shared-memory traffic: with 16 rows per
//   warp every ldmatrix.x4 of K/V feeds only two mma; 32 rows per warp (BM = 128) would halve it.
//
// ---- generic kernels (any head_dim <= 256; f32, and bf16 head dims other than 64/128) ----------
// One warp per query row (forward, dQ) or key row (dK, dV); lanes split the 32 keys (queries) of
// a chunk for the dot products, then split the head dimension (lane + 32·c) to accumulate the
// outputs, broadcasting weights with shuffles. Simple FMA code, exact enough for tight tests.
//
// Everything is deterministic: fixed loop orders, butterfly reductions, no atomics.

#include "common.cuh"

#define ATTN_LOG2E 1.4426950408889634f
#define ATTN_LN2 0.6931471805599453f
// Largest head_dim the generic kernels accept (8 accumulators per lane).
#define ATTN_GEN_MAXD 256
#define ATTN_GEN_PER_LANE (ATTN_GEN_MAXD / 32)
// Warps (and rows) per CTA of every kernel.
#define ATTN_WARPS 4
#define ATTN_THREADS (ATTN_WARPS * 32)

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

// ---- PTX wrappers (tests/cuda_emulated replaces the functions with asm in this block) ----
// 2^x with the hardware approximation (rel. error ~2^-22); ex2(-inf) = 0.
__device__ __forceinline__ float attn_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Two floats to a bf16 pair (round to nearest even): `lo` in bits 0..15, `hi` in 16..31.
__device__ __forceinline__ u32 attn_pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

__device__ __forceinline__ u32 attn_smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// 16-byte global -> shared copy; when `pred` is false nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void attn_cp_async16(u32 dst, const void* src, bool pred) {
    const int n = pred ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n)
                 : "memory");
}

__device__ __forceinline__ void attn_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Wait until at most N committed groups of this thread are still in flight.
template <int N> __device__ __forceinline__ void attn_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void attn_ldsm_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void attn_ldsm_x4_trans(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// c += a · [b0 b1]  (m16n8k16, bf16 inputs, f32 accumulators)
__device__ __forceinline__ void attn_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

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

// Bytes of dynamic shared memory this launch was given.
__device__ __forceinline__ u32 attn_dynamic_smem() {
    u32 r;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
    return r;
}

// ---- end of PTX wrappers ----
extern __shared__ __align__(16) unsigned char attn_smem[];

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
                                             const bf16* __restrict__ v_, int seq, int n_heads,
                                             int n_kv_heads, int window, float scale) {
    constexpr int BM = 64, BN = 64, SD = D + 8, KS = D / 16;
    if (attn_dynamic_smem() < (u32)(4 * BN * SD * 2)) __trap();
    // Buffers: [K0 V0 K1 V1], each BN x SD; the Q tile is staged in K0 first.
    u16* sK = reinterpret_cast<u16*>(attn_smem);
    const u16* q = reinterpret_cast<const u16*>(q_);
    const u16* k = reinterpret_cast<const u16*>(k_);
    const u16* v = reinterpret_cast<const u16*>(v_);
    u16* out = reinterpret_cast<u16*>(out_);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;  // longest (last) tiles start first
    const int h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (n_heads / n_kv_heads);
    const long long q_ld = (long long)n_heads * D, kv_ld = (long long)n_kv_heads * D;
    const u16* qt = q + ((long long)b * seq + m0) * q_ld + h * D;
    const u16* kb = k + (long long)b * seq * kv_ld + kvh * D;
    const u16* vb = v + (long long)b * seq * kv_ld + kvh * D;
    const float sl2 = scale * ATTN_LOG2E;

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

        // Scale to base 2 and mask.
        const bool masked = attn_tile_needs_mask(m0, BM, n0, BN, seq, window);
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[nt][e] * sl2;
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
            u16* orow = out + ((long long)b * seq + i) * q_ld + h * D + col_in;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt)
                *reinterpret_cast<u32*>(orow + dt * 8) =
                    attn_pack_bf16x2(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
            if ((lane & 3) == 0)
                lse[((long long)b * n_heads + h) * seq + i] = (m_run[r] + log2f(l)) * ATTN_LN2;
        }
    }
}

// ---- backward preprocess: Δ = rowsum(dO ∘ O) -------------------------------------------------

// One warp per (token row, head); delta: [batch, n_heads, seq].
template <typename T>
__device__ __forceinline__ void attn_bwd_preprocess(float* __restrict__ delta,
                                                    const T* __restrict__ dout,
                                                    const T* __restrict__ out, int rows, int seq,
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
    if (lane == 0) {
        const long long b = n / seq, i = n % seq;
        delta[(b * n_heads + h) * seq + i] = acc;
    }
}

// ---- backward dK, dV, tensor cores ------------------------------------------------------------

// Issue the copies of one query-side tile of the dK/dV loop (query head h, rows m0..m0+BM-1)
// into one buffer: Q and dO with cp.async (the caller commits), lse (times log2 e) and Δ with
// plain stores at `stats` and `stats + 2*BM`. Rows past the sequence end get zeros.
template <int BM, int D>
__device__ __forceinline__ void attn_dkdv_issue(u16* sQO, float* stats, const u16* q,
                                                const u16* dout, const float* lse,
                                                const float* delta, int b, int h, int m0,
                                                int seq, int n_heads, long long q_ld) {
    const long long qoff = ((long long)b * seq + m0) * q_ld + h * D;
    attn_load_tile<BM, D>(sQO, q + qoff, q_ld, seq - m0);
    attn_load_tile<BM, D>(sQO + BM * (D + 8), dout + qoff, q_ld, seq - m0);
    const long long soff = ((long long)b * n_heads + h) * seq + m0;
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
    const bf16* __restrict__ k_, const bf16* __restrict__ v_, int seq, int n_heads,
    int n_kv_heads, int window, float scale) {
    constexpr int BN = 64, BM = AttnBwdTile<D>::SMALL, SD = D + 8, KS = D / 16;
    if (attn_dynamic_smem() < (u32)((2 * BN + 4 * BM) * SD * 2 + 4 * BM * 4)) __trap();
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
    const int n0 = blockIdx.x * BN;  // the first key tiles see the most queries: start them first
    const int kvh = blockIdx.y, b = blockIdx.z;
    const int group = n_heads / n_kv_heads;
    const long long q_ld = (long long)n_heads * D, kv_ld = (long long)n_kv_heads * D;
    const float sl2 = scale * ATTN_LOG2E;

    attn_load_tile<BN, D>(sK, k + ((long long)b * seq + n0) * kv_ld + kvh * D, kv_ld, seq - n0);
    attn_load_tile<BN, D>(sV, v + ((long long)b * seq + n0) * kv_ld + kvh * D, kv_ld, seq - n0);
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
    attn_dkdv_issue<BM, D>(sQO, sStats, q, dout, lse, delta, b, kvh * group, m_first, seq,
                           n_heads, q_ld);
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
                                   lse, delta, b, kvh * group + nx / n_qt,
                                   m_first + (nx % n_qt) * BM, seq, n_heads, q_ld);
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

        // Pᵀ = 2^(Sᵀ·c·log2e - lse₂), zero where invisible; dSᵀ = Pᵀ (dPᵀ - Δ).
        const bool masked = attn_tile_needs_mask(m0, BM, n0, BN, seq, window);
#pragma unroll
        for (int nt = 0; nt < BM / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int jj = key0 + (e >> 1) * 8;             // key
                const int ii = nt * 8 + col_in + (e & 1);       // query within the tile
                float p = attn_exp2(st[nt][e] * sl2 - sLse[ii]);
                if (masked && !attn_visible(m0 + ii, jj, seq, window)) p = 0.0f;
                st[nt][e] = p;
                dpt[nt][e] = p * (dpt[nt][e] - sDelta[ii]);
            }
        }

        // dV += Pᵀ dO, dK += dSᵀ Q (c applied at the end).
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
            const long long off = ((long long)b * seq + j) * kv_ld + kvh * D + col_in;
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
                                                const bf16* __restrict__ v_, int seq,
                                                int n_heads, int n_kv_heads, int window,
                                                float scale) {
    constexpr int BM = 64, BN = AttnBwdTile<D>::SMALL, SD = D + 8, KS = D / 16;
    constexpr int ROWS = 2 * BM > 4 * BN ? 2 * BM : 4 * BN;
    if (attn_dynamic_smem() < (u32)(ROWS * SD * 2)) __trap();
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
    const int m0 = (gridDim.x - 1 - blockIdx.x) * BM;
    const int h = blockIdx.y, b = blockIdx.z;
    const int kvh = h / (n_heads / n_kv_heads);
    const long long q_ld = (long long)n_heads * D, kv_ld = (long long)n_kv_heads * D;
    const long long qoff = ((long long)b * seq + m0) * q_ld + h * D;
    const u16* kb = k + (long long)b * seq * kv_ld + kvh * D;
    const u16* vb = v + (long long)b * seq * kv_ld + kvh * D;
    const float sl2 = scale * ATTN_LOG2E;

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
    const float* lse_h = lse + ((long long)b * n_heads + h) * seq;
    const float* delta_h = delta + ((long long)b * n_heads + h) * seq;
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

        // dS = P (dP - Δ), P = 2^(S·c·log2e - lse₂), zero where invisible.
        const bool masked = attn_tile_needs_mask(m0, BM, n0, BN, seq, window);
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1;
                const int j = n0 + nt * 8 + col_in + (e & 1);
                float p = attn_exp2(s[nt][e] * sl2 - lse2[r]);
                if (masked && !attn_visible(row0 + r * 8, j, seq, window)) p = 0.0f;
                s[nt][e] = p * (dp[nt][e] - dlt[r]);
            }
        }

        // dQ += dS K (c applied at the end).
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
            u16* dqr = reinterpret_cast<u16*>(dq_) + ((long long)b * seq + i) * q_ld + h * D + col_in;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt)
                *reinterpret_cast<u32*>(dqr + dt * 8) =
                    attn_pack_bf16x2(dq[dt][2 * r] * scale, dq[dt][2 * r + 1] * scale);
        }
    }
}

// ---- generic kernels (any head_dim <= ATTN_GEN_MAXD) --------------------------------------------

// Forward: one warp per query row; grid (ceil(seq / 4), n_heads, batch).
template <typename T>
__device__ __forceinline__ void attn_fwd_generic(T* __restrict__ out, float* __restrict__ lse,
                                                 const T* __restrict__ q,
                                                 const T* __restrict__ k,
                                                 const T* __restrict__ v, int seq, int n_heads,
                                                 int n_kv_heads, int head_dim, int window,
                                                 float scale) {
    __shared__ float sq[ATTN_WARPS][ATTN_GEN_MAXD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * ATTN_WARPS + warp;
    const int h = blockIdx.y, b = blockIdx.z;
    if (i >= seq) return;  // whole warp; no block-wide barrier below
    const int kvh = h / (n_heads / n_kv_heads);
    const long long q_ld = (long long)n_heads * head_dim, kv_ld = (long long)n_kv_heads * head_dim;
    const T* qr = q + ((long long)b * seq + i) * q_ld + (long long)h * head_dim;
    const T* kb = k + (long long)b * seq * kv_ld + (long long)kvh * head_dim;
    const T* vb = v + (long long)b * seq * kv_ld + (long long)kvh * head_dim;
    const float sl2 = scale * ATTN_LOG2E;
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
            s = dot * sl2;
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
    T* orow = out + ((long long)b * seq + i) * q_ld + (long long)h * head_dim;
#pragma unroll
    for (int c = 0; c < ATTN_GEN_PER_LANE; ++c) {
        const int d = lane + 32 * c;
        if (d < head_dim) orow[d] = from_f32<T>(acc[c] * inv);
    }
    if (lane == 0) lse[((long long)b * n_heads + h) * seq + i] = (m + log2f(l)) * ATTN_LN2;
}

// dK, dV: one warp per key row j of kv head g; loops over the group's query heads and the
// queries that see j. grid (ceil(seq / 4), n_kv_heads, batch).
template <typename T>
__device__ __forceinline__ void attn_bwd_dkdv_generic(
    T* __restrict__ dk, T* __restrict__ dv, const T* __restrict__ dout,
    const float* __restrict__ lse, const float* __restrict__ delta, const T* __restrict__ q,
    const T* __restrict__ k, const T* __restrict__ v, int seq, int n_heads, int n_kv_heads,
    int head_dim, int window, float scale) {
    __shared__ float sk[ATTN_WARPS][ATTN_GEN_MAXD];
    __shared__ float sv[ATTN_WARPS][ATTN_GEN_MAXD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = blockIdx.x * ATTN_WARPS + warp;
    const int kvh = blockIdx.y, b = blockIdx.z;
    if (j >= seq) return;
    const int group = n_heads / n_kv_heads;
    const long long q_ld = (long long)n_heads * head_dim, kv_ld = (long long)n_kv_heads * head_dim;
    const long long kv_off = ((long long)b * seq + j) * kv_ld + (long long)kvh * head_dim;
    const float sl2 = scale * ATTN_LOG2E;
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
        const T* qb = q + (long long)b * seq * q_ld + (long long)h * head_dim;
        const T* ob = dout + (long long)b * seq * q_ld + (long long)h * head_dim;
        const float* lse_h = lse + ((long long)b * n_heads + h) * seq;
        const float* delta_h = delta + ((long long)b * n_heads + h) * seq;
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
                p = exp2f(s * sl2 - lse_h[i] * ATTN_LOG2E);
                ds = p * (dp - delta_h[i]);
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

// dQ: one warp per query row; grid (ceil(seq / 4), n_heads, batch).
template <typename T>
__device__ __forceinline__ void attn_bwd_dq_generic(T* __restrict__ dq,
                                                    const T* __restrict__ dout,
                                                    const float* __restrict__ lse,
                                                    const float* __restrict__ delta,
                                                    const T* __restrict__ q,
                                                    const T* __restrict__ k,
                                                    const T* __restrict__ v, int seq,
                                                    int n_heads, int n_kv_heads, int head_dim,
                                                    int window, float scale) {
    __shared__ float sq[ATTN_WARPS][ATTN_GEN_MAXD];
    __shared__ float so[ATTN_WARPS][ATTN_GEN_MAXD];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * ATTN_WARPS + warp;
    const int h = blockIdx.y, b = blockIdx.z;
    if (i >= seq) return;
    const int kvh = h / (n_heads / n_kv_heads);
    const long long q_ld = (long long)n_heads * head_dim, kv_ld = (long long)n_kv_heads * head_dim;
    const long long q_off = ((long long)b * seq + i) * q_ld + (long long)h * head_dim;
    const T* kb = k + (long long)b * seq * kv_ld + (long long)kvh * head_dim;
    const T* vb = v + (long long)b * seq * kv_ld + (long long)kvh * head_dim;
    const float sl2 = scale * ATTN_LOG2E;
    for (int d = lane; d < head_dim; d += 32) {
        sq[warp][d] = to_f32(q[q_off + d]);
        so[warp][d] = to_f32(dout[q_off + d]);
    }
    __syncwarp();
    const long long stat = ((long long)b * n_heads + h) * seq + i;
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
            const float p = exp2f(s * sl2 - lse2);
            ds = p * (dp - dlt);
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
// All launched with ATTN_THREADS threads. Argument lists are shared by each family so the host
// picks a kernel by name only. The tensor-core kernels ignore `head_dim` (it is in their name).

#define ATTN_FWD_ARGS(T)                                                                         \
    T *out, float *lse, const T *q, const T *k, const T *v, int seq, int n_heads,                 \
        int n_kv_heads, int head_dim, int window, float scale
#define ATTN_DKDV_ARGS(T)                                                                        \
    T *dk, T *dv, const T *dout, const float *lse, const float *delta, const T *q, const T *k,    \
        const T *v, int seq, int n_heads, int n_kv_heads, int head_dim, int window, float scale
#define ATTN_DQ_ARGS(T)                                                                          \
    T *dq, const T *dout, const float *lse, const float *delta, const T *q, const T *k,           \
        const T *v, int seq, int n_heads, int n_kv_heads, int head_dim, int window, float scale

extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_fwd_hd64_bf16(ATTN_FWD_ARGS(bf16)) {
    attn_fwd_mma<64>(out, lse, q, k, v, seq, n_heads, n_kv_heads, window, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_fwd_hd128_bf16(ATTN_FWD_ARGS(bf16)) {
    attn_fwd_mma<128>(out, lse, q, k, v, seq, n_heads, n_kv_heads, window, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_fwd_bf16(ATTN_FWD_ARGS(bf16)) {
    attn_fwd_generic<bf16>(out, lse, q, k, v, seq, n_heads, n_kv_heads, head_dim, window, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_fwd_f32(ATTN_FWD_ARGS(float)) {
    attn_fwd_generic<float>(out, lse, q, k, v, seq, n_heads, n_kv_heads, head_dim, window, scale);
}

// delta: [batch, n_heads, seq]; rows = batch · seq; grid ceil(rows · n_heads / 4).
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    attention_bwd_preprocess_bf16(float* delta, const bf16* dout, const bf16* out, int rows,
                                  int seq, int n_heads, int head_dim) {
    attn_bwd_preprocess<bf16>(delta, dout, out, rows, seq, n_heads, head_dim);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    attention_bwd_preprocess_f32(float* delta, const float* dout, const float* out, int rows,
                                 int seq, int n_heads, int head_dim) {
    attn_bwd_preprocess<float>(delta, dout, out, rows, seq, n_heads, head_dim);
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_bwd_dkdv_hd64_bf16(ATTN_DKDV_ARGS(bf16)) {
    attn_bwd_dkdv_mma<64>(dk, dv, dout, lse, delta, q, k, v, seq, n_heads, n_kv_heads, window,
                          scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_bwd_dkdv_hd128_bf16(ATTN_DKDV_ARGS(bf16)) {
    attn_bwd_dkdv_mma<128>(dk, dv, dout, lse, delta, q, k, v, seq, n_heads, n_kv_heads, window,
                           scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_bwd_dkdv_bf16(ATTN_DKDV_ARGS(bf16)) {
    attn_bwd_dkdv_generic<bf16>(dk, dv, dout, lse, delta, q, k, v, seq, n_heads, n_kv_heads,
                                head_dim, window, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_bwd_dkdv_f32(ATTN_DKDV_ARGS(float)) {
    attn_bwd_dkdv_generic<float>(dk, dv, dout, lse, delta, q, k, v, seq, n_heads, n_kv_heads,
                                 head_dim, window, scale);
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_bwd_dq_hd64_bf16(ATTN_DQ_ARGS(bf16)) {
    attn_bwd_dq_mma<64>(dq, dout, lse, delta, q, k, v, seq, n_heads, n_kv_heads, window, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_bwd_dq_hd128_bf16(ATTN_DQ_ARGS(bf16)) {
    attn_bwd_dq_mma<128>(dq, dout, lse, delta, q, k, v, seq, n_heads, n_kv_heads, window, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_bwd_dq_bf16(ATTN_DQ_ARGS(bf16)) {
    attn_bwd_dq_generic<bf16>(dq, dout, lse, delta, q, k, v, seq, n_heads, n_kv_heads, head_dim,
                              window, scale);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_bwd_dq_f32(ATTN_DQ_ARGS(float)) {
    attn_bwd_dq_generic<float>(dq, dout, lse, delta, q, k, v, seq, n_heads, n_kv_heads, head_dim,
                               window, scale);
}

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
//             and pre-scaled by c·log2 e), masked to -inf, into a [NQ, KT] score tile;
//     softmax one warp per query vector: running max m and sum l (base 2, f32), p = 2^(s - m)
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
                                            int rows_per_cta, int heads_per_cta, int splits,
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
    const float sl2 = scale * ATTN_LOG2E;
    for (int x = tid; x < nq * dpad; x += ATTN_THREADS) {
        const int qv = x / dpad, d = x % dpad;
        const long long row = (long long)b * new_rows + i0 + qv / nh;
        const int h = h0 + qv % nh;
        sQ[qv * dpad + d] = d < head_dim ? to_f32(q[row * q_ld + (long long)h * head_dim + d]) * sl2
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

#define ATTN_APPEND_ARGS(T)                                                                      \
    T *k_cache, T *v_cache, const T *k, const T *v, long long rows, int new_rows, int past,       \
        int cap, int kv_ld
#define ATTN_CACHED_ARGS(T)                                                                      \
    T *out, float *part, const T *q, const T *k_cache, const T *v_cache, const u32 *start,        \
        int new_rows, int past, int cap, int n_heads, int n_kv_heads, int head_dim, int window,   \
        float scale, int rows_per_cta, int heads_per_cta, int splits, int kt
#define ATTN_COMBINE_ARGS(T)                                                                     \
    T *out, const float *part, int rows, int n_heads, int head_dim, int splits

extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_cache_append_bf16(ATTN_APPEND_ARGS(bf16)) {
    attn_cache_append<bf16>(k_cache, v_cache, k, v, rows, new_rows, past, cap, kv_ld);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_cache_append_f32(ATTN_APPEND_ARGS(float)) {
    attn_cache_append<float>(k_cache, v_cache, k, v, rows, new_rows, past, cap, kv_ld);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_cached_bf16(ATTN_CACHED_ARGS(bf16)) {
    attn_cached<bf16>(out, part, q, k_cache, v_cache, start, new_rows, past, cap, n_heads,
                      n_kv_heads, head_dim, window, scale, rows_per_cta, heads_per_cta, splits, kt);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_cached_f32(ATTN_CACHED_ARGS(float)) {
    attn_cached<float>(out, part, q, k_cache, v_cache, start, new_rows, past, cap, n_heads,
                       n_kv_heads, head_dim, window, scale, rows_per_cta, heads_per_cta, splits,
                       kt);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_cached_combine_bf16(ATTN_COMBINE_ARGS(bf16)) {
    attn_cached_combine<bf16>(out, part, rows, n_heads, head_dim, splits);
}
extern "C" __global__ void __launch_bounds__(ATTN_THREADS) attention_cached_combine_f32(ATTN_COMBINE_ARGS(float)) {
    attn_cached_combine<float>(out, part, rows, n_heads, head_dim, splits);
}
