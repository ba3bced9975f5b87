// fake_libcuda.cpp: a stand-in for the NVIDIA driver library (libcuda.so) that runs the
// project's kernels on the CPU, so the CUDA backend's host code (cudarc calls, buffer
// management, launch shapes, cuBLAS calls, the KV cache of generation) runs in CI unchanged.
//
// Built by tests/cuda_emulated/gpu.rs into a folder that also holds fake_libcublas.cpp's
// libcublas.so and one kernel library per kernels/<module>.cu (kmod_<module>.so, from
// cuda_shim.hpp + cuda_module.hpp); a test process started with that folder first on
// LD_LIBRARY_PATH and CAFT_EMU_MODULES=<folder> loads this file instead of the driver.
//
// The device: one GPU reporting compute capability 9.0 (so NVRTC compiles real sm_90 cubins,
// which are loaded and searched for the kernel names but not executed), 132 SMs, 80 GiB
// ($CAFT_EMU_DEVICE_MEM_MIB to pretend less); $CAFT_EMU_DEVICE_COUNT GPUs, of which only
// device 0 accepts a context.
// Device memory is host memory: CUdeviceptr is the host address. Everything is synchronous on
// the calling thread; streams and events only keep their bookkeeping.
//
// Checks a real driver would make, and some it would not:
// - every allocation is 256-byte aligned, filled with 0xff bytes (a float NaN; reads of memory
//   nobody wrote show up) and followed by guard bytes checked after every launch and at free:
//   a kernel writing past the end of a buffer fails with the kernel's name;
// - copies and memsets must lie inside one live allocation; frees must name one;
// - a launch checks the block size (<= 1024 threads), and dynamic shared memory above 48 KiB
//   needs CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES first (at most 227 KiB, as on
//   Hopper);
// - cuModuleGetFunction fails unless the module's image (cubin or PTX) contains the name.
// Failures print a line starting with "fake libcuda:" to stderr and return an error code.
//
// Memory accounting for tests (tests/cuda_plan.rs holds the memory plan to it): the bytes of
// live allocations, exactly as asked (addresses are 256-byte aligned, sizes not rounded), and
// their peak; caft_emu_mem_reset_peak() restarts the peak at the current bytes and returns
// them, caft_emu_mem_peak() reads it. A test reaches both with dlopen/dlsym of this library.
//
// A device fault on demand: CAFT_EMU_FAIL_KERNEL=<name>:<n> makes the n-th launch of kernel
// <name> fail with CUDA_ERROR_LAUNCH_FAILED, and, as on a real GPU, the context is then
// unusable: every later call that touches the device returns the same error.

#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <dlfcn.h>
#include <map>
#include <mutex>
#include <new>
#include <string>
#include <utility>
#include <vector>

// caft_emu_launch of a kernel library (cuda_module.hpp): run entry `name`, or with a null grid
// only look it up; 0 when the library has the entry.
extern "C" typedef int (*RawLaunchFn)(const char* name, const unsigned* grid,
                                      const unsigned* block, std::size_t smem, void** params);

namespace {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;

constexpr CUresult kSuccess = 0;
constexpr CUresult kInvalidValue = 1;
constexpr CUresult kOutOfMemory = 2;
constexpr CUresult kNotInitialized = 3;
constexpr CUresult kDeviceUnavailable = 46;
constexpr CUresult kInvalidDevice = 101;
constexpr CUresult kInvalidImage = 200;
constexpr CUresult kInvalidHandle = 400;
constexpr CUresult kNotFound = 500;
constexpr CUresult kLaunchOutOfResources = 701;
constexpr CUresult kLaunchFailed = 719;

constexpr std::size_t kGuard = 256;
constexpr unsigned char kGuardByte = 0xa5;
constexpr std::align_val_t kAlign{256};
// 80 GiB, or $CAFT_EMU_DEVICE_MEM_MIB (to test what a full GPU does to a command).
inline std::size_t total_mem() {
    static const std::size_t bytes = [] {
        const char* v = std::getenv("CAFT_EMU_DEVICE_MEM_MIB");
        return v ? std::size_t(std::strtoull(v, nullptr, 10)) << 20 : std::size_t(80) << 30;
    }();
    return bytes;
}
constexpr int kDefaultSmem = 48 * 1024;
constexpr int kMaxOptinSmem = 227 * 1024;

struct Function {
    std::string name;
    RawLaunchFn launch = nullptr;
    int max_dynamic_smem = kDefaultSmem;
};

struct Module {
    std::vector<unsigned char> image;
    std::map<std::string, Function*> functions;
};

struct Event {
    std::chrono::steady_clock::time_point at;
};

struct State {
    std::mutex mu;
    bool faulted = false;  // a launch failed: every later device call fails (sticky)
    bool initialised = false;
    std::map<CUdeviceptr, std::size_t> allocs;  // base -> bytes
    std::size_t allocated = 0;
    std::size_t peak = 0;  // the most `allocated` has been since the last reset
    std::vector<RawLaunchFn> kernel_libs;  // caft_emu_launch of each kmod_*.so
};

State& state() {
    static State s;
    return s;
}

// The launch CAFT_EMU_FAIL_KERNEL=<name>:<n> asks to fail: (name, n), n = 0 for none.
const std::pair<std::string, long>& fail_kernel() {
    static const std::pair<std::string, long> spec = [] {
        const char* v = std::getenv("CAFT_EMU_FAIL_KERNEL");
        if (!v) return std::pair<std::string, long>{"", 0};
        std::string text = v;
        const auto colon = text.rfind(':');
        if (colon == std::string::npos) return std::pair<std::string, long>{text, 1};
        return std::pair<std::string, long>{text.substr(0, colon),
                                            std::strtol(text.c_str() + colon + 1, nullptr, 10)};
    }();
    return spec;
}

// After a device fault every call that touches the device fails, as with a real driver.
#define STICKY(s)                                                                            \
    do {                                                                                     \
        if ((s).faulted) return kLaunchFailed;                                               \
    } while (0)

CUresult fail(CUresult code, const std::string& msg) {
    std::fprintf(stderr, "fake libcuda: %s\n", msg.c_str());
    return code;
}

// The live allocation holding [p, p + bytes), or allocs.end().
std::map<CUdeviceptr, std::size_t>::iterator find_alloc(State& s, CUdeviceptr p,
                                                        std::size_t bytes) {
    auto it = s.allocs.upper_bound(p);
    if (it == s.allocs.begin()) return s.allocs.end();
    --it;
    if (p + bytes > it->first + it->second) return s.allocs.end();
    return it;
}

CUresult check_range(State& s, CUdeviceptr p, std::size_t bytes, const char* what) {
    if (bytes == 0) return kSuccess;
    if (find_alloc(s, p, bytes) == s.allocs.end())
        return fail(kInvalidValue, std::string(what) + ": " + std::to_string(bytes) +
                                       " bytes at 0x" + std::to_string(p) +
                                       " are not inside one live allocation");
    return kSuccess;
}

bool guard_intact(CUdeviceptr base, std::size_t bytes) {
    auto* p = reinterpret_cast<const unsigned char*>(base);
    for (std::size_t i = 0; i < kGuard; i++)
        if (p[bytes + i] != kGuardByte) return false;
    return true;
}

CUresult alloc(CUdeviceptr* out, std::size_t bytes) {
    if (!out) return kInvalidValue;
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    STICKY(s);
    if (s.allocated + bytes > total_mem()) return kOutOfMemory;
    auto* p = static_cast<unsigned char*>(::operator new(bytes + kGuard, kAlign, std::nothrow));
    if (!p) return kOutOfMemory;
    std::memset(p, 0xff, bytes);
    std::memset(p + bytes, kGuardByte, kGuard);
    *out = reinterpret_cast<CUdeviceptr>(p);
    s.allocs[*out] = bytes;
    s.allocated += bytes;
    if (s.allocated > s.peak) s.peak = s.allocated;
    return kSuccess;
}

CUresult release(CUdeviceptr p) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    STICKY(s);
    auto it = s.allocs.find(p);
    if (it == s.allocs.end())
        return fail(kInvalidValue, "cuMemFree of an address that is no live allocation");
    if (!guard_intact(it->first, it->second))
        return fail(kInvalidValue, "a buffer of " + std::to_string(it->second) +
                                       " bytes was written past its end (found at free)");
    s.allocated -= it->second;
    ::operator delete(reinterpret_cast<unsigned char*>(p), kAlign);
    s.allocs.erase(it);
    return kSuccess;
}

CUresult copy(void* dst, const void* src, std::size_t bytes, CUdeviceptr dev_dst,
              CUdeviceptr dev_src, const char* what) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    STICKY(s);
    if (dev_dst)
        if (CUresult r = check_range(s, dev_dst, bytes, what)) return r;
    if (dev_src)
        if (CUresult r = check_range(s, dev_src, bytes, what)) return r;
    if (bytes) std::memmove(dst, src, bytes);
    return kSuccess;
}

template <typename T> CUresult fill(CUdeviceptr p, T value, std::size_t count, const char* what) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    STICKY(s);
    if (CUresult r = check_range(s, p, count * sizeof(T), what)) return r;
    if (p % alignof(T)) return fail(kInvalidValue, std::string(what) + ": misaligned address");
    T* q = reinterpret_cast<T*>(p);
    for (std::size_t i = 0; i < count; i++) q[i] = value;
    return kSuccess;
}

// Load every kmod_*.so of $CAFT_EMU_MODULES.
CUresult init_once() {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.initialised) return kSuccess;
    const char* dir = std::getenv("CAFT_EMU_MODULES");
    if (!dir) return fail(kNotInitialized, "CAFT_EMU_MODULES (the kernel libraries' folder) unset");
    DIR* d = opendir(dir);
    if (!d) return fail(kNotInitialized, std::string("cannot read ") + dir);
    while (dirent* e = readdir(d)) {
        std::string name = e->d_name;
        if (name.rfind("kmod_", 0) != 0 || name.size() < 3 ||
            name.compare(name.size() - 3, 3, ".so") != 0)
            continue;
        std::string path = std::string(dir) + "/" + name;
        void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            closedir(d);
            return fail(kNotInitialized, std::string("dlopen ") + path + ": " + dlerror());
        }
        auto f = reinterpret_cast<RawLaunchFn>(dlsym(h, "caft_emu_launch"));
        if (!f) {
            closedir(d);
            return fail(kNotInitialized, path + " has no caft_emu_launch");
        }
        s.kernel_libs.push_back(f);
    }
    closedir(d);
    if (s.kernel_libs.empty()) return fail(kNotInitialized, std::string("no kmod_*.so in ") + dir);
    s.initialised = true;
    return kSuccess;
}

bool image_contains(const Module& m, const std::string& name) {
    const auto& im = m.image;
    if (name.empty() || im.size() < name.size()) return false;
    for (std::size_t i = 0; i + name.size() <= im.size(); i++) {
        // Whole names only: the match must not continue as an identifier.
        if (std::memcmp(&im[i], name.data(), name.size()) == 0) {
            const std::size_t j = i + name.size();
            const bool tail_ok =
                j == im.size() || !(std::isalnum(im[j]) || im[j] == '_');
            const bool head_ok = i == 0 || !(std::isalnum(im[i - 1]) || im[i - 1] == '_');
            if (head_ok && tail_ok) return true;
        }
    }
    return false;
}

// Bytes of a module image: an ELF (cubin) up to the end of its section and program header
// tables, else NUL-terminated PTX text.
std::size_t image_size(const unsigned char* p) {
    if (std::memcmp(p, "\x7f" "ELF", 4) == 0 && p[4] == 2) {
        std::uint64_t phoff, shoff;
        std::uint16_t phentsize, phnum, shentsize, shnum;
        std::memcpy(&phoff, p + 0x20, 8);
        std::memcpy(&shoff, p + 0x28, 8);
        std::memcpy(&phentsize, p + 0x36, 2);
        std::memcpy(&phnum, p + 0x38, 2);
        std::memcpy(&shentsize, p + 0x3a, 2);
        std::memcpy(&shnum, p + 0x3c, 2);
        std::uint64_t end = shoff + std::uint64_t(shentsize) * shnum;
        std::uint64_t ph_end = phoff + std::uint64_t(phentsize) * phnum;
        return static_cast<std::size_t>(end > ph_end ? end : ph_end);
    }
    return std::strlen(reinterpret_cast<const char*>(p)) + 1;
}

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

// ---- initialisation, device, context --------------------------------------------------------
API CUresult cuInit(unsigned) { return init_once(); }
API CUresult cuDriverGetVersion(int* v) {
    if (!v) return kInvalidValue;
    *v = 13000;
    return kSuccess;
}
// $CAFT_EMU_DEVICE_COUNT GPUs (default 1) on the node; $CUDA_VISIBLE_DEVICES, when set, shows
// the listed ones (numbers, up to the first that is not a device, as the driver reads it), so a
// launcher can give each process one GPU. Only visible device 0 takes a context, the others
// answer as GPUs held by other jobs in exclusive mode do.
int device_count() {
    static const int n = [] {
        const char* v = std::getenv("CAFT_EMU_DEVICE_COUNT");
        const int c = v ? std::atoi(v) : 1;
        const int node = c > 0 ? c : 1;
        const char* vis = std::getenv("CUDA_VISIBLE_DEVICES");
        if (!vis) return node;
        int shown = 0;
        for (const char* p = vis; *p;) {
            char* end = nullptr;
            const long id = std::strtol(p, &end, 10);
            if (end == p || id < 0 || id >= node) break;
            ++shown;
            while (*end == ' ') ++end;
            if (*end != ',') break;
            p = end + 1;
        }
        return shown;
    }();
    return n;
}
API CUresult cuDeviceGetCount(int* n) {
    if (!n) return kInvalidValue;
    *n = device_count();
    return kSuccess;
}
API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (!d) return kInvalidValue;
    if (ordinal < 0 || ordinal >= device_count()) return kInvalidDevice;
    *d = ordinal;
    return kSuccess;
}
API CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    if (!name || len <= 0) return kInvalidValue;
    std::snprintf(name, len, "caft-fast emulated GPU (CPU)");
    return kSuccess;
}
API CUresult cuDeviceTotalMem_v2(std::size_t* bytes, CUdevice) {
    if (!bytes) return kInvalidValue;
    *bytes = total_mem();
    return kSuccess;
}
API CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    if (!v) return kInvalidValue;
    switch (attr) {
        case 1: *v = 1024; break;               // max threads per block
        case 2: *v = 1024; break;               // max block dim x
        case 3: *v = 1024; break;               // max block dim y
        case 4: *v = 64; break;                 // max block dim z
        case 5: *v = 2147483647; break;         // max grid dim x
        case 6: case 7: *v = 65535; break;      // max grid dim y, z
        case 8: *v = kDefaultSmem; break;       // shared memory per block
        case 10: *v = 32; break;                // warp size
        case 16: *v = 132; break;               // multiprocessors
        case 75: *v = 9; break;                 // compute capability major
        case 76: *v = 0; break;                 // compute capability minor
        case 81: *v = 228 * 1024; break;        // shared memory per multiprocessor
        case 97: *v = kMaxOptinSmem; break;     // opt-in shared memory per block
        case 115: *v = 0; break;                // memory pools: no (synchronous allocation)
        default: *v = 0; break;
    }
    return kSuccess;
}
API CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice dev) {
    static int the_context;
    if (!ctx) return kInvalidValue;
    if (dev != 0) return fail(kDeviceUnavailable, "device " + std::to_string(dev) + " is busy");
    *ctx = &the_context;
    return kSuccess;
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return kSuccess; }
API CUresult cuCtxSetCurrent(void*) { return kSuccess; }
API CUresult cuCtxGetCurrent(void** ctx) {
    return cuDevicePrimaryCtxRetain(ctx, 0);
}
API CUresult cuCtxPushCurrent_v2(void*) { return kSuccess; }
API CUresult cuCtxPopCurrent_v2(void** ctx) {
    if (ctx) cuDevicePrimaryCtxRetain(ctx, 0);
    return kSuccess;
}
API CUresult cuCtxGetDevice(CUdevice* d) { return cuDeviceGet(d, 0); }
API CUresult cuCtxSynchronize() { return state().faulted ? kLaunchFailed : kSuccess; }

API CUresult cuGetErrorString(CUresult e, const char** s) {
    if (!s) return kInvalidValue;
    switch (e) {
        case kSuccess: *s = "no error"; break;
        case kInvalidValue: *s = "invalid argument"; break;
        case kOutOfMemory: *s = "out of memory"; break;
        case kNotInitialized: *s = "initialization error"; break;
        case kDeviceUnavailable: *s = "CUDA-capable device(s) is/are busy or unavailable"; break;
        case kInvalidImage: *s = "device kernel image is invalid"; break;
        case kInvalidHandle: *s = "invalid resource handle"; break;
        case kNotFound: *s = "named symbol not found"; break;
        case kLaunchOutOfResources: *s = "too many resources requested for launch"; break;
        case kLaunchFailed: *s = "unspecified launch failure"; break;
        default: *s = "unknown error"; break;
    }
    return kSuccess;
}
API CUresult cuGetErrorName(CUresult e, const char** s) { return cuGetErrorString(e, s); }

// ---- streams and events (everything already ran when a call returns) --------------------------
API CUresult cuStreamCreate(void** st, unsigned) {
    if (!st) return kInvalidValue;
    *st = new int(0);
    return kSuccess;
}
API CUresult cuStreamCreateWithPriority(void** st, unsigned f, int) { return cuStreamCreate(st, f); }
API CUresult cuStreamDestroy_v2(void* st) {
    delete static_cast<int*>(st);
    return kSuccess;
}
API CUresult cuStreamSynchronize(void*) { return state().faulted ? kLaunchFailed : kSuccess; }
API CUresult cuStreamQuery(void*) { return kSuccess; }
API CUresult cuStreamWaitEvent(void*, void*, unsigned) { return kSuccess; }
API CUresult cuLaunchHostFunc(void*, void (*fn)(void*), void* data) {
    fn(data);
    return kSuccess;
}

API CUresult cuEventCreate(void** ev, unsigned) {
    if (!ev) return kInvalidValue;
    *ev = new Event{std::chrono::steady_clock::now()};
    return kSuccess;
}
API CUresult cuEventRecord(void* ev, void*) {
    if (!ev) return kInvalidHandle;
    static_cast<Event*>(ev)->at = std::chrono::steady_clock::now();
    return kSuccess;
}
API CUresult cuEventRecordWithFlags(void* ev, void* st, unsigned) { return cuEventRecord(ev, st); }
API CUresult cuEventSynchronize(void*) { return state().faulted ? kLaunchFailed : kSuccess; }
API CUresult cuEventQuery(void*) { return kSuccess; }
API CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    if (!ms || !a || !b) return kInvalidValue;
    *ms = std::chrono::duration<float, std::milli>(static_cast<Event*>(b)->at -
                                                   static_cast<Event*>(a)->at)
              .count();
    return kSuccess;
}
API CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }
API CUresult cuEventDestroy_v2(void* ev) {
    delete static_cast<Event*>(ev);
    return kSuccess;
}

// ---- memory ---------------------------------------------------------------------------------
API CUresult cuMemGetInfo_v2(std::size_t* free, std::size_t* total) {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    if (free) *free = total_mem() - s.allocated;
    if (total) *total = total_mem();
    return kSuccess;
}
API CUresult cuMemAlloc_v2(CUdeviceptr* p, std::size_t bytes) { return alloc(p, bytes); }
API std::size_t caft_emu_mem_reset_peak() {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    s.peak = s.allocated;
    return s.allocated;
}
API std::size_t caft_emu_mem_peak() {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    return s.peak;
}
API CUresult cuMemAllocAsync(CUdeviceptr* p, std::size_t bytes, void*) { return alloc(p, bytes); }
API CUresult cuMemFree_v2(CUdeviceptr p) { return release(p); }
API CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return release(p); }
API CUresult cuMemAllocHost_v2(void** p, std::size_t bytes) {
    if (!p) return kInvalidValue;
    *p = std::malloc(bytes ? bytes : 1);
    return *p ? kSuccess : kOutOfMemory;
}
API CUresult cuMemHostAlloc(void** p, std::size_t bytes, unsigned) { return cuMemAllocHost_v2(p, bytes); }
API CUresult cuMemFreeHost(void* p) {
    std::free(p);
    return kSuccess;
}
API CUresult cuMemHostRegister_v2(void*, std::size_t, unsigned) { return kSuccess; }
API CUresult cuMemHostUnregister(void*) { return kSuccess; }

API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, std::size_t n) {
    return copy(reinterpret_cast<void*>(dst), src, n, dst, 0, "cuMemcpyHtoD");
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, std::size_t n, void*) {
    return cuMemcpyHtoD_v2(dst, src, n);
}
API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, std::size_t n) {
    return copy(dst, reinterpret_cast<const void*>(src), n, 0, src, "cuMemcpyDtoH");
}
API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, std::size_t n, void*) {
    return cuMemcpyDtoH_v2(dst, src, n);
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, std::size_t n) {
    return copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n, dst, src,
                "cuMemcpyDtoD");
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, std::size_t n, void*) {
    return cuMemcpyDtoD_v2(dst, src, n);
}
API CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, std::size_t n) {
    return fill<unsigned char>(p, v, n, "cuMemsetD8");
}
API CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, std::size_t n, void*) {
    return cuMemsetD8_v2(p, v, n);
}
API CUresult cuMemsetD16_v2(CUdeviceptr p, unsigned short v, std::size_t n) {
    return fill<unsigned short>(p, v, n, "cuMemsetD16");
}
API CUresult cuMemsetD16Async(CUdeviceptr p, unsigned short v, std::size_t n, void*) {
    return cuMemsetD16_v2(p, v, n);
}
API CUresult cuMemsetD32_v2(CUdeviceptr p, unsigned v, std::size_t n) {
    return fill<unsigned>(p, v, n, "cuMemsetD32");
}
API CUresult cuMemsetD32Async(CUdeviceptr p, unsigned v, std::size_t n, void*) {
    return cuMemsetD32_v2(p, v, n);
}

// ---- modules and launches -------------------------------------------------------------------
API CUresult cuModuleLoadData(void** module, const void* image) {
    if (!module || !image) return kInvalidValue;
    auto* p = static_cast<const unsigned char*>(image);
    auto* m = new Module;
    m->image.assign(p, p + image_size(p));
    *module = m;
    return kSuccess;
}
API CUresult cuModuleLoadDataEx(void** module, const void* image, unsigned, void*, void*) {
    return cuModuleLoadData(module, image);
}
API CUresult cuModuleUnload(void* module) {
    auto* m = static_cast<Module*>(module);
    if (!m) return kInvalidHandle;
    for (auto& [_, f] : m->functions) delete f;
    delete m;
    return kSuccess;
}
API CUresult cuModuleGetFunction(void** out, void* module, const char* name) {
    auto* m = static_cast<Module*>(module);
    if (!out || !m || !name) return kInvalidValue;
    if (auto it = m->functions.find(name); it != m->functions.end()) {
        *out = it->second;
        return kSuccess;
    }
    if (!image_contains(*m, name))
        return fail(kNotFound, std::string("cuModuleGetFunction: ") + name +
                                   " is not in the loaded module image");
    State& s = state();
    RawLaunchFn found = nullptr;
    for (RawLaunchFn lib : s.kernel_libs)
        if (lib(name, nullptr, nullptr, 0, nullptr) == 0) found = lib;  // a lookup only
    if (!found)
        return fail(kNotFound, std::string("cuModuleGetFunction: no emulated kernel named ") + name);
    auto* f = new Function{name, found, kDefaultSmem};
    m->functions[name] = f;
    *out = f;
    return kSuccess;
}
API CUresult cuFuncSetAttribute(void* func, int attr, int value) {
    auto* f = static_cast<Function*>(func);
    if (!f) return kInvalidHandle;
    if (attr == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value > kMaxOptinSmem)
            return fail(kInvalidValue, f->name + ": max dynamic shared memory " +
                                           std::to_string(value) + " exceeds the device's " +
                                           std::to_string(kMaxOptinSmem));
        f->max_dynamic_smem = value;
    }
    return kSuccess;
}
API CUresult cuFuncGetAttribute(int* v, int attr, void* func) {
    auto* f = static_cast<Function*>(func);
    if (!v || !f) return kInvalidValue;
    switch (attr) {
        case 0: *v = 1024; break;                   // max threads per block
        case 8: *v = f->max_dynamic_smem; break;    // max dynamic shared memory
        default: *v = 0; break;
    }
    return kSuccess;
}
API CUresult cuLaunchKernel(void* func, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                            unsigned by, unsigned bz, unsigned smem, void*, void** params,
                            void** extra) {
    auto* f = static_cast<Function*>(func);
    if (!f) return kInvalidHandle;
    if (extra) return fail(kInvalidValue, f->name + ": the `extra` launch form is not emulated");
    const unsigned long long threads = 1ull * bx * by * bz;
    if (gx == 0 || gy == 0 || gz == 0 || threads == 0 || threads > 1024 || gy > 65535 || gz > 65535)
        return fail(kInvalidValue, f->name + ": invalid launch shape grid (" +
                                       std::to_string(gx) + "," + std::to_string(gy) + "," +
                                       std::to_string(gz) + ") block (" + std::to_string(bx) +
                                       "," + std::to_string(by) + "," + std::to_string(bz) + ")");
    if (int(smem) > f->max_dynamic_smem)
        return fail(kInvalidValue, f->name + ": " + std::to_string(smem) +
                                       " bytes of dynamic shared memory, above the function's "
                                       "limit of " + std::to_string(f->max_dynamic_smem) +
                                       " (cuFuncSetAttribute raises it)");
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mu);
    STICKY(s);
    if (const auto& [name, nth] = fail_kernel(); nth > 0 && name == f->name) {
        static long launches = 0;
        if (++launches == nth) {
            s.faulted = true;
            return fail(kLaunchFailed, f->name + ": launch " + std::to_string(nth) +
                                           " fails as CAFT_EMU_FAIL_KERNEL asks");
        }
    }
    const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
    if (f->launch(f->name.c_str(), grid, block, smem, params) != 0)
        return fail(kNotFound, f->name + " vanished from its kernel library");
    for (auto& [base, bytes] : s.allocs)
        if (!guard_intact(base, bytes))
            return fail(kLaunchFailed,
                        f->name + " wrote past the end of a buffer of " + std::to_string(bytes) +
                            " bytes");
    return kSuccess;
}
