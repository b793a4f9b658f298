// The CUDA C++ that our kernels use, defined for the host compiler, so the same .cu files run on a CPU.
//
// How a launch runs (details in runtime.cpp):
//   - every CUDA thread is a user-level fiber; a block's fibers all run on one OS thread, cooperatively:
//     a fiber runs until it reaches __syncthreads(), a warp collective, or its end;
//   - blocks are spread over a persistent pool of worker threads (PYALEXNET_EMU_WORKERS, default = cores);
//   - `__shared__` is `static thread_local`: a worker runs one block at a time and fibers never migrate,
//     so every fiber of a block sees the same storage;
//   - the launch is synchronous: it returns when every block has finished, or throws pa::KernelError
//     naming the kernel, the file:line, the block and the thread of the first fault it found.
// Only what is defined here is available to kernel code; a CUDA feature we do not emulate fails to compile.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>

#include "../errors.h"

// ---- qualifiers --------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#if defined(__SANITIZE_ADDRESS__)
#define __shared__ static  // ASan sees overflows of globals, not of thread_local: one worker (runtime.cpp)
#else
#define __shared__ static thread_local
#endif
// __noinline__ is deliberately left undefined: libstdc++ uses it as an attribute name.

// ---- built-in types ----------------------------------------------------------------------------------
struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
using cudaStream_t = struct CUstream_st*;

#define PA_EMU_VECTOR2(T, name, align)                                        \
    struct alignas(align) name {                                              \
        T x, y;                                                               \
    };                                                                        \
    inline name make_##name(T x, T y) { return name{x, y}; }
#define PA_EMU_VECTOR4(T, name, align)                                        \
    struct alignas(align) name {                                              \
        T x, y, z, w;                                                         \
    };                                                                        \
    inline name make_##name(T x, T y, T z, T w) { return name{x, y, z, w}; }
PA_EMU_VECTOR2(float, float2, 8)
PA_EMU_VECTOR4(float, float4, 16)
PA_EMU_VECTOR2(int, int2, 8)
PA_EMU_VECTOR4(int, int4, 16)
PA_EMU_VECTOR2(unsigned, uint2, 8)
PA_EMU_VECTOR4(unsigned, uint4, 16)
PA_EMU_VECTOR2(double, double2, 16)
#undef PA_EMU_VECTOR2
#undef PA_EMU_VECTOR4

// ---- math intrinsics ---------------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned v; std::memcpy(&v, &f, 4); return v; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline unsigned __umulhi(unsigned a, unsigned b) {
    return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
template <class T>
inline T __ldg(const T* p) { return *p; }
// expf, logf, sqrtf, fabsf, fmaxf, fminf, powf come from the C library through <cmath>.
// CUDA's device min/max are overloaded for every arithmetic type (and never return a reference).
#define PA_EMU_MINMAX(T)                                  \
    inline T min(T a, T b) { return b < a ? b : a; }      \
    inline T max(T a, T b) { return a < b ? b : a; }
PA_EMU_MINMAX(int)
PA_EMU_MINMAX(unsigned)
PA_EMU_MINMAX(long long)
PA_EMU_MINMAX(unsigned long long)
PA_EMU_MINMAX(long)
PA_EMU_MINMAX(unsigned long)
#undef PA_EMU_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }

// ---- atomics: blocks run concurrently on different workers, so these are real host atomics -------------
template <class T>
inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_relaxed); }
template <class T>
inline T atomicSub(T* p, T v) { return std::atomic_ref<T>(*p).fetch_sub(v, std::memory_order_relaxed); }
template <class T>
inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v, std::memory_order_relaxed); }
template <class T>
inline T atomicCAS(T* p, T compare, T v) {
    std::atomic_ref<T>(*p).compare_exchange_strong(compare, v, std::memory_order_relaxed);
    return compare;  // the old value, as on the GPU
}
// Replaces *p with v while v beats it; returns the old value.
template <class T, class Beats>
inline T atomic_replace_while(T* p, T v, Beats beats) {
    std::atomic_ref<T> a(*p);
    T old = a.load(std::memory_order_relaxed);
    while (beats(v, old) && !a.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
    }
    return old;
}
template <class T>
inline T atomicMax(T* p, T v) { return atomic_replace_while(p, v, [](T a, T b) { return b < a; }); }
template <class T>
inline T atomicMin(T* p, T v) { return atomic_replace_while(p, v, [](T a, T b) { return a < b; }); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() {}

// ---- the runtime's interface to kernel code -------------------------------------------------------------
namespace pa_emu {


// Where the worker is: set by the scheduler, read through the built-in variable macros below. `__thread`
// rather than `thread_local`: no dynamic initialisation, so every access is a plain TLS load.
extern __thread const uint3* t_thread_idx;
extern __thread uint3 t_block_idx;
extern __thread dim3 t_block_dim;
extern __thread dim3 t_grid_dim;
extern __thread unsigned char* t_dynamic_shared;

enum class Collective : int { SyncWarp, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All };

void syncthreads(const char* file, int line);
// Every lane of `mask` must call the same collective; the result for the calling lane comes back.
// `value` carries up to 8 bytes of the lane's operand (a predicate for votes); `arg` is srcLane/delta/laneMask.
uint64_t warp_collective(Collective kind, const char* file, int line, unsigned mask, uint64_t value,
                         int arg, int width);

struct Site {
    const char* file;
    int line;

    template <class T>
    T shfl(Collective kind, unsigned mask, T v, int arg, int width) const {
        static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle operands are at most 8 bytes");
        uint64_t bits = 0;
        std::memcpy(&bits, &v, sizeof(T));
        uint64_t out = warp_collective(kind, file, line, mask, bits, arg, width);
        T r;
        std::memcpy(&r, &out, sizeof(T));
        return r;
    }
    template <class T>
    T shfl_idx(unsigned mask, T v, int src, int width = 32) const { return shfl(Collective::ShflIdx, mask, v, src, width); }
    template <class T>
    T shfl_up(unsigned mask, T v, unsigned d, int width = 32) const { return shfl(Collective::ShflUp, mask, v, int(d), width); }
    template <class T>
    T shfl_down(unsigned mask, T v, unsigned d, int width = 32) const { return shfl(Collective::ShflDown, mask, v, int(d), width); }
    template <class T>
    T shfl_xor(unsigned mask, T v, int m, int width = 32) const { return shfl(Collective::ShflXor, mask, v, m, width); }
    unsigned ballot(unsigned mask, int pred) const {
        return unsigned(warp_collective(Collective::Ballot, file, line, mask, pred != 0, 0, 32));
    }
    int any(unsigned mask, int pred) const {
        return int(warp_collective(Collective::Any, file, line, mask, pred != 0, 0, 32));
    }
    int all(unsigned mask, int pred) const {
        return int(warp_collective(Collective::All, file, line, mask, pred != 0, 0, 32));
    }
    void syncwarp(unsigned mask = 0xffffffffu) const { warp_collective(Collective::SyncWarp, file, line, mask, 0, 0, 32); }
};

// Launch bookkeeping.
struct LaunchInfo {
    const char* name;
    const char* file;
    int line;
    dim3 grid;
    dim3 block;
    size_t dynamic_shared;
    const void* kernel;
    // The counting build's view of the arguments: the values of the pointer arguments (the buffers a kernel
    // reads and writes), and where the argument tuple and the thread body live (the runtime's, not kernel data).
    const uintptr_t* pointers = nullptr;
    int npointers = 0;
    const void* args = nullptr;
    size_t args_bytes = 0;
    const void* body = nullptr;
    size_t body_bytes = 0;
};
template <class T>
inline void collect_pointer(const T& a, uintptr_t* out, int& n) {
    if constexpr (std::is_pointer_v<T>) out[n++] = reinterpret_cast<uintptr_t>(a);
}
void launch_blocks(const LaunchInfo& info, const std::function<void()>& thread_body);
void set_max_dynamic_shared(const void* kernel, size_t bytes);
int worker_count();
const char* fiber_switch_name();  // how fibers switch: "own (x86-64)", "own (aarch64)" or "ucontext"
// Bytes of static __shared__ storage the kernel declares, read from the module's symbol table; -1 if unknown.
long long kernel_static_shared_bytes(const void* kernel);

}  // namespace pa_emu

#define threadIdx (*pa_emu::t_thread_idx)
#define blockIdx (static_cast<const uint3&>(pa_emu::t_block_idx))
#define blockDim (static_cast<const dim3&>(pa_emu::t_block_dim))
#define gridDim (static_cast<const dim3&>(pa_emu::t_grid_dim))
#define warpSize 32
#define __syncthreads() pa_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) (pa_emu::Site{__FILE__, __LINE__}.syncwarp(__VA_ARGS__))
#define __shfl_sync(...) (pa_emu::Site{__FILE__, __LINE__}.shfl_idx(__VA_ARGS__))
#define __shfl_up_sync(...) (pa_emu::Site{__FILE__, __LINE__}.shfl_up(__VA_ARGS__))
#define __shfl_down_sync(...) (pa_emu::Site{__FILE__, __LINE__}.shfl_down(__VA_ARGS__))
#define __shfl_xor_sync(...) (pa_emu::Site{__FILE__, __LINE__}.shfl_xor(__VA_ARGS__))
#define __ballot_sync(...) (pa_emu::Site{__FILE__, __LINE__}.ballot(__VA_ARGS__))
#define __any_sync(...) (pa_emu::Site{__FILE__, __LINE__}.any(__VA_ARGS__))
#define __all_sync(...) (pa_emu::Site{__FILE__, __LINE__}.all(__VA_ARGS__))

// Dynamic shared memory: one per kernel, as `extern __shared__` is on the GPU.
#define PA_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(pa_emu::t_dynamic_shared)

namespace pa {

// The emulated launch: the same signature as the CUDA one in ../common.cuh. The arguments are converted to
// the kernel's parameter types once, as a real launch does, and every thread gets its own copy.
template <class... Params, class... Args>
void launch(const char* name, const char* file, int line, void (*kernel)(Params...), dim3 grid, dim3 block,
            size_t dynamic_shared, cudaStream_t, Args&&... args) {
    static_assert(sizeof...(Params) == sizeof...(Args), "kernel launched with the wrong number of arguments");
    const std::tuple<std::decay_t<Params>...> packed(std::forward<Args>(args)...);
    const std::function<void()> body = [&packed, kernel] { std::apply(kernel, packed); };
    uintptr_t pointers[sizeof...(Params) + 1] = {};
    int npointers = 0;
    std::apply([&](const auto&... a) { (pa_emu::collect_pointer(a, pointers, npointers), ...); }, packed);
    pa_emu::LaunchInfo info{name, file, line, grid, block, dynamic_shared, reinterpret_cast<const void*>(kernel)};
    info.pointers = pointers;
    info.npointers = npointers;
    info.args = &packed;
    info.args_bytes = sizeof packed;
    info.body = &body;
    info.body_bytes = sizeof body;
    pa_emu::launch_blocks(info, body);
}

template <class... Params>
void set_max_dynamic_shared(void (*kernel)(Params...), size_t bytes) {
    pa_emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), bytes);
}

template <class... Params>
long long static_shared_bytes(void (*kernel)(Params...)) {
    return pa_emu::kernel_static_shared_bytes(reinterpret_cast<const void*>(kernel));
}

}  // namespace pa
