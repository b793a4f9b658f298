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
//   pa::sm_count()   the current device's streaming multiprocessors (the emulator: the count it stands for).
//   pa::Scratch(bytes, stream)   device workspace for the launches of one launcher call, ordered on its stream.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
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

// Streaming multiprocessors of the current device.
inline int sm_count() {
    int device = 0, sms = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice", __FILE__, __LINE__);
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute",
               __FILE__, __LINE__);
    return sms;
}

// Workspace taken from the device's stream-ordered pool (cudaMallocAsync) and given back to it, on the same
// stream, when the launcher returns: the kernels queued before the free still own it, nothing synchronises, and
// a CUDA Graph capture records both as memory nodes. The pool keeps what it was given (release threshold: all),
// so the next step's workspace costs no driver allocation.
class Scratch {
public:
    Scratch(size_t bytes, cudaStream_t stream) : stream_(stream) {
        if (bytes == 0) return;
        keep_pool_memory();
        check_cuda(cudaMallocAsync(&data_, bytes, stream), "cudaMallocAsync (kernel workspace)", __FILE__, __LINE__);
    }
    ~Scratch() {
        if (data_) cudaFreeAsync(data_, stream_);  // an error here resurfaces at the next checked call
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    float* floats() const { return static_cast<float*>(data_); }

private:
    static void keep_pool_memory() {
        static std::atomic<unsigned long long> done{0};  // one bit per device
        int device = 0;
        check_cuda(cudaGetDevice(&device), "cudaGetDevice", __FILE__, __LINE__);
        const unsigned long long bit = 1ull << (device & 63);
        if (done.load() & bit) return;
        cudaMemPool_t pool;
        check_cuda(cudaDeviceGetDefaultMemPool(&pool, device), "cudaDeviceGetDefaultMemPool", __FILE__, __LINE__);
        unsigned long long keep = ~0ull;
        check_cuda(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep), "cudaMemPoolSetAttribute",
                   __FILE__, __LINE__);
        done.fetch_or(bit);
    }
    cudaStream_t stream_;
    void* data_ = nullptr;
};

}  // namespace pa
#else
#include "emu/cuda_emu.h"

namespace pa {

// The emulator stands for a card with this many SMs (pa_emu::emulated_sm_count: 132, an H100's or H200's,
// unless set), so that grid-shaping choices such as split-K are the ones that card would make.
inline int sm_count() { return pa_emu::emulated_sm_count(); }

// Host memory for the emulator's synchronous launches, 256-byte aligned as cudaMalloc's is.
class Scratch {
public:
    Scratch(size_t bytes, cudaStream_t) {
        if (bytes) data_ = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
        if (bytes && !data_) throw KernelError("kernel workspace: out of host memory");
    }
    ~Scratch() { std::free(data_); }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    float* floats() const { return static_cast<float*>(data_); }

private:
    void* data_ = nullptr;
};

}  // namespace pa
#endif

#define PA_LAUNCH(kernel, grid, block, dynamic_shared, stream, ...) \
    pa::launch(#kernel, __FILE__, __LINE__, kernel, grid, block, dynamic_shared, stream, __VA_ARGS__)

namespace pa {

inline cudaStream_t as_stream(void* s) { return reinterpret_cast<cudaStream_t>(s); }

inline unsigned ceil_div(long long a, long long b) { return unsigned((a + b - 1) / b); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace pa
