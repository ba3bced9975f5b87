// fake_libnccl.cpp: a stand-in for NVIDIA's collective communication library (libnccl.so,
// the NCCL 2.30 ABI of cudarc's `nccl` bindings) next to fake_libcuda.cpp, so data-parallel
// training (one process per GPU, gradients all-reduced; ZeRO-1's reduce-scatter and
// all-gather) runs in CI with several processes on the emulated GPU.
//
// Built by tests/cuda_emulated/gpu.rs into the emulated GPU's folder as libnccl.so; cudarc
// opens it by that name from LD_LIBRARY_PATH. Device memory is host memory there (a
// CUdeviceptr is the host address) and every call of the fake driver is synchronous, so a
// buffer is ready when a collective is called; streams are ignored here too.
//
// How ranks meet: ncclGetUniqueId writes a name unique to the process, the time and a counter
// into the 128-byte id; ncclCommInitRank of every rank opens (or creates) the POSIX shared
// memory segment of that name (/dev/shm), claims its rank's slot with its pid, and waits for
// all ranks; then the name is unlinked, so nothing is left behind even if processes die
// later. The segment holds, per rank, a barrier counter, the collective it is in, and a
// staging area of two chunks of kChunkBytes.
//
// Collectives: each runs on the calling thread before it returns. First every rank publishes
// the call (its kind, count, type, operator, root and sequence number) and all compare: ranks
// that call different collectives fail, with both calls named. Then the data moves chunk by
// chunk: each rank copies its chunk into its staging area, a barrier, each rank reads what it
// needs from every rank's staging area; the two chunks of the staging area alternate, so one
// barrier per chunk suffices. Any size works, in-place calls (sendbuff == recvbuff, or the
// rank's own part of it for reduce-scatter and all-gather) work. Reductions add the ranks'
// contributions in rank order 0..N-1 (bf16 and f16 in float, rounded to nearest even once
// per element; integers wrap), so every rank gets bit-identical results, the same in every
// run. Reductions: ncclSum only; other operators, and fp8 reductions, are ncclInvalidArgument.
// ncclGroupStart/ncclGroupEnd only count their nesting: calls inside a group run at once,
// which is correct when (as here: one process per GPU) every rank issues the same calls in the
// same order, and would deadlock one thread driving several communicators in one group.
//
// Failures: a barrier waits while checking every missing peer: a rank whose process exited
// (kill(pid, 0), or a zombie in /proc/<pid>/stat) or that destroyed or aborted its
// communicator fails the call at once with ncclRemoteError, naming the rank, its pid and the
// call; a rank that gave up publishes why, and its peers fail with its reason and result;
// otherwise the wait ends after $CAFT_EMU_NCCL_TIMEOUT_S seconds (default 120) with
// ncclSystemError, naming the ranks that never arrived (ncclCommInitRank likewise). After a
// failure the communicator stays failed: later calls return the same error, as on a real
// aborted one; ncclCommGetAsyncError reports it. Every failure prints a line starting with
// "fake libnccl: rank <r>:" to stderr. A rank killed on demand: $CAFT_EMU_NCCL_DIE (see
// die_if_asked).
//
// What it cannot show: real NCCL's summation order (rings and trees: the bits of a sum differ
// from this rank-order sum, though real NCCL is deterministic too for a fixed topology and
// size), overlap of communication with compute (nothing here is asynchronous), and the speed
// of NVLink or the network. An id serves one communicator, as in NCCL. Not emulated:
// ncclCommInitAll (one process driving several GPUs), send/recv, split/shrink, user buffer
// registration, non-blocking communicators (a config is accepted and ignored: every call
// blocks).

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <utility>
#include <string>
#include <sys/mman.h>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>
#include <vector>

namespace {

using ncclResult = int;
constexpr ncclResult kSuccess = 0;
constexpr ncclResult kUnhandledCudaError = 1;
constexpr ncclResult kSystemError = 2;
constexpr ncclResult kInternalError = 3;
constexpr ncclResult kInvalidArgument = 4;
constexpr ncclResult kInvalidUsage = 5;
constexpr ncclResult kRemoteError = 6;

// ncclDataType_t
constexpr int kInt8 = 0, kUint8 = 1, kInt32 = 2, kUint32 = 3, kInt64 = 4, kUint64 = 5,
              kFloat16 = 6, kFloat32 = 7, kFloat64 = 8, kBfloat16 = 9, kFp8e4m3 = 10,
              kFp8e5m2 = 11, kNumTypes = 12;
// ncclRedOp_t
constexpr int kSum = 0;

// NCCL_VERSION(2, 30, 0): major * 10000 + minor * 100 + patch since 2.9.
constexpr int kVersion = 23000;
constexpr char kIdPrefix[] = "/caft-fake-nccl-";
constexpr int kMaxRanks = 1024;
// Bytes one rank moves per step; its staging area holds two such chunks (alternating).
constexpr std::size_t kChunkBytes = std::size_t(1) << 19;

enum Kind { kAllReduce = 1, kReduce, kBroadcast, kReduceScatter, kAllGather };

const char* kind_name(int kind) {
    switch (kind) {
        case kAllReduce: return "ncclAllReduce";
        case kReduce: return "ncclReduce";
        case kBroadcast: return "ncclBroadcast";
        case kReduceScatter: return "ncclReduceScatter";
        case kAllGather: return "ncclAllGather";
        default: return "an unknown collective";
    }
}

const char* type_name(int type) {
    static const char* names[kNumTypes] = {"int8",    "uint8",   "int32",   "uint32",
                                           "int64",   "uint64",  "float16", "float32",
                                           "float64", "bfloat16", "fp8e4m3", "fp8e5m2"};
    return type >= 0 && type < kNumTypes ? names[type] : "an unknown type";
}

std::size_t type_size(int type) {
    switch (type) {
        case kInt8: case kUint8: case kFp8e4m3: case kFp8e5m2: return 1;
        case kFloat16: case kBfloat16: return 2;
        case kInt32: case kUint32: case kFloat32: return 4;
        case kInt64: case kUint64: case kFloat64: return 8;
        default: return 0;
    }
}

// ---- the shared segment -----------------------------------------------------------------------
// Zero-filled when created; every field means "nothing yet" at zero.

struct Call {  // the collective a rank is in, published before its first barrier
    std::uint64_t seq;  // 1 for the communicator's first collective
    int kind, type, op, root;
    std::uint64_t count;
};

struct Header {
    std::atomic<int> nranks;       // set by the first rank to arrive
    std::atomic<int> failed_rank;  // 0: none; -1: being written; r + 1: rank r gave up
    int failed_code;               // its result, once failed_rank > 0
    char reason[512];              // and why
};

struct alignas(64) Slot {
    std::atomic<int> pid;                // 0 until the rank joins
    std::atomic<int> left;               // 1 once it destroyed or aborted its communicator
    std::atomic<std::uint64_t> arrived;  // barriers it has reached (joining is the first)
    // Collective `seq` is published in call[seq % 2]: a rank may publish its next call while
    // a slower one still compares this one.
    Call call[2];
};

static_assert(std::atomic<int>::is_always_lock_free &&
                  std::atomic<std::uint64_t>::is_always_lock_free,
              "the barrier needs address-free atomics in shared memory");

constexpr std::size_t round_up(std::size_t n, std::size_t to) { return (n + to - 1) / to * to; }
constexpr std::size_t slots_offset() { return round_up(sizeof(Header), 64); }
std::size_t staging_offset(int nranks) {
    return round_up(slots_offset() + sizeof(Slot) * nranks, 4096);
}
std::size_t segment_bytes(int nranks) {
    return staging_offset(nranks) + 2 * kChunkBytes * std::size_t(nranks);
}

struct Comm {
    int rank = 0, nranks = 0;
    unsigned char* base = nullptr;
    std::size_t bytes = 0;
    Header* hdr = nullptr;
    Slot* slots = nullptr;
    std::uint64_t barriers = 0;  // barriers passed
    std::uint64_t calls = 0;     // collectives issued
    ncclResult failed = kSuccess;
    std::string error;
};

// Chunk `half` (0 or 1) of rank q's staging area.
unsigned char* stage(const Comm& c, int q, std::uint64_t half) {
    return c.base + staging_offset(c.nranks) + (2 * std::size_t(q) + half % 2) * kChunkBytes;
}

std::string& thread_last_error() {
    thread_local std::string s;
    return s;
}

ncclResult report(ncclResult code, const std::string& msg) {
    std::fprintf(stderr, "fake libnccl: %s\n", msg.c_str());
    thread_last_error() = msg;
    return code;
}

// Fail `c` for good and tell its peers why.
ncclResult fail(Comm& c, ncclResult code, const std::string& msg) {
    report(code, "rank " + std::to_string(c.rank) + ": " + msg);
    if (c.failed == kSuccess) {
        c.failed = code;
        c.error = thread_last_error();
        int none = 0;
        if (c.hdr->failed_rank.compare_exchange_strong(none, -1)) {
            c.hdr->failed_code = code;
            std::snprintf(c.hdr->reason, sizeof c.hdr->reason, "%s", c.error.c_str());
            c.hdr->failed_rank.store(c.rank + 1, std::memory_order_release);
        }
    }
    return code;
}

double timeout_s() {
    static const double s = [] {
        const char* v = std::getenv("CAFT_EMU_NCCL_TIMEOUT_S");
        const double t = v ? std::strtod(v, nullptr) : 0;
        return t > 0 ? t : 120.0;
    }();
    return s;
}

// Whether process `pid` still runs: kill(pid, 0) answers for a zombie too (a child that exited
// but was not reaped yet), so its state in /proc decides then.
bool alive(int pid) {
    if (kill(pid, 0) != 0 && errno == ESRCH) return false;
    char path[64];
    std::snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE* f = std::fopen(path, "r");
    if (!f) return errno != ENOENT;
    char buf[512];
    const std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[n] = 0;
    const char* paren = std::strrchr(buf, ')');  // "pid (comm) S ...": comm may hold spaces
    return !(paren && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X'));
}

std::string list(const std::vector<int>& ranks) {
    std::string s;
    for (std::size_t i = 0; i < ranks.size(); i++)
        s += (i ? ", " : "") + std::to_string(ranks[i]);
    return s;
}

// Wait until every rank has reached barrier `k`, failing at once when a missing peer exited,
// left or gave up, and after timeout_s().
ncclResult wait_all(Comm& c, std::uint64_t k, const char* what) {
    using Clock = std::chrono::steady_clock;
    const auto start = Clock::now();
    auto next_check = start;
    auto late = [&](int q) { return c.slots[q].arrived.load(std::memory_order_acquire) < k; };
    for (unsigned spin = 0;; spin++) {
        int first_late = 0;
        while (first_late < c.nranks && !late(first_late)) first_late++;
        if (first_late == c.nranks) return kSuccess;
        if (spin < 64)
            sched_yield();
        else
            std::this_thread::sleep_for(std::chrono::microseconds(spin < 1024 ? 20 : 200));
        const auto now = Clock::now();
        if (now < next_check) continue;
        next_check = now + std::chrono::milliseconds(10);
        std::vector<int> missing;
        for (int q = first_late; q < c.nranks; q++)
            if (late(q)) missing.push_back(q);
        if (missing.empty()) continue;
        const int by = c.hdr->failed_rank.load(std::memory_order_acquire);
        if (by > 0 && by - 1 != c.rank)
            return fail(c, c.hdr->failed_code,
                        "rank " + std::to_string(by - 1) + " gave up during " + what + ": " +
                            c.hdr->reason);
        for (int q : missing) {
            if (c.slots[q].left.load(std::memory_order_acquire))
                return fail(c, kRemoteError, "rank " + std::to_string(q) +
                                                 " destroyed its communicator before " + what);
            const int pid = c.slots[q].pid.load(std::memory_order_acquire);
            if (pid && !alive(pid))
                return fail(c, kRemoteError, "rank " + std::to_string(q) + " (pid " +
                                                 std::to_string(pid) + ") exited during " + what);
        }
        if (std::chrono::duration<double>(now - start).count() > timeout_s()) {
            std::vector<int> never;
            for (int q : missing)
                if (!c.slots[q].pid.load(std::memory_order_acquire)) never.push_back(q);
            const std::string ranks =
                (missing.size() > 1 ? "ranks " : "rank ") + list(missing) +
                (never.empty() || never.size() == missing.size()
                     ? std::string()
                     : " (of which never joined: " + list(never) + ")");
            return fail(c, kSystemError,
                        std::string(what) + ": " + ranks +
                            (never.size() == missing.size() ? " never joined" : " did not arrive") +
                            " within " + std::to_string(int(timeout_s())) +
                            " s ($CAFT_EMU_NCCL_TIMEOUT_S)");
        }
    }
}

ncclResult barrier(Comm& c, const char* what) {
    const std::uint64_t k = ++c.barriers;
    c.slots[c.rank].arrived.store(k, std::memory_order_release);
    return wait_all(c, k, what);
}

// ---- sums -----------------------------------------------------------------------------------

float bf16_to_f32(std::uint16_t b) {
    const std::uint32_t u = std::uint32_t(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

std::uint16_t f32_to_bf16(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return std::uint16_t(u >> 16);
}

float f16_to_f32(std::uint16_t h) {
    const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
    const std::uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    std::uint32_t u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (mant << 13);  // inf, NaN
    } else if (exp == 0) {
        const float v = std::ldexp(float(mant), -24);  // zero or subnormal: exact
        std::memcpy(&u, &v, 4);
        u |= sign;
    } else {
        u = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

std::uint16_t f32_to_f16(float f) {
    std::uint32_t u;
    std::memcpy(&u, &f, 4);
    const std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
    const std::uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00;       // NaN
    if (a >= 0x477ff000u) return sign | 0x7c00;      // 65520 and up round to infinity
    if (a < 0x38800000u) {                            // below 2^-14: subnormal or zero
        float v;
        std::memcpy(&v, &a, 4);
        return sign | std::uint16_t(std::lrint(v * 16777216.0f));  // exact scaling; ties even
    }
    const std::uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round to nearest even at bit 13
    return sign | std::uint16_t((r >> 13) - (112u << 10));
}

// An element type: its storage, the type its sum is accumulated in, and the conversions.
template <typename T> struct Plain {
    using Bits = T;
    using Acc = T;
    static Acc load(Bits b) { return b; }
    static Bits store(Acc a) { return a; }
};
struct Half {
    using Bits = std::uint16_t;
    using Acc = float;
    static Acc load(Bits b) { return f16_to_f32(b); }
    static Bits store(Acc a) { return f32_to_f16(a); }
};
struct BHalf {
    using Bits = std::uint16_t;
    using Acc = float;
    static Acc load(Bits b) { return bf16_to_f32(b); }
    static Bits store(Acc a) { return f32_to_bf16(a); }
};

// dst[i] = parts[0][i] + parts[1][i] + ... in that order, accumulated in E::Acc.
template <typename E>
void sum_parts(unsigned char* dst, const unsigned char* const* parts, int nparts, std::size_t n) {
    using Bits = typename E::Bits;
    for (std::size_t i = 0; i < n; i++) {
        Bits b;
        std::memcpy(&b, parts[0] + i * sizeof(Bits), sizeof(Bits));
        typename E::Acc acc = E::load(b);
        for (int q = 1; q < nparts; q++) {
            std::memcpy(&b, parts[q] + i * sizeof(Bits), sizeof(Bits));
            acc = typename E::Acc(acc + E::load(b));
        }
        b = E::store(acc);
        std::memcpy(dst + i * sizeof(Bits), &b, sizeof(Bits));
    }
}

// Integers wrap: the unsigned sum of the same width has the bits of the signed one.
void sum_typed(int type, unsigned char* dst, const unsigned char* const* parts, int nparts,
               std::size_t n) {
    switch (type) {
        case kInt8: case kUint8: return sum_parts<Plain<std::uint8_t>>(dst, parts, nparts, n);
        case kInt32: case kUint32: return sum_parts<Plain<std::uint32_t>>(dst, parts, nparts, n);
        case kInt64: case kUint64: return sum_parts<Plain<std::uint64_t>>(dst, parts, nparts, n);
        case kFloat16: return sum_parts<Half>(dst, parts, nparts, n);
        case kFloat32: return sum_parts<Plain<float>>(dst, parts, nparts, n);
        case kFloat64: return sum_parts<Plain<double>>(dst, parts, nparts, n);
        case kBfloat16: return sum_parts<BHalf>(dst, parts, nparts, n);
        default: return;  // refused in check_call
    }
}

// The sum over ranks of `n` elements at byte `off` of each rank's staging chunk `half`.
void sum_staged(const Comm& c, int type, std::uint64_t half, std::size_t off, unsigned char* dst,
                std::size_t n) {
    std::vector<const unsigned char*> parts(c.nranks);
    // Contributions in rank order: the sum is the same on every rank and from run to run.
    for (int q = 0; q < c.nranks; q++) parts[q] = stage(c, q, half) + off;
    sum_typed(type, dst, parts.data(), c.nranks, n);
}

// ---- collectives ----------------------------------------------------------------------------

std::string describe(const Call& call) {
    std::string s = std::string(kind_name(call.kind)) + "(count " + std::to_string(call.count) +
                    ", " + type_name(call.type);
    if (call.kind == kAllReduce || call.kind == kReduce || call.kind == kReduceScatter)
        s += call.op == kSum ? ", sum" : ", op " + std::to_string(call.op);
    if (call.kind == kReduce || call.kind == kBroadcast) s += ", root " + std::to_string(call.root);
    return s + ")";
}

bool same(const Call& a, const Call& b) {
    return a.seq == b.seq && a.kind == b.kind && a.type == b.type && a.op == b.op &&
           a.root == b.root && a.count == b.count;
}

// Argument checks of one rank's call, before it meets the others. A refused call fails the
// communicator (and its peers): they would wait for this rank at a collective it skipped.
ncclResult check_call(Comm* cp, const Call& call, const void* send, const void* recv) {
    const std::string what = std::string(kind_name(call.kind)) + ": ";
    if (!cp) return report(kInvalidArgument, what + "null communicator");
    Comm& c = *cp;
    if (c.failed)
        return report(c.failed, "rank " + std::to_string(c.rank) + ": " + what +
                                    "the communicator failed earlier (" + c.error + ")");
    if (type_size(call.type) == 0)
        return fail(c, kInvalidArgument, what + "unknown data type " + std::to_string(call.type));
    const bool reduces =
        call.kind == kAllReduce || call.kind == kReduce || call.kind == kReduceScatter;
    if (reduces && call.op != kSum)
        return fail(c, kInvalidArgument, what + "only ncclSum is emulated (asked for op " +
                                             std::to_string(call.op) + ")");
    if (reduces && (call.type == kFp8e4m3 || call.type == kFp8e5m2))
        return fail(c, kInvalidArgument, what + "fp8 reductions are not emulated");
    if ((call.kind == kReduce || call.kind == kBroadcast) &&
        (call.root < 0 || call.root >= c.nranks))
        return fail(c, kInvalidArgument, what + "root " + std::to_string(call.root) +
                                             " outside 0.." + std::to_string(c.nranks - 1));
    if (call.count > 0) {
        const bool is_root = call.root == c.rank;
        const bool needs_send = call.kind != kBroadcast || is_root;
        const bool needs_recv = call.kind != kReduce || is_root;
        if ((needs_send && !send) || (needs_recv && !recv))
            return fail(c, kInvalidArgument, what + "null buffer");
    }
    return kSuccess;
}

// Publish the call, meet the others, compare: a mismatch fails every rank (all see it).
ncclResult meet(Comm& c, const Call& call) {
    c.slots[c.rank].call[call.seq % 2] = call;
    if (ncclResult r = barrier(c, kind_name(call.kind))) return r;
    for (int q = 0; q < c.nranks; q++) {
        const Call& other = c.slots[q].call[call.seq % 2];
        if (!same(other, call))
            return fail(c, kInvalidUsage,
                        "collective #" + std::to_string(call.seq) +
                            " differs between ranks: rank " + std::to_string(c.rank) +
                            " called " + describe(call) + ", rank " + std::to_string(q) +
                            " called " + describe(other));
    }
    return kSuccess;
}

// A worker killed mid-run on demand: $CAFT_EMU_NCCL_DIE=<rank>:<n> makes rank <rank> kill its
// own process (SIGKILL, as the kernel's out-of-memory killer would) on entering its n-th
// collective call, so tests can check what the other ranks and the launcher do.
void die_if_asked(const Comm& c) {
    static const std::pair<int, long> at = [] {
        const char* v = std::getenv("CAFT_EMU_NCCL_DIE");
        int r = -1;
        long n = 0;
        if (v && std::sscanf(v, "%d:%ld", &r, &n) != 2) r = -1;
        return std::pair<int, long>(r, n);
    }();
    if (c.rank == at.first && long(c.calls) == at.second) {
        std::fprintf(stderr, "fake libnccl: rank %d: killed on its collective call %ld "
                             "($CAFT_EMU_NCCL_DIE)\n", c.rank, at.second);
        std::fflush(stderr);
        kill(getpid(), SIGKILL);
    }
}

ncclResult collective(int kind, const void* sendbuff, void* recvbuff, std::size_t count,
                      int type, int op, int root, void* comm) {
    auto* cp = static_cast<Comm*>(comm);
    Call call{0, kind, type, op, root, std::uint64_t(count)};
    if (ncclResult r = check_call(cp, call, sendbuff, recvbuff)) return r;
    Comm& c = *cp;
    call.seq = ++c.calls;
    die_if_asked(c);
    if (ncclResult r = meet(c, call)) return r;
    const char* what = kind_name(kind);
    const auto* send = static_cast<const unsigned char*>(sendbuff);
    auto* recv = static_cast<unsigned char*>(recvbuff);
    const std::size_t es = type_size(type);
    const int n_ranks = c.nranks, me = c.rank;
    // Elements per step: reduce-scatter stages one piece for every rank's result.
    const std::size_t per = kind == kReduceScatter ? kChunkBytes / es / n_ranks : kChunkBytes / es;
    for (std::size_t off = 0, step = 0; off < count; off += per, step++) {
        const std::size_t n = count - off < per ? count - off : per;
        const std::size_t bytes = n * es;
        unsigned char* mine = stage(c, me, step);
        switch (kind) {
            case kAllReduce: case kReduce: case kAllGather:
                std::memcpy(mine, send + off * es, bytes);
                break;
            case kBroadcast:
                if (me == root) std::memcpy(mine, send + off * es, bytes);
                break;
            case kReduceScatter:
                for (int p = 0; p < n_ranks; p++)
                    std::memcpy(mine + p * bytes, send + (p * count + off) * es, bytes);
                break;
        }
        if (ncclResult r = barrier(c, what)) return r;
        switch (kind) {
            case kAllReduce:
                sum_staged(c, type, step, 0, recv + off * es, n);
                break;
            case kReduce:
                if (me == root) sum_staged(c, type, step, 0, recv + off * es, n);
                break;
            case kBroadcast:
                if (!(me == root && send == recv))
                    std::memcpy(recv + off * es, stage(c, root, step), bytes);
                break;
            case kReduceScatter:
                sum_staged(c, type, step, me * bytes, recv + off * es, n);
                break;
            case kAllGather:
                for (int q = 0; q < n_ranks; q++)
                    std::memcpy(recv + (q * count + off) * es, stage(c, q, step), bytes);
                break;
        }
        // No second barrier: the next step writes the other chunk, and the one after it
        // starts only when every rank passed the next barrier, so it has read this chunk.
        // The next collective's first barrier (in meet) covers the last step.
    }
    return kSuccess;
}

// ---- joining --------------------------------------------------------------------------------

ncclResult init_rank(void** out, int nranks, const char* id, int rank) {
    if (!out) return report(kInvalidArgument, "ncclCommInitRank: null comm pointer");
    *out = nullptr;
    if (nranks < 1 || nranks > kMaxRanks || rank < 0 || rank >= nranks)
        return report(kInvalidArgument, "ncclCommInitRank: rank " + std::to_string(rank) +
                                            " of " + std::to_string(nranks) +
                                            " (at most " + std::to_string(kMaxRanks) + " ranks)");
    const std::size_t len = strnlen(id, 128);
    if (len == 128 || std::strncmp(id, kIdPrefix, sizeof kIdPrefix - 1) != 0)
        return report(kInvalidArgument, "rank " + std::to_string(rank) +
                                            ": ncclCommInitRank: the id is not one of this "
                                            "fake's ncclGetUniqueId");
    const std::string name(id, len);
    const std::string me = "rank " + std::to_string(rank) + ": ncclCommInitRank: ";
    const int fd = shm_open(name.c_str(), O_RDWR | O_CREAT, 0600);
    if (fd < 0)
        return report(kSystemError, me + "shm_open " + name + ": " + std::strerror(errno));
    const std::size_t bytes = segment_bytes(nranks);
    struct stat st;
    if (fstat(fd, &st) != 0 || (std::size_t(st.st_size) < bytes && ftruncate(fd, bytes) != 0)) {
        const int e = errno;
        close(fd);
        shm_unlink(name.c_str());
        return report(kSystemError, me + "sizing " + name + ": " + std::strerror(e));
    }
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        shm_unlink(name.c_str());
        return report(kSystemError, me + "mmap " + name + ": " + std::strerror(errno));
    }
    auto* c = new Comm;
    c->rank = rank;
    c->nranks = nranks;
    c->base = static_cast<unsigned char*>(p);
    c->bytes = bytes;
    c->hdr = reinterpret_cast<Header*>(c->base);
    c->slots = reinterpret_cast<Slot*>(c->base + slots_offset());
    auto give_up = [&](ncclResult code, const std::string& msg) {
        shm_unlink(name.c_str());
        munmap(c->base, c->bytes);
        delete c;
        return report(code, me + msg);
    };
    int expected = 0;
    if (!c->hdr->nranks.compare_exchange_strong(expected, nranks) && expected != nranks)
        return give_up(kInvalidArgument, "this rank says " + std::to_string(nranks) +
                                             " ranks, an earlier one said " +
                                             std::to_string(expected));
    int none = 0;
    if (!c->slots[rank].pid.compare_exchange_strong(none, int(getpid())))
        return give_up(kInvalidUsage, "rank " + std::to_string(rank) + " joined twice (pids " +
                                          std::to_string(none) + " and " +
                                          std::to_string(getpid()) + ")");
    const ncclResult r = barrier(*c, "ncclCommInitRank");
    // Everyone has the segment mapped (or the wait failed): the name is no longer needed.
    shm_unlink(name.c_str());
    if (r) {
        c->slots[rank].left.store(1, std::memory_order_release);
        munmap(c->base, c->bytes);
        delete c;
        return r;
    }
    *out = c;
    return kSuccess;
}

ncclResult leave(void* comm) {
    auto* c = static_cast<Comm*>(comm);
    if (!c) return kSuccess;
    c->slots[c->rank].left.store(1, std::memory_order_release);
    munmap(c->base, c->bytes);
    delete c;
    return kSuccess;
}

thread_local int group_depth = 0;

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

// ---- version, ids, errors -------------------------------------------------------------------
API ncclResult ncclGetVersion(int* version) {
    if (!version) return kInvalidArgument;
    *version = kVersion;
    return kSuccess;
}

API ncclResult ncclGetUniqueId(char* id) {
    if (!id) return kInvalidArgument;
    static std::atomic<unsigned> counter{0};
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::system_clock::now().time_since_epoch())
                        .count();
    std::memset(id, 0, 128);
    std::snprintf(id, 128, "%s%d-%llx-%u", kIdPrefix, int(getpid()), (unsigned long long)ns,
                  counter.fetch_add(1));
    return kSuccess;
}

API const char* ncclGetErrorString(ncclResult r) {
    switch (r) {
        case kSuccess: return "no error";
        case kUnhandledCudaError: return "unhandled cuda error";
        case kSystemError: return "unhandled system error (fake libnccl: see its stderr line)";
        case kInternalError: return "internal error";
        case kInvalidArgument: return "invalid argument (fake libnccl: see its stderr line)";
        case kInvalidUsage: return "invalid usage (fake libnccl: see its stderr line)";
        case kRemoteError: return "remote process exited or there was a network error";
        default: return "unknown result code";
    }
}

API const char* ncclGetLastError(void* comm) {
    auto* c = static_cast<Comm*>(comm);
    return c && !c->error.empty() ? c->error.c_str() : thread_last_error().c_str();
}

// ---- communicators --------------------------------------------------------------------------
// The unique id is passed by value: 128 bytes, which the x86-64 ABI passes in memory, exactly
// as this by-value struct.
struct UniqueId {
    char internal[128];
};

API ncclResult ncclCommInitRank(void** comm, int nranks, UniqueId id, int rank) {
    return init_rank(comm, nranks, id.internal, rank);
}
API ncclResult ncclCommInitRankConfig(void** comm, int nranks, UniqueId id, int rank, void*) {
    return init_rank(comm, nranks, id.internal, rank);
}
API ncclResult ncclCommDestroy(void* comm) { return leave(comm); }
API ncclResult ncclCommAbort(void* comm) { return leave(comm); }
API ncclResult ncclCommFinalize(void* comm) {
    auto* c = static_cast<Comm*>(comm);
    if (!c) return kInvalidArgument;
    return c->failed;  // nothing is ever outstanding
}
API ncclResult ncclCommCount(const void* comm, int* count) {
    auto* c = static_cast<const Comm*>(comm);
    if (!c || !count) return kInvalidArgument;
    *count = c->nranks;
    return kSuccess;
}
API ncclResult ncclCommUserRank(const void* comm, int* rank) {
    auto* c = static_cast<const Comm*>(comm);
    if (!c || !rank) return kInvalidArgument;
    *rank = c->rank;
    return kSuccess;
}
API ncclResult ncclCommCuDevice(const void* comm, int* device) {
    if (!comm || !device) return kInvalidArgument;
    *device = 0;  // the fake driver's only usable GPU
    return kSuccess;
}
API ncclResult ncclCommGetAsyncError(void* comm, ncclResult* error) {
    auto* c = static_cast<Comm*>(comm);
    if (!c || !error) return kInvalidArgument;
    *error = c->failed;
    return kSuccess;
}

// ---- collectives ----------------------------------------------------------------------------
API ncclResult ncclAllReduce(const void* send, void* recv, std::size_t count, int type, int op,
                             void* comm, void*) {
    return collective(kAllReduce, send, recv, count, type, op, 0, comm);
}
API ncclResult ncclReduce(const void* send, void* recv, std::size_t count, int type, int op,
                          int root, void* comm, void*) {
    return collective(kReduce, send, recv, count, type, op, root, comm);
}
API ncclResult ncclBroadcast(const void* send, void* recv, std::size_t count, int type, int root,
                             void* comm, void*) {
    return collective(kBroadcast, send, recv, count, type, kSum, root, comm);
}
API ncclResult ncclBcast(void* buff, std::size_t count, int type, int root, void* comm, void*) {
    return collective(kBroadcast, buff, buff, count, type, kSum, root, comm);
}
API ncclResult ncclReduceScatter(const void* send, void* recv, std::size_t recvcount, int type,
                                 int op, void* comm, void*) {
    return collective(kReduceScatter, send, recv, recvcount, type, op, 0, comm);
}
API ncclResult ncclAllGather(const void* send, void* recv, std::size_t sendcount, int type,
                             void* comm, void*) {
    return collective(kAllGather, send, recv, sendcount, type, kSum, 0, comm);
}

// ---- groups: calls run at once (see the header) ---------------------------------------------
API ncclResult ncclGroupStart() {
    group_depth++;
    return kSuccess;
}
API ncclResult ncclGroupEnd() {
    if (group_depth == 0)
        return report(kInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    group_depth--;
    return kSuccess;
}
