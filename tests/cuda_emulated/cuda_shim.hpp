// cuda_shim.hpp: enough of the CUDA device language for block-level kernels (no inline PTX;
// the wrappers of kernels/ptx.cuh are replaced by ptx_emu.hpp)
// to compile as plain C++20 and run on the CPU, one std::thread per CUDA thread.
//
// Model: a launch runs its blocks one after another (so `__shared__` can be a function-local
// `static`: only one block is alive at a time); the threads of a block run concurrently and
// meet at real barriers, so indexing, reductions and barrier placement are exercised for real.
// Warp shuffles exchange values through a per-warp array and a per-warp barrier: every lane of
// the warp must reach every shuffle, as the full mask promises.
//
// Threads leave every __syncthreads out of step (see jitter()), so that races the barriers do
// not order show up as wrong or varying results.
//
// Checks on the way: dynamic shared memory is filled with 0xff bytes (a float NaN) before
// every block, so a read of a value no thread wrote shows up as NaN; writes past the end of
// dynamic shared memory or of a kernel argument's buffer fail the launch; a barrier that not
// every thread reaches fails it after CUDA_EMU_BARRIER_TIMEOUT_S with the block and thread.
//
// Not emulated: warp-synchronous code without shuffles/__syncwarp, partial-warp masks, atomics,
// inline PTX, textures, cooperative groups, clusters; static `__shared__` arrays are not
// poisoned (they keep what the previous block left).
//
// Dynamic shared memory (`extern __shared__ T name[];`) cannot be spelled in C++; the harness
// rewrites that declaration in the kernel source to `T* const name = ...dynamic_smem()` (at file
// scope a macro of the same value).
//
// Fibers (-DCUDA_EMU_FIBERS, used by the emulated GPU of tests/cuda_emulated/gpu.rs): the
// threads of a block are user-space fibers on the launching thread instead of std::threads,
// switched only where a CUDA thread waits (barriers, shuffles), one after another in a fixed
// order. Semantics are the same (a barrier still needs every thread), and a launch costs
// context switches instead of OS threads and futexes; what it gives up is the OS's
// interleaving, so races are looked for in the threaded mode (the kernel tests, jitter(),
// ThreadSanitizer). A round of the fibers in which no barrier completes and no thread exits is
// a deadlock and fails the launch at once.
//
// Build: g++ -std=c++20 -O2 -pthread -fno-strict-aliasing -Wno-unknown-pragmas (the kernels
// load vectors through reinterpret_cast, which CUDA allows and ISO C++ aliasing rules do not).

#pragma once

#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <vector>
#if defined(CUDA_EMU_FIBERS)
#include <sys/mman.h>
#include <ucontext.h>
#endif
#if defined(__linux__)
#include <climits>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

// ---- qualifiers ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static  // blocks run one at a time, see above
#define __constant__ static
// __restrict__ is a g++ keyword already.

// ---- vector and index types ---------------------------------------------------------------
struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
        : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned int x, y;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// Per CUDA thread (= per std::thread).
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

namespace cuda_emu {

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "cuda_emu: %s (block %u,%u,%u thread %u,%u,%u)\n", what, blockIdx.x,
                 blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
    std::fflush(stderr);
    std::abort();
}

// Longest a thread waits at one barrier before the launch is declared stuck.
#ifndef CUDA_EMU_BARRIER_TIMEOUT_S
#define CUDA_EMU_BARRIER_TIMEOUT_S 60
#endif

#if defined(CUDA_EMU_FIBERS)
// Give the launching thread back to the block's scheduler (defined with launch()).
inline void fiber_yield();
// Barriers completed and threads exited: the scheduler's evidence of progress.
inline thread_local std::uint64_t fiber_progress = 0;
#endif

// A barrier for `expected` threads; an exited thread leaves it (arrive_and_drop), as an exited
// CUDA thread no longer holds back __syncthreads. Not std::barrier: libstdc++ parks waiters
// through a process-wide table of atomics, which ThreadSanitizer takes for synchronisation
// between unrelated threads and so hides real races. Here the only ordering is the barrier's
// own: arrivals under a per-barrier mutex, departures acquire the phase counter.
class Barrier {
  public:
    explicit Barrier(unsigned expected, const char* what) : expected_(expected), what_(what) {}
    void arrive_and_wait() { arrive(false); }
    void arrive_and_drop() { arrive(true); }

  private:
#if defined(CUDA_EMU_FIBERS)
    // Fibers share one OS thread: no lock; wait by yielding to the other fibers.
    void arrive(bool drop) {
        const unsigned phase = phase_.load(std::memory_order_relaxed);
        dropped_ += drop;
        if (++arrived_ == expected_) {
            expected_ -= dropped_;
            arrived_ = dropped_ = 0;
            phase_.store(phase + 1, std::memory_order_relaxed);
            fiber_progress++;
            return;
        }
        if (drop) return;
        while (phase_.load(std::memory_order_relaxed) == phase) fiber_yield();
    }
#else
    void arrive(bool drop) {
        unsigned phase;
        {
            std::lock_guard<std::mutex> lock(m_);
            phase = phase_.load(std::memory_order_relaxed);
            dropped_ += drop;
            if (++arrived_ == expected_) {
                expected_ -= dropped_;
                arrived_ = dropped_ = 0;
                phase_.store(phase + 1, std::memory_order_release);
                wake();
                return;
            }
        }
        if (drop) return;
        const auto limit =
            std::chrono::steady_clock::now() + std::chrono::seconds(CUDA_EMU_BARRIER_TIMEOUT_S);
        while (phase_.load(std::memory_order_acquire) == phase) {
            park(phase);
            if (std::chrono::steady_clock::now() > limit) stuck();
        }
    }
#if defined(__linux__)
    // Sleep while the phase is still `phase` (1 s at most, so the timeout above can fire).
    void park(unsigned phase) {
        timespec ts{1, 0};
        syscall(SYS_futex, reinterpret_cast<unsigned*>(&phase_), FUTEX_WAIT_PRIVATE, phase, &ts,
                nullptr, 0);
    }
    void wake() {
        syscall(SYS_futex, reinterpret_cast<unsigned*>(&phase_), FUTEX_WAKE_PRIVATE, INT_MAX,
                nullptr, nullptr, 0);
    }
#else
    void park(unsigned) { std::this_thread::yield(); }
    void wake() {}
#endif
#endif  // CUDA_EMU_FIBERS
    [[noreturn]] void stuck();

    std::mutex m_;
    std::atomic<unsigned> phase_{0};
    static_assert(sizeof(std::atomic<unsigned>) == sizeof(unsigned));
    unsigned expected_, arrived_ = 0, dropped_ = 0;
    const char* what_;
};

struct Warp {
    Barrier bar{32, "a warp shuffle or __syncwarp"};
    // Two exchange arrays used alternately: a lane writes array p of shuffle i+2 only after
    // every lane passed the barrier of shuffle i+1, i.e. after all reads of shuffle i.
    std::uint64_t slot[2][32];
    // The same for warp-collective operations with more than 8 bytes per lane (the tensor-core
    // and ldmatrix emulation of ptx_emu.hpp): up to kWideWords 32-bit words per lane.
    static constexpr int kWideWords = 8;
    std::uint32_t wide[2][32][kWideWords];
};

struct Block {
    explicit Block(unsigned nthreads) : sync(nthreads, "__syncthreads"), warps(nthreads / 32) {
        for (auto& w : warps) w = std::make_unique<Warp>();
    }
    Barrier sync;
    std::vector<std::unique_ptr<Warp>> warps;
};

struct Self {
    Block* block = nullptr;
    Warp* warp = nullptr;
    unsigned lane = 0;
    unsigned phase = 0;  // which exchange array the next shuffle uses
    unsigned char* smem = nullptr;
    std::uint32_t rng = 1;  // xorshift32 state for the scheduling jitter
    std::size_t smem_bytes = 0;  // dynamic shared memory of the launch
};
inline thread_local Self self;

inline unsigned char* dynamic_smem() { return self.smem; }
inline std::size_t dynamic_smem_bytes() { return self.smem_bytes; }

inline void Barrier::stuck() {
    static std::atomic<bool> reported{false};
    if (reported.exchange(true)) {
        for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));  // the first one aborts
    }
    unsigned arrived, expected;
    {
        std::lock_guard<std::mutex> lock(m_);
        arrived = arrived_, expected = expected_;
    }
    char msg[256];
    std::snprintf(msg, sizeof msg,
                  "stuck: %s waited %d s with %u of %u threads arrived (a barrier or shuffle "
                  "inside a branch not every thread takes?)",
                  what_, CUDA_EMU_BARRIER_TIMEOUT_S, arrived, expected);
    fail(msg);
}

// After a block barrier, one thread in four gives up its time slice, so warps leave the
// barrier out of step. Races the barriers do not order (a warp still reading shared memory
// another one already overwrites, or reading before it is written) then show as wrong or
// varying results far more often than with the OS's natural interleaving.
inline void jitter() {
#if defined(CUDA_EMU_FIBERS)
    return;  // fibers switch only at barriers, in a fixed order
#endif
    std::uint32_t x = self.rng;
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;
    self.rng = x;
    if ((x & 3u) == 0) std::this_thread::yield();
}

inline void check_mask(unsigned mask) {
    if (mask != 0xffffffffu) fail("only full-warp masks (0xffffffff) are emulated");
}

// Lane `src` of this warp's value `v` (src out of range: own value, as CUDA does).
template <typename T> inline T exchange(T v, unsigned src) {
    static_assert(sizeof(T) <= 8, "shuffles of at most 8 bytes");
    Self& s = self;
    Warp& w = *s.warp;
    std::uint64_t* slots = w.slot[s.phase];
    s.phase ^= 1u;
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    slots[s.lane] = bits;
    w.bar.arrive_and_wait();
    bits = slots[src < 32 ? src : s.lane];
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}

// Every lane's `n` words (n <= Warp::kWideWords) from `mine`, as all[lane][word]: one warp
// barrier, the exchange arrays alternating as in exchange(). Every lane of the warp must call it.
inline const std::uint32_t (*gather_words(const std::uint32_t* mine, int n))[Warp::kWideWords] {
    Self& s = self;
    Warp& w = *s.warp;
    auto* all = w.wide[s.phase];
    s.phase ^= 1u;
    for (int i = 0; i < n; i++) all[s.lane][i] = mine[i];
    w.bar.arrive_and_wait();
    return all;
}

// Buffers (dynamic shared memory here, kernel arguments in cuda_driver.hpp) are followed by
// guard bytes, checked after the launch, so a write past the end fails the launch. Under
// AddressSanitizer there are none: the exact-size allocation lets it catch reads as well.
#if defined(__SANITIZE_ADDRESS__)
constexpr std::size_t kGuard = 0;
#else
constexpr std::size_t kGuard = 256;
#endif
constexpr unsigned char kGuardByte = 0xa5;
constexpr std::align_val_t kAlign{256};  // cuMemAlloc gives 256-byte aligned buffers

inline unsigned char* alloc_guarded(std::size_t bytes) {
    const std::size_t size = bytes + kGuard ? bytes + kGuard : 1;
    auto* p = static_cast<unsigned char*>(::operator new(size, kAlign));
    std::memset(p + bytes, kGuardByte, kGuard);
    return p;
}

inline bool guard_intact(const unsigned char* p, std::size_t bytes) {
    for (std::size_t i = 0; i < kGuard; i++)
        if (p[bytes + i] != kGuardByte) return false;
    return true;
}

inline void free_guarded(unsigned char* p) { ::operator delete(p, kAlign); }

#if defined(CUDA_EMU_FIBERS)
// The switch between fibers: on x86-64 a few instructions that save the callee-saved registers
// on the old stack and restore them from the new one (no signal-mask system call, unlike
// swapcontext, which is the fallback elsewhere).
#if defined(__x86_64__)
extern "C" void cuda_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .hidden cuda_emu_switch
    .globl cuda_emu_switch
    .type cuda_emu_switch, @function
cuda_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_emu_switch, .-cuda_emu_switch
)");
struct Context {
    void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { cuda_emu_switch(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// One CUDA thread as a fiber: its context, and its per-thread state while it is switched out
// (the thread_locals of the launching thread hold the running fiber's).
struct Fiber {
    Context ctx;
    Self self;
    uint3 tid;
    bool done = false;
};

// Stack per fiber, with a PROT_NONE page below it so an overflow faults instead of writing
// into the next stack. Kept for the next launches of this OS thread.
constexpr std::size_t kFiberStack = 512 * 1024, kFiberGuard = 4096;
inline thread_local std::vector<unsigned char*> fiber_stacks;
inline thread_local Context* fiber_sched = nullptr;
inline thread_local Fiber* fiber_current = nullptr;
inline thread_local void (*fiber_body)(const void*) = nullptr;
inline thread_local const void* fiber_arg = nullptr;

inline void fiber_yield() { switch_context(fiber_current->ctx, *fiber_sched); }

// A fiber's first and only frame: run the thread, leave the barriers, switch back for good.
inline void fiber_entry() {
    fiber_body(fiber_arg);
    // An exited thread no longer holds back its block's or warp's barriers.
    self.warp->bar.arrive_and_drop();
    self.block->sync.arrive_and_drop();
    fiber_current->done = true;
    fiber_progress++;
    switch_context(fiber_current->ctx, *fiber_sched);
    fail("a finished fiber was resumed");
}

// Prepare `f` to start in fiber_entry on `stack` (the usable `bytes` above its guard page).
inline void start_context(Fiber& f, unsigned char* stack, std::size_t bytes) {
#if defined(__x86_64__)
    // What cuda_emu_switch pops: six registers, then the address it returns to. After that
    // `ret` the stack pointer must be 8 modulo 16, as right after a call.
    auto top = reinterpret_cast<std::uintptr_t>(stack + bytes) & ~std::uintptr_t(15);
    auto* sp = reinterpret_cast<void**>(top - 8);
    *--sp = reinterpret_cast<void*>(&fiber_entry);
    for (int i = 0; i < 6; i++) *--sp = nullptr;
    f.ctx.sp = sp;
#else
    getcontext(&f.ctx.uc);
    f.ctx.uc.uc_stack.ss_sp = stack;
    f.ctx.uc.uc_stack.ss_size = bytes;
    f.ctx.uc.uc_link = nullptr;
    makecontext(&f.ctx.uc, fiber_entry, 0);
#endif
}

template <typename SelfOf, typename ThreadIdx, typename F>
void run_fibers(unsigned n, dim3 block_idx, dim3 grid, dim3 block, const SelfOf& self_of,
                const ThreadIdx& thread_idx, const F& body) {
    while (fiber_stacks.size() < n) {
        void* p = mmap(nullptr, kFiberStack + kFiberGuard, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) fail("mmap of a fiber stack failed");
        mprotect(p, kFiberGuard, PROT_NONE);
        fiber_stacks.push_back(static_cast<unsigned char*>(p));
    }
    blockIdx = {block_idx.x, block_idx.y, block_idx.z};
    blockDim = block;
    gridDim = grid;
    fiber_body = [](const void* f) { (*static_cast<const F*>(f))(); };
    fiber_arg = &body;
    Context sched;
    fiber_sched = &sched;
    std::vector<Fiber> fibers(n);
    for (unsigned t = 0; t < n; t++) {
        Fiber& f = fibers[t];
        f.self = self_of(t);
        f.tid = thread_idx(t);
        start_context(f, fiber_stacks[t] + kFiberGuard, kFiberStack);
    }
    for (int idle_rounds = 0;;) {
        const std::uint64_t before = fiber_progress;
        bool live = false;
        for (Fiber& f : fibers) {
            if (f.done) continue;
            live = true;
            fiber_current = &f;
            threadIdx = f.tid;
            self = f.self;
            switch_context(sched, f.ctx);
            f.self = self;
        }
        if (!live) break;
        idle_rounds = fiber_progress == before ? idle_rounds + 1 : 0;
        if (idle_rounds == 2) {
            for (Fiber& f : fibers)
                if (!f.done) {
                    threadIdx = f.tid;
                    break;
                }
            fail("stuck: every thread of the block waits at a barrier or shuffle that not all "
                 "of its threads reach (one inside a branch not every thread takes?)");
        }
    }
    fiber_current = nullptr;
}
#endif

// Run `body()` on grid.x*y*z blocks of block.x*y*z threads, blocks in order, every thread of
// a block on its own std::thread (or fiber, see the top); `smem_bytes` of dynamic shared
// memory per block.
template <typename F>
void launch(dim3 grid, dim3 block, std::size_t smem_bytes, const F& body) {
    const unsigned nthreads = block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024 || nthreads % 32 != 0) {
        std::fprintf(stderr, "cuda_emu: block of %u threads (need a multiple of 32, <= 1024)\n",
                     nthreads);
        std::abort();
    }
    unsigned char* smem = alloc_guarded(smem_bytes);
    for (unsigned bz = 0; bz < grid.z; bz++)
        for (unsigned by = 0; by < grid.y; by++)
            for (unsigned bx = 0; bx < grid.x; bx++) {
                std::memset(smem, 0xff, smem_bytes);
                Block blk(nthreads);
                auto self_of = [&](unsigned t) {
                    return Self{&blk,
                                blk.warps[t / 32].get(),
                                t % 32,
                                0,
                                smem,
                                0x9e3779b9u * (t + 1) ^ (bx * 0x85ebca6bu + 1),
                                smem_bytes};
                };
                auto thread_idx = [&](unsigned t) {
                    return uint3{t % block.x, t / block.x % block.y, t / (block.x * block.y)};
                };
#if defined(CUDA_EMU_FIBERS)
                run_fibers(nthreads, dim3(bx, by, bz), grid, block, self_of, thread_idx, body);
#else
                std::vector<std::thread> threads;
                threads.reserve(nthreads);
                for (unsigned t = 0; t < nthreads; t++) {
                    threads.emplace_back([&, t] {
                        threadIdx = thread_idx(t);
                        blockIdx = {bx, by, bz};
                        blockDim = block;
                        gridDim = grid;
                        self = self_of(t);
                        body();
                        // An exited thread no longer holds back its block's or warp's barriers.
                        self.warp->bar.arrive_and_drop();
                        blk.sync.arrive_and_drop();
                    });
                }
                for (auto& th : threads) th.join();
#endif
                if (!guard_intact(smem, smem_bytes)) {
                    std::fprintf(stderr,
                                 "cuda_emu: block %u,%u,%u wrote past its %zu bytes of dynamic "
                                 "shared memory\n",
                                 bx, by, bz, smem_bytes);
                    std::abort();
                }
            }
    free_guarded(smem);
}

}  // namespace cuda_emu

// ---- synchronisation and warp intrinsics --------------------------------------------------
inline void __syncthreads() {
    cuda_emu::self.block->sync.arrive_and_wait();
    cuda_emu::jitter();
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
    cuda_emu::check_mask(mask);
    cuda_emu::self.warp->bar.arrive_and_wait();
}

template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    cuda_emu::check_mask(mask);
    const unsigned lane = cuda_emu::self.lane, src = lane ^ (unsigned)lane_mask;
    // Outside the lane's width-wide segment: its own value.
    return cuda_emu::exchange(v, src / width == lane / width ? src : 32u);
}

template <typename T> inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    cuda_emu::check_mask(mask);
    const unsigned lane = cuda_emu::self.lane;
    return cuda_emu::exchange(v, (lane / width) * width + ((unsigned)src_lane % width));
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    cuda_emu::check_mask(mask);
    const unsigned lane = cuda_emu::self.lane;
    return cuda_emu::exchange(v, lane % width + delta < (unsigned)width ? lane + delta : 32u);
}

template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    cuda_emu::check_mask(mask);
    const unsigned lane = cuda_emu::self.lane;
    return cuda_emu::exchange(v, lane % width >= delta ? lane - delta : 32u);
}

[[noreturn]] inline void __trap() { cuda_emu::fail("__trap()"); }

// ---- memory and bit casts -----------------------------------------------------------------
template <typename T> inline T __ldg(const T* p) { return *p; }

inline unsigned int __float_as_uint(float x) { return std::bit_cast<unsigned int>(x); }
inline float __uint_as_float(unsigned int x) { return std::bit_cast<float>(x); }
inline int __float_as_int(float x) { return std::bit_cast<int>(x); }
inline float __int_as_float(int x) { return std::bit_cast<float>(x); }

// ---- math (fmaf, sqrtf, expf, ... come from <cmath>) --------------------------------------
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

// CUDA's min/max overloads (device functions of the CUDA math API; elementwise.cu's rope
// clamps a position with max(0, ...)). C++ has only std::min/std::max. Integers as CUDA
// defines them; floats as fminf/fmaxf (a NaN argument yields the other one). Mixed-type calls
// that CUDA resolves through further overloads are ambiguous here, and g++ says so.
inline int min(int a, int b) { return b < a ? b : a; }
inline int max(int a, int b) { return a < b ? b : a; }
inline unsigned int min(unsigned int a, unsigned int b) { return b < a ? b : a; }
inline unsigned int max(unsigned int a, unsigned int b) { return a < b ? b : a; }
inline long long min(long long a, long long b) { return b < a ? b : a; }
inline long long max(long long a, long long b) { return a < b ? b : a; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return b < a ? b : a; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a < b ? b : a; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
