// Included first by every kernel file: the launch macro, dynamic shared memory, and error checking, for both
// compilers. nvcc gets the real CUDA runtime; the host compiler gets the emulator (emu/cuda_emu.h), which
// defines the same names with the same meaning.
//
//   PA_LAUNCH(kernel, grid, block, dynamic_shared_bytes, stream, args...)
//       launches and checks; a failure throws pa::KernelError naming the kernel and the launch site.
//       Wrap a template instance in parentheses: PA_LAUNCH((sgemm<64, 64>), ...).
//   PA_DYNAMIC_SHARED(T, name)   inside a kernel: `T* name` points at the block's dynamic shared memory.
//   pa::set_max_dynamic_shared(kernel, bytes)   opt a kernel into more than 48 KB of dynamic shared memory.
//   pa::static_shared_bytes(kernel)   what the kernel's static __shared__ declarations take (-1: unknown).
#pragma once

#include <cstdint>
#include <string>

#include "errors.h"

#if defined(__CUDACC__)
#include <cuda_runtime.h>

#define PA_DYNAMIC_SHARED(T, name)                                    \
    extern __shared__ __align__(16) unsigned char pa_dynamic_shared_[]; \
    T* name = reinterpret_cast<T*>(pa_dynamic_shared_)

namespace pa {

inline void check_cuda(cudaError_t err, const char* what, const char* file, int line) {
    if (err != cudaSuccess)
        throw KernelError(std::string(what) + " (at " + file + ":" + std::to_string(line) + "): " +
                          cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

template <class... Params, class... Args>
void launch(const char* name, const char* file, int line, void (*kernel)(Params...), dim3 grid, dim3 block,
            size_t dynamic_shared, cudaStream_t stream, Args&&... args) {
    static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
    kernel<<<grid, block, dynamic_shared, stream>>>(std::forward<Args>(args)...);
    check_cuda(cudaGetLastError(), (std::string("kernel ") + name).c_str(), file, line);
}

template <class... Params>
void set_max_dynamic_shared(void (*kernel)(Params...), size_t bytes) {
    check_cuda(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
               "set_max_dynamic_shared", __FILE__, __LINE__);
}

// Bytes of static __shared__ memory the kernel declares.
template <class... Params>
long long static_shared_bytes(void (*kernel)(Params...)) {
    cudaFuncAttributes attr;
    check_cuda(cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(kernel)), "static_shared_bytes", __FILE__,
               __LINE__);
    return (long long)attr.sharedSizeBytes;
}

}  // namespace pa
#else
#include "emu/cuda_emu.h"
#endif

#define PA_LAUNCH(kernel, grid, block, dynamic_shared, stream, ...) \
    pa::launch(#kernel, __FILE__, __LINE__, kernel, grid, block, dynamic_shared, stream, __VA_ARGS__)

namespace pa {

inline cudaStream_t as_stream(void* s) { return reinterpret_cast<cudaStream_t>(s); }

inline unsigned ceil_div(long long a, long long b) { return unsigned((a + b - 1) / b); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace pa
