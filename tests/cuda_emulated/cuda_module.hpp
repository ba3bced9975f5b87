// cuda_module.hpp: one kernel source built as a shared library for fake_libcuda.cpp.
//
// The generated module file includes cuda_shim.hpp, the kernel source, this header, then a
// table of CUDA_EMU_RAW_ENTRY(name) and CUDA_EMU_MODULE_EXPORT(table). The library exports
// caft_emu_launch (fake_libcuda.cpp's RawLaunchFn): it runs entry `name` on the grid with the arguments as
// cuLaunchKernel passes them (params[i] points to the value of parameter i), returning 0, or 1
// when the library has no such entry. With a null grid it only answers whether it has one.

#pragma once

#include "cuda_shim.hpp"

#include <cstddef>
#include <cstring>
#include <tuple>
#include <utility>

namespace cuda_emu {

// Each parameter is read from the value params[I] points to, as the driver does.
template <typename... P>
void invoke_raw(void (*f)(P...), dim3 grid, dim3 block, std::size_t smem, void** params) {
    auto values = [&]<std::size_t... I>(std::index_sequence<I...>) {
        return std::tuple<P...>(*static_cast<P*>(params[I])...);
    }(std::index_sequence_for<P...>{});
    launch(grid, block, smem, [&] { std::apply(f, values); });
}

struct RawEntry {
    const char* name;
    void (*run)(dim3, dim3, std::size_t, void**);
};

}  // namespace cuda_emu

#define CUDA_EMU_RAW_ENTRY(f)                                                                \
    cuda_emu::RawEntry {                                                                     \
        #f, [](dim3 g, dim3 b, std::size_t s, void** p) { cuda_emu::invoke_raw(&f, g, b, s, p); } \
    }

#define CUDA_EMU_MODULE_EXPORT(table)                                                        \
    extern "C" __attribute__((visibility("default"))) int caft_emu_launch(                   \
        const char* name, const unsigned* grid, const unsigned* block, std::size_t smem,     \
        void** params) {                                                                     \
        for (const cuda_emu::RawEntry& e : table) {                                          \
            if (std::strcmp(e.name, name) != 0) continue;                                    \
            if (grid)                                                                        \
                e.run(dim3(grid[0], grid[1], grid[2]), dim3(block[0], block[1], block[2]),   \
                      smem, params);                                                         \
            return 0;                                                                        \
        }                                                                                    \
        return 1;                                                                            \
    }
