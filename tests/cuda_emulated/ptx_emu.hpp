// ptx_emu.hpp: C++ stand-ins for the inline-PTX wrappers of kernels/ptx.cuh (used by the
// attention kernels), for the CPU emulation (cuda_shim.hpp). The harness (harness.rs,
// `emulated_source`) compiles the kernels with a ptx.cuh of its own that includes this file, so
// every function of kernels/ptx.cuh is defined here under the same name; the kernels' other
// helpers (address arithmetic, fragment packing, tile copies) stay as written and run for real.
//
// Semantics, from the PTX ISA:
// - ex2.approx.ftz.f32: exp2f, subnormal inputs and results flushed to zero (the hardware's
//   ~2^-22 relative error is not modelled; the tolerances cover it).
// - cvt.rn.bf16x2.f32 d, a, b: d = bf16(a) << 16 | bf16(b), round to nearest even (NaN -> a
//   quiet NaN). The wrapper passes (hi, lo).
// - __cvta_generic_to_shared: a 32-bit shared address; here the byte offset from the block's
//   dynamic shared memory (the only shared memory the attention kernels address this way),
//   checked to lie inside it. ldmatrix and cp.async map it back and check the 16 bytes they touch.
// - cp.async.cg.shared.global [dst], [src], 16, n: 16 bytes copied when n = 16, zero-filled
//   (nothing read) when n = 0. Asynchronous as the PTX ISA allows at its latest: the
//   destination is NaN-poisoned (0xff bytes) when the copy is issued, and the data lands only
//   when this thread's cp.async.wait_group retires the copy's commit group (copies never
//   committed never land). So a read before the right wait (plus the barrier that shows other
//   threads' copies), or a copy issued into a buffer another warp still reads, gives NaN.
//   The global source is read when the copy lands (kernels do not write their cp.async
//   sources).
// - ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: warp-collective. Lanes 8i..8i+7 give the
//   row addresses (16 bytes each) of matrix i. Without .trans lane l receives in r[i] the pair
//   (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i, lower column in the low half; with .trans the
//   pair (rows 2(l%4), 2(l%4)+1, col l/4).
// - mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: warp-collective, g = lane/4,
//   t = lane%4: A 16x16 a0 (g, 2t..2t+1) a1 (g+8, 2t..) a2 (g, 2t+8..) a3 (g+8, 2t+8..);
//   B 16x8 b0 (k 2t..2t+1, n g) b1 (k 2t+8.., n g); C/D c0,c1 (g, 2t..2t+1) c2,c3 (g+8, ..).
//   Products are exact in f32 (bf16 x bf16); the 16 of one output are summed in k order and
//   added to the accumulator, in f32 (the hardware's order and internal precision differ by
//   rounding).
// Both collectives exchange operands through the shim's per-warp arrays (gather_words): every
// lane deposits its words, one warp barrier, each lane computes its own outputs from all 32
// lanes' words. Every lane of the warp must reach each call, as on the GPU.
// - %dynamic_smem_size: the launch's dynamic shared memory bytes.

#pragma once

#include <cfloat>
#include <vector>

namespace cuda_emu {

// Shared memory at 32-bit shared address `addr`, `bytes` of it checked to lie inside the
// launch's dynamic shared memory.
inline unsigned char* shared_at(u32 addr, std::size_t bytes, const char* what) {
    if ((std::size_t)addr + bytes > dynamic_smem_bytes()) {
        char msg[160];
        std::snprintf(msg, sizeof msg,
                      "%s: shared address %u + %zu bytes outside the %zu bytes of dynamic shared "
                      "memory",
                      what, addr, bytes, dynamic_smem_bytes());
        fail(msg);
    }
    return dynamic_smem() + addr;
}

inline float bf16_bits_to_f32(u32 h) { return std::bit_cast<float>((h & 0xffffu) << 16); }

inline u32 f32_to_bf16_rne(float x) {
    const u32 u = std::bit_cast<u32>(x);
    if (std::isnan(x)) return (u >> 16) | 0x40u;  // quiet NaN, sign kept
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

}  // namespace cuda_emu

__device__ __forceinline__ float attn_exp2(float x) {
    if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.0f;
    const float y = std::exp2(x);
    return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

__device__ __forceinline__ u32 attn_pack_bf16x2(float lo, float hi) {
    return cuda_emu::f32_to_bf16_rne(hi) << 16 | cuda_emu::f32_to_bf16_rne(lo);
}

// The CUDA intrinsic (not asm: attention.cuh's attn_smem_addr calls it and stays as written).
inline std::size_t __cvta_generic_to_shared(const void* p) {
    const auto* c = static_cast<const unsigned char*>(p);
    const unsigned char* base = cuda_emu::dynamic_smem();
    if (base == nullptr || c < base || c >= base + cuda_emu::dynamic_smem_bytes())
        cuda_emu::fail("__cvta_generic_to_shared of a pointer outside dynamic shared memory");
    return (std::size_t)(c - base);
}

namespace cuda_emu {

// cp.async in flight, per CUDA thread: copies issued since the last commit, then the committed
// groups, oldest first. A copy's 16 bytes are NaN-poisoned (0xff) when it is issued and land
// when a wait_group retires its group, so shared memory read before the wait (or a buffer
// another warp still reads when the copy is issued) shows up as NaN.
struct AsyncCopy {
    unsigned char* dst;
    const void* src;  // null: zero fill
};
struct AsyncCopies {
    std::vector<AsyncCopy> open;
    std::vector<std::vector<AsyncCopy>> groups;
};
inline thread_local AsyncCopies async_copies;

}  // namespace cuda_emu

__device__ __forceinline__ void attn_cp_async16(u32 dst, const void* src, bool pred) {
    if (dst % 16 != 0) cuda_emu::fail("cp.async: shared destination not 16-byte aligned");
    unsigned char* d = cuda_emu::shared_at(dst, 16, "cp.async");
    if (pred && reinterpret_cast<std::uintptr_t>(src) % 16 != 0)
        cuda_emu::fail("cp.async: global source not 16-byte aligned");
    std::memset(d, 0xff, 16);
    cuda_emu::async_copies.open.push_back({d, pred ? src : nullptr});
}

__device__ __forceinline__ void attn_cp_async_commit() {
    auto& a = cuda_emu::async_copies;
    a.groups.push_back(std::move(a.open));
    a.open.clear();
}

// Land every group but the newest N (the copies of this thread only, as on the GPU).
template <int N> __device__ __forceinline__ void attn_cp_async_wait() {
    auto& a = cuda_emu::async_copies;
    const std::size_t keep = N;
    if (a.groups.size() <= keep) return;
    const std::size_t done = a.groups.size() - keep;
    for (std::size_t g = 0; g < done; g++)
        for (const auto& c : a.groups[g]) {
            if (c.src) std::memcpy(c.dst, c.src, 16);
            else std::memset(c.dst, 0, 16);
        }
    a.groups.erase(a.groups.begin(), a.groups.begin() + (std::ptrdiff_t)done);
}

namespace cuda_emu {

// ldmatrix x4: the row addresses of every lane, then this lane's four fragments.
inline void ldsm_x4(u32 (&r)[4], u32 addr, bool trans) {
    if (addr % 16 != 0) fail("ldmatrix: row address not 16-byte aligned");
    const auto all = gather_words(&addr, 1);
    const unsigned l = self.lane;
    for (int i = 0; i < 4; i++) {
        if (!trans) {
            const unsigned char* row = shared_at(all[8 * i + l / 4][0], 16, "ldmatrix");
            std::memcpy(&r[i], row + 4 * (l % 4), 4);
        } else {
            u16 h[2];
            for (int e = 0; e < 2; e++) {
                const unsigned char* row =
                    shared_at(all[8 * i + 2 * (l % 4) + e][0], 16, "ldmatrix.trans");
                std::memcpy(&h[e], row + 2 * (l / 4), 2);
            }
            r[i] = (u32)h[0] | (u32)h[1] << 16;
        }
    }
}

}  // namespace cuda_emu

__device__ __forceinline__ void attn_ldsm_x4(u32 (&r)[4], u32 addr) {
    cuda_emu::ldsm_x4(r, addr, false);
}

__device__ __forceinline__ void attn_ldsm_x4_trans(u32 (&r)[4], u32 addr) {
    cuda_emu::ldsm_x4(r, addr, true);
}

__device__ __forceinline__ void attn_mma(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    using cuda_emu::bf16_bits_to_f32;
    const u32 mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
    const auto all = cuda_emu::gather_words(mine, 6);
    // A (16 x 16) and B (16 x 8, k x n) as floats, from every lane's fragments.
    float A[16][16], B[16][8];
    for (int lane = 0; lane < 32; lane++) {
        const int g = lane / 4, t = lane % 4;
        for (int e = 0; e < 2; e++) {
            const int sh = 16 * e;
            A[g][2 * t + e] = bf16_bits_to_f32(all[lane][0] >> sh);
            A[g + 8][2 * t + e] = bf16_bits_to_f32(all[lane][1] >> sh);
            A[g][2 * t + 8 + e] = bf16_bits_to_f32(all[lane][2] >> sh);
            A[g + 8][2 * t + 8 + e] = bf16_bits_to_f32(all[lane][3] >> sh);
            B[2 * t + e][g] = bf16_bits_to_f32(all[lane][4] >> sh);
            B[2 * t + 8 + e][g] = bf16_bits_to_f32(all[lane][5] >> sh);
        }
    }
    const int g = cuda_emu::self.lane / 4, t = cuda_emu::self.lane % 4;
    for (int i = 0; i < 4; i++) {
        const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float sum = 0.0f;
        for (int k = 0; k < 16; k++) sum += A[row][k] * B[k][col];
        c[i] += sum;
    }
}

__device__ __forceinline__ u32 attn_dynamic_smem() {
    return (u32)cuda_emu::dynamic_smem_bytes();
}
