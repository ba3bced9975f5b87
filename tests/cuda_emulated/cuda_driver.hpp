// cuda_driver.hpp: the host side of an emulated kernel module. The harness (harness.rs)
// generates a main.cpp that includes cuda_shim.hpp, this file, the kernel source, then a table
// of entry points (CUDA_EMU_ENTRY) and calls cuda_emu::driver_main.
//
// Usage: <exe> <launch file> <output file>
// Launch file, little-endian:
//   u32 name length, name bytes; u32 grid[3]; u32 block[3]; u64 dynamic shared bytes;
//   u32 argument count, then per argument a u8 kind and its payload:
//     0 buffer: u64 byte length, bytes     1 null pointer
//     2 i32: 4 bytes   3 u32: 4 bytes   4 i64: 8 bytes   5 f32: 4 bytes
// Output file: every buffer argument after the launch, in argument order: u64 length, bytes.
// Errors (unknown entry, wrong argument count or kind, a write past the end of a buffer) go
// to stderr with exit status 2.

#pragma once

#include "cuda_shim.hpp"

#include <cstdio>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace cuda_emu {

enum class Kind : unsigned char { Buf = 0, Null = 1, I32 = 2, U32 = 3, I64 = 4, F32 = 5 };

struct Arg {
    Kind kind = Kind::Null;
    void* ptr = nullptr;  // Buf
    std::uint64_t len = 0;
    std::uint64_t bits = 0;  // scalars
};

[[noreturn]] inline void usage_error(const std::string& msg) {
    std::fprintf(stderr, "cuda_emu driver: %s\n", msg.c_str());
    std::exit(2);
}

inline const char* kind_name(Kind k) {
    switch (k) {
        case Kind::Buf: return "buffer";
        case Kind::Null: return "null";
        case Kind::I32: return "i32";
        case Kind::U32: return "u32";
        case Kind::I64: return "i64";
        case Kind::F32: return "f32";
    }
    return "?";
}

template <typename P> inline constexpr bool unsupported_param = false;

// The raw argument `a` as the kernel's parameter type P; a kind that does not fit P is an
// error, which catches host-side argument-order mistakes a real launch would silently accept.
template <typename P> P convert(const Arg& a, std::size_t i, const char* entry) {
    auto expect = [&](Kind want) {
        if (a.kind != want)
            usage_error(std::string(entry) + ": argument " + std::to_string(i) + " is " +
                        kind_name(want) + ", the launch passed " + kind_name(a.kind));
    };
    if constexpr (std::is_pointer_v<P>) {
        if (a.kind == Kind::Null) return nullptr;
        expect(Kind::Buf);
        return static_cast<P>(a.ptr);
    } else {
        P v;
        if constexpr (std::is_same_v<P, int>) expect(Kind::I32);
        else if constexpr (std::is_same_v<P, unsigned int>) expect(Kind::U32);
        else if constexpr (std::is_integral_v<P> && sizeof(P) == 8) expect(Kind::I64);
        else if constexpr (std::is_same_v<P, float>) expect(Kind::F32);
        else static_assert(unsupported_param<P>, "kernel parameter type not emulated");
        std::memcpy(&v, &a.bits, sizeof(P));
        return v;
    }
}

using Invoker = void (*)(dim3, dim3, std::size_t, const std::vector<Arg>&);

template <typename... P>
void invoke(void (*f)(P...), const char* entry, dim3 grid, dim3 block, std::size_t smem,
            const std::vector<Arg>& args) {
    if (args.size() != sizeof...(P))
        usage_error(std::string(entry) + " takes " + std::to_string(sizeof...(P)) +
                    " arguments, the launch passed " + std::to_string(args.size()));
    // Converted once; every thread calls the kernel with its own copy of the values.
    auto params = [&]<std::size_t... I>(std::index_sequence<I...>) {
        return std::tuple<P...>(convert<P>(args[I], I, entry)...);
    }(std::index_sequence_for<P...>{});
    launch(grid, block, smem, [&] { std::apply(f, params); });
}

struct Entry {
    const char* name;
    Invoker run;
};

#define CUDA_EMU_ENTRY(f)                                                                    \
    cuda_emu::Entry {                                                                        \
        #f, [](dim3 g, dim3 b, std::size_t s, const std::vector<cuda_emu::Arg>& a) {         \
            cuda_emu::invoke(&f, #f, g, b, s, a);                                            \
        }                                                                                    \
    }

struct Reader {
    std::FILE* f;
    template <typename T> T get() {
        T v;
        if (std::fread(&v, sizeof(T), 1, f) != 1) usage_error("launch file truncated");
        return v;
    }
    dim3 get_dim3() {
        dim3 d;
        d.x = get<std::uint32_t>();
        d.y = get<std::uint32_t>();
        d.z = get<std::uint32_t>();
        return d;
    }
    void bytes(void* p, std::uint64_t n) {
        if (n && std::fread(p, 1, n, f) != n) usage_error("launch file truncated");
    }
};

inline int driver_main(int argc, char** argv, const Entry* entries, std::size_t n_entries) {
    if (argc != 3) usage_error("usage: <exe> <launch file> <output file>");
    std::FILE* in = std::fopen(argv[1], "rb");
    if (!in) usage_error(std::string("cannot open ") + argv[1]);
    Reader r{in};
    std::string name(r.get<std::uint32_t>(), '\0');
    r.bytes(name.data(), name.size());
    const dim3 grid = r.get_dim3(), block = r.get_dim3();
    const std::uint64_t smem = r.get<std::uint64_t>();
    std::vector<Arg> args(r.get<std::uint32_t>());
    for (Arg& a : args) {
        a.kind = static_cast<Kind>(r.get<unsigned char>());
        switch (a.kind) {
            case Kind::Buf:
                a.len = r.get<std::uint64_t>();
                a.ptr = alloc_guarded(a.len);
                r.bytes(a.ptr, a.len);
                break;
            case Kind::Null: break;
            case Kind::I32:
            case Kind::U32:
            case Kind::F32: a.bits = r.get<std::uint32_t>(); break;
            case Kind::I64: a.bits = r.get<std::uint64_t>(); break;
            default: usage_error("unknown argument kind");
        }
    }
    std::fclose(in);

    const Entry* e = nullptr;
    for (std::size_t i = 0; i < n_entries; i++)
        if (name == entries[i].name) e = &entries[i];
    if (!e) usage_error("no entry point named " + name);
    e->run(grid, block, smem, args);

    std::FILE* out = std::fopen(argv[2], "wb");
    if (!out) usage_error(std::string("cannot create ") + argv[2]);
    for (std::size_t i = 0; i < args.size(); i++) {
        Arg& a = args[i];
        if (a.kind != Kind::Buf) continue;
        auto* p = static_cast<unsigned char*>(a.ptr);
        if (!guard_intact(p, a.len))
            usage_error(name + " wrote past the end of argument " + std::to_string(i) + " (" +
                        std::to_string(a.len) + " bytes)");
        std::fwrite(&a.len, sizeof a.len, 1, out);
        if (a.len) std::fwrite(p, 1, a.len, out);
        free_guarded(p);
    }
    if (std::fclose(out) != 0) usage_error("writing the output file failed");
    return 0;
}

}  // namespace cuda_emu
