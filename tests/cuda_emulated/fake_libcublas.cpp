// fake_libcublas.cpp: a stand-in for libcublas.so next to fake_libcuda.cpp (device memory is
// host memory there). It has what src/backend/cuda/gemm.rs calls: handles, stream and math
// mode, the version, and cublasGemmEx for bf16 or f32 operands with f32 accumulation, in
// cuBLAS's column-major convention:
//
//     C[i + j·ldc] = alpha · Σ_p opA(i, p) · opB(p, j) + beta · C[i + j·ldc]
//     opA(i, p) = A[i + p·lda] (N) or A[p + i·lda] (T); opB(p, j) = B[p + j·ldb] (N) or
//     B[j + p·ldb] (T)
//
// As in cuBLAS, C is not read when beta is 0 (it may hold NaN), and a leading dimension below
// the rows of its stored matrix is CUBLAS_STATUS_INVALID_VALUE. Sums are f32 fused
// multiply-adds in order of p (the tensor-core and pedantic f32 paths of cuBLAS accumulate in
// f32 too, in another order); bf16 results are rounded to nearest even.

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

namespace {

constexpr int kSuccess = 0;
constexpr int kNotInitialized = 1;
constexpr int kInvalidValue = 7;
constexpr int kNotSupported = 15;

constexpr int kOpN = 0, kOpT = 1;
constexpr int kR32F = 0, kR16BF = 14;
constexpr int kCompute32F = 68, kCompute32FPedantic = 69;

struct Handle {
    void* stream = nullptr;
    int math_mode = 0;
};

float bf16_to_f32(std::uint16_t b) {
    std::uint32_t u = std::uint32_t(b) << 16;
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

float load(const void* p, int type, std::size_t i) {
    return type == kR16BF ? bf16_to_f32(static_cast<const std::uint16_t*>(p)[i])
                          : static_cast<const float*>(p)[i];
}

void store(void* p, int type, std::size_t i, float v) {
    if (type == kR16BF)
        static_cast<std::uint16_t*>(p)[i] = f32_to_bf16(v);
    else
        static_cast<float*>(p)[i] = v;
}

int fail(int code, const char* msg) {
    std::fprintf(stderr, "fake libcublas: %s\n", msg);
    return code;
}

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

API int cublasCreate_v2(void** handle) {
    if (!handle) return kInvalidValue;
    *handle = new Handle;
    return kSuccess;
}
API int cublasDestroy_v2(void* handle) {
    if (!handle) return kNotInitialized;
    delete static_cast<Handle*>(handle);
    return kSuccess;
}
API int cublasSetStream_v2(void* handle, void* stream) {
    if (!handle) return kNotInitialized;
    static_cast<Handle*>(handle)->stream = stream;
    return kSuccess;
}
API int cublasGetStream_v2(void* handle, void** stream) {
    if (!handle || !stream) return kNotInitialized;
    *stream = static_cast<Handle*>(handle)->stream;
    return kSuccess;
}
API int cublasSetMathMode(void* handle, int mode) {
    if (!handle) return kNotInitialized;
    static_cast<Handle*>(handle)->math_mode = mode;
    return kSuccess;
}
API int cublasGetVersion_v2(void* handle, int* version) {
    if (!handle || !version) return kNotInitialized;
    *version = 130000;
    return kSuccess;
}
API int cublasSetWorkspace_v2(void* handle, void*, std::size_t) {
    return handle ? kSuccess : kNotInitialized;
}

API int cublasGemmEx(void* handle, int transa, int transb, int m, int n, int k,
                     const void* alpha, const void* A, int atype, int lda, const void* B,
                     int btype, int ldb, const void* beta, void* C, int ctype, int ldc,
                     int compute, int /*algo*/) {
    if (!handle) return kNotInitialized;
    if (m < 0 || n < 0 || k < 0 || !alpha || !beta) return fail(kInvalidValue, "GemmEx: bad sizes");
    if ((transa != kOpN && transa != kOpT) || (transb != kOpN && transb != kOpT))
        return fail(kNotSupported, "GemmEx: only N and T operations are emulated");
    for (int t : {atype, btype, ctype})
        if (t != kR32F && t != kR16BF) return fail(kNotSupported, "GemmEx: type not emulated");
    if (compute != kCompute32F && compute != kCompute32FPedantic)
        return fail(kNotSupported, "GemmEx: compute type not emulated");
    if (compute == kCompute32FPedantic && (atype != kR32F || btype != kR32F || ctype != kR32F))
        return fail(kNotSupported, "GemmEx: pedantic f32 compute with non-f32 operands");
    const int a_rows = transa == kOpN ? m : k, b_rows = transb == kOpN ? k : n;
    if (lda < (a_rows > 1 ? a_rows : 1) || ldb < (b_rows > 1 ? b_rows : 1) ||
        ldc < (m > 1 ? m : 1))
        return fail(kInvalidValue, "GemmEx: a leading dimension is below its matrix's rows");
    if (m == 0 || n == 0) return kSuccess;
    const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
    std::vector<float> a_row(static_cast<std::size_t>(k));
    for (int i = 0; i < m; i++) {
        for (int p = 0; p < k; p++) {
            const std::size_t idx = transa == kOpN ? std::size_t(i) + std::size_t(p) * lda
                                                   : std::size_t(p) + std::size_t(i) * lda;
            a_row[p] = load(A, atype, idx);
        }
        for (int j = 0; j < n; j++) {
            float acc = 0.0f;
            for (int p = 0; p < k; p++) {
                const std::size_t idx = transb == kOpN ? std::size_t(p) + std::size_t(j) * ldb
                                                       : std::size_t(j) + std::size_t(p) * ldb;
                acc = std::fma(a_row[p], load(B, btype, idx), acc);
            }
            const std::size_t ci = std::size_t(i) + std::size_t(j) * ldc;
            float v = al * acc;
            if (be != 0.0f) v = std::fma(be, load(C, ctype, ci), v);
            store(C, ctype, ci, v);
        }
    }
    return kSuccess;
}
