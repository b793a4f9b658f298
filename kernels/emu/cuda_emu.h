// The CUDA C++ that our kernels use, defined for the host compiler, so the same .cu files run on a CPU.
//
// How a launch runs (details in runtime.cpp):
//   - every CUDA thread is a user-level fiber; a block's fibers all run on one OS thread, cooperatively:
//     a fiber runs until it reaches __syncthreads(), a warp collective, __nanosleep, or its end (or, spinning,
//     until the watchdog preempts it);
//   - blocks are spread over a persistent pool of worker threads (PYALEXNET_EMU_WORKERS, default = cores);
//   - `__shared__` is `static thread_local`: a worker runs one block at a time and fibers never migrate,
//     so every fiber of a block sees the same storage;
//   - the launch is synchronous: it returns when every block has finished, or throws pa::KernelError
//     naming the kernel, the file:line, the block and the thread of the first fault it found.
// Only what is defined here is available to kernel code; a CUDA feature we do not emulate fails to compile.
#pragma once

#include <algorithm>
#include <atomic>
#include <cassert>  // first, so that the device assert below is the one kernel code gets
#include <chrono>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../errors.h"

// ---- qualifiers --------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// __launch_bounds__(maxThreads[, minBlocks[, maxBlocksPerCluster]]): a launch of more than maxThreads threads fails,
// as on a GPU. GCC keeps no readable record of an attribute's value, save one: patchable_function_entry(N, 0)
// starts the function with N NOP instructions (it is meant for live patching), which the launcher counts
// (runtime.cpp, launch_bound). They take an expression, template parameters included, and cost each thread a
// few dozen cycles when it starts.
#define PA_EMU_FIRST(first, ...) first
#define __launch_bounds__(...) __attribute__((patchable_function_entry(int(PA_EMU_FIRST(__VA_ARGS__, 0)), 0)))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#if defined(__SANITIZE_ADDRESS__)
#define __shared__ static  // ASan sees overflows of globals, not of thread_local: one worker (runtime.cpp)
#elif defined(PA_EMU_RACECHECK)
// The race checker's build puts a 64-byte redzone beside every __shared__ object (GCC lays a function's statics
// out in reverse order of declaration: the redzone declared first follows the object), and reports any access
// to one (racecheck.cpp): an index past the end of a shared array, by a byte or more.
namespace pa_emu {
struct SharedRedzone {
    unsigned char bytes[64];
};
}  // namespace pa_emu
#define PA_EMU_CAT2(a, b) a##b
#define PA_EMU_CAT(a, b) PA_EMU_CAT2(a, b)
#define __shared__                                                                                 \
    [[gnu::used]] static thread_local pa_emu::SharedRedzone PA_EMU_CAT(pa_shared_redzone_, __COUNTER__); \
    static thread_local
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
inline unsigned __brev(unsigned v) {
    v = (v >> 1 & 0x55555555u) | (v & 0x55555555u) << 1;
    v = (v >> 2 & 0x33333333u) | (v & 0x33333333u) << 2;
    v = (v >> 4 & 0x0f0f0f0fu) | (v & 0x0f0f0f0fu) << 4;
    return __builtin_bswap32(v);
}
inline unsigned long long __brevll(unsigned long long v) {
    return static_cast<unsigned long long>(__brev(unsigned(v))) << 32 | __brev(unsigned(v >> 32));
}
// hi:lo as 64 bits shifted by the shift amount: _l and _r take it mod 32, _lc and _rc clamp it to 32.
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
    return unsigned(((static_cast<unsigned long long>(hi) << 32 | lo) << (shift & 31)) >> 32);
}
inline unsigned __funnelshift_lc(unsigned lo, unsigned hi, unsigned shift) {
    const unsigned s = shift < 32 ? shift : 32;
    return unsigned(((static_cast<unsigned long long>(hi) << 32 | lo) << s) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
    return unsigned((static_cast<unsigned long long>(hi) << 32 | lo) >> (shift & 31));
}
inline unsigned __funnelshift_rc(unsigned lo, unsigned hi, unsigned shift) {
    const unsigned s = shift < 32 ? shift : 32;
    return unsigned((static_cast<unsigned long long>(hi) << 32 | lo) >> s);
}
// Float to integer as cvt.rni/rzi/rpi/rmi do: rounded in the named direction (rn: to nearest, ties to even),
// then clamped to the integer type's range; NaN becomes 0.
namespace pa_emu {
template <class I, class F>
inline I float_to_int(F x, F (*round)(F)) {
    if (std::isnan(x)) return 0;
    const F r = round(x);
    if (r <= F(std::numeric_limits<I>::min())) return std::numeric_limits<I>::min();
    if (r >= F(std::numeric_limits<I>::max())) return std::numeric_limits<I>::max();
    return static_cast<I>(r);
}
inline float rn(float x) { return std::nearbyint(x); }  // the default rounding mode: nearest, ties to even
inline double rn(double x) { return std::nearbyint(x); }
}  // namespace pa_emu
#define PA_EMU_FLOAT_TO_INT(F, fname, I, iname)                                                                  \
    inline I __##fname##2##iname##_rn(F x) { return pa_emu::float_to_int<I, F>(x, pa_emu::rn); }                \
    inline I __##fname##2##iname##_rz(F x) { return pa_emu::float_to_int<I, F>(x, std::trunc); }               \
    inline I __##fname##2##iname##_ru(F x) { return pa_emu::float_to_int<I, F>(x, std::ceil); }                \
    inline I __##fname##2##iname##_rd(F x) { return pa_emu::float_to_int<I, F>(x, std::floor); }
PA_EMU_FLOAT_TO_INT(float, float, int, int)
PA_EMU_FLOAT_TO_INT(float, float, unsigned, uint)
PA_EMU_FLOAT_TO_INT(float, float, long long, ll)
PA_EMU_FLOAT_TO_INT(float, float, unsigned long long, ull)
PA_EMU_FLOAT_TO_INT(double, double, int, int)
PA_EMU_FLOAT_TO_INT(double, double, unsigned, uint)
PA_EMU_FLOAT_TO_INT(double, double, long long, ll)
PA_EMU_FLOAT_TO_INT(double, double, unsigned long long, ull)
#undef PA_EMU_FLOAT_TO_INT
// A clock that only goes forward, in nanoseconds (the GPU's counts cycles: only differences mean anything).
inline long long clock64() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
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
// Each exists for the types CUDA defines it for, and no others: an atomicAnd on a float fails to compile here as
// it does under nvcc. The _block and _system scopes are the same operation on one CPU process.
namespace pa_emu {
template <class T, class... Allowed>
inline constexpr bool one_of = (std::is_same_v<T, Allowed> || ...);
template <class T>
inline constexpr bool add_type = one_of<T, int, unsigned, unsigned long long, float, double>;
template <class T>
inline constexpr bool minmax_type = one_of<T, int, unsigned, long long, unsigned long long>;
template <class T>
inline constexpr bool bitwise_type = one_of<T, int, unsigned, unsigned long long>;
template <class T>
inline constexpr bool exch_type = one_of<T, int, unsigned, unsigned long long, float>;
template <class T>
inline constexpr bool cas_type = one_of<T, int, unsigned, unsigned long long, unsigned short>;
// Every atomic is a point where the thread may let the others of its block run (one in 64): a thread spinning on
// an atomic until another thread of its block sets it completes, as it does on a GPU since Volta.
void atomic_poll();
// Replaces *p with next(old) until the CAS takes (or next leaves it as it is); returns the old value.
template <class T, class Next>
inline T atomic_update(T* p, Next next) {
    std::atomic_ref<T> a(*p);
    T old = a.load(std::memory_order_relaxed);
    while (next(old) != old && !a.compare_exchange_weak(old, next(old), std::memory_order_relaxed)) {
    }
    return old;
}
}  // namespace pa_emu
template <class T>
inline T atomicAdd(T* p, T v) {
    static_assert(pa_emu::add_type<T>, "atomicAdd: CUDA has it for int, unsigned, unsigned long long, float, double");
    pa_emu::atomic_poll();
    return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_relaxed);
}
template <class T>
inline T atomicSub(T* p, T v) {
    static_assert(pa_emu::one_of<T, int, unsigned>, "atomicSub: CUDA has it for int and unsigned");
    pa_emu::atomic_poll();
    return std::atomic_ref<T>(*p).fetch_sub(v, std::memory_order_relaxed);
}
template <class T>
inline T atomicExch(T* p, T v) {
    static_assert(pa_emu::exch_type<T>, "atomicExch: CUDA has it for int, unsigned, unsigned long long, float");
    pa_emu::atomic_poll();
    return std::atomic_ref<T>(*p).exchange(v, std::memory_order_relaxed);
}
template <class T>
inline T atomicCAS(T* p, T compare, T v) {
    static_assert(pa_emu::cas_type<T>, "atomicCAS: CUDA has it for int, unsigned, unsigned long long, unsigned short");
    pa_emu::atomic_poll();
    std::atomic_ref<T>(*p).compare_exchange_strong(compare, v, std::memory_order_relaxed);
    return compare;  // the old value, as on the GPU
}
template <class T>
inline T atomicMax(T* p, T v) {
    static_assert(pa_emu::minmax_type<T>, "atomicMax: CUDA has it for int, unsigned, long long, unsigned long long");
    pa_emu::atomic_poll();
    return pa_emu::atomic_update(p, [v](T old) { return old < v ? v : old; });
}
template <class T>
inline T atomicMin(T* p, T v) {
    static_assert(pa_emu::minmax_type<T>, "atomicMin: CUDA has it for int, unsigned, long long, unsigned long long");
    pa_emu::atomic_poll();
    return pa_emu::atomic_update(p, [v](T old) { return v < old ? v : old; });
}
template <class T>
inline T atomicAnd(T* p, T v) {
    static_assert(pa_emu::bitwise_type<T>, "atomicAnd: CUDA has it for int, unsigned, unsigned long long");
    pa_emu::atomic_poll();
    return std::atomic_ref<T>(*p).fetch_and(v, std::memory_order_relaxed);
}
template <class T>
inline T atomicOr(T* p, T v) {
    static_assert(pa_emu::bitwise_type<T>, "atomicOr: CUDA has it for int, unsigned, unsigned long long");
    pa_emu::atomic_poll();
    return std::atomic_ref<T>(*p).fetch_or(v, std::memory_order_relaxed);
}
template <class T>
inline T atomicXor(T* p, T v) {
    static_assert(pa_emu::bitwise_type<T>, "atomicXor: CUDA has it for int, unsigned, unsigned long long");
    pa_emu::atomic_poll();
    return std::atomic_ref<T>(*p).fetch_xor(v, std::memory_order_relaxed);
}
// ((old >= v) ? 0 : old + 1) and (((old == 0) || (old > v)) ? v : old - 1), as the programming guide defines them.
template <class T>
inline T atomicInc(T* p, T v) {
    static_assert(std::is_same_v<T, unsigned>, "atomicInc: CUDA has it for unsigned only");
    pa_emu::atomic_poll();
    return pa_emu::atomic_update(p, [v](T old) { return old >= v ? 0u : old + 1u; });
}
template <class T>
inline T atomicDec(T* p, T v) {
    static_assert(std::is_same_v<T, unsigned>, "atomicDec: CUDA has it for unsigned only");
    pa_emu::atomic_poll();
    return pa_emu::atomic_update(p, [v](T old) { return (old == 0u || old > v) ? v : old - 1u; });
}
#define PA_EMU_SCOPED(op)                                                                    \
    template <class T, class... A>                                                          \
    inline T op##_block(T* p, A... a) { return op(p, static_cast<T>(a)...); }              \
    template <class T, class... A>                                                          \
    inline T op##_system(T* p, A... a) { return op(p, static_cast<T>(a)...); }
PA_EMU_SCOPED(atomicAdd)
PA_EMU_SCOPED(atomicSub)
PA_EMU_SCOPED(atomicExch)
PA_EMU_SCOPED(atomicCAS)
PA_EMU_SCOPED(atomicMax)
PA_EMU_SCOPED(atomicMin)
PA_EMU_SCOPED(atomicAnd)
PA_EMU_SCOPED(atomicOr)
PA_EMU_SCOPED(atomicXor)
PA_EMU_SCOPED(atomicInc)
PA_EMU_SCOPED(atomicDec)
#undef PA_EMU_SCOPED
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() {}
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// ---- the runtime's interface to kernel code -------------------------------------------------------------
namespace pa_emu {


// Where the worker is: set by the scheduler, read through the built-in variable macros below. `__thread`
// rather than `thread_local`: no dynamic initialisation, so every access is a plain TLS load.
extern __thread const uint3* t_thread_idx;
extern __thread uint3 t_block_idx;
extern __thread dim3 t_block_dim;
extern __thread dim3 t_grid_dim;
extern __thread unsigned char* t_dynamic_shared;

enum class Collective : int {
    SyncWarp, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All,
    MatchAny, MatchAll, ReduceAdd, ReduceMin, ReduceMax, ReduceAnd, ReduceOr, ReduceXor,
};

void syncthreads(const char* file, int line);
// __syncthreads_count: the barrier, then how many threads of the block brought a nonzero predicate.
int syncthreads_count(const char* file, int line, int predicate);
// The lanes of the calling warp that exist and have not exited (see __activemask below).
unsigned active_mask();
// __nanosleep: the calling thread lets the others of its block run (a spin without it gets preempted by the
// watchdog, later; runtime.cpp).
void nanosleep_yield(const char* file, int line);
[[noreturn]] void device_assert_failed(const char* expression, const char* file, int line);
// cp.async (kernels/async_copy.cuh): the calling thread queues a copy of `bytes` (4, 8 or 16) from global `src`
// to shared `dst`, of which only the first `src_bytes` are read (the rest is zero-filled), in its open group.
// The destination holds the poison (every float a NaN) until the group is waited for: the copy is made then,
// in issue order, so a read that comes too early gets garbage here, and the race-check build reports it with
// both lines. Misaligned or mis-placed operands are a KernelError naming the line, as the GPU's fault would be.
void async_copy(void* dst, const void* src, int bytes, int src_bytes, const char* file, int line);
// cp.async.commit_group: the open group is closed (an empty group is a group too).
void async_copy_commit();
// cp.async.wait_group N: every committed group but the newest `pending` is complete.
void async_copy_wait(int pending);
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
    template <class T>
    unsigned match_any(unsigned mask, T v) const {
        static_assert(one_of<T, int, unsigned, long, unsigned long, long long, unsigned long long, float, double>,
                      "__match_any_sync: CUDA has it for 32- and 64-bit integers and floating point");
        return unsigned(warp_collective(Collective::MatchAny, file, line, mask, bits(v), 0, 32));
    }
    template <class T>
    unsigned match_all(unsigned mask, T v, int* pred) const {
        static_assert(one_of<T, int, unsigned, long, unsigned long, long long, unsigned long long, float, double>,
                      "__match_all_sync: CUDA has it for 32- and 64-bit integers and floating point");
        const unsigned r = unsigned(warp_collective(Collective::MatchAll, file, line, mask, bits(v), 0, 32));
        *pred = r != 0;
        return r;
    }
    // __reduce_*_sync: add, min and max for int and unsigned (signed comparison for int), and, or, xor for
    // unsigned; arg 1 marks a signed operand.
    template <class T>
    T reduce(Collective kind, unsigned mask, T v) const {
        static_assert(one_of<T, int, unsigned>, "__reduce_*_sync: CUDA has them for int and unsigned");
        return T(warp_collective(kind, file, line, mask, uint32_t(v), std::is_signed_v<T>, 32));
    }
    unsigned reduce_bits(Collective kind, unsigned mask, unsigned v) const { return reduce(kind, mask, v); }

  private:
    template <class T>
    static uint64_t bits(T v) {
        uint64_t b = 0;
        std::memcpy(&b, &v, sizeof(T));
        return b;
    }
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
// The SM count of the card the emulator stands for (132, an H100's or H200's, unless set): what pa::sm_count()
// answers, so that grid-shaping choices (split-K) are that card's. set_emulated_sm_count rejects n < 1.
int emulated_sm_count();
void set_emulated_sm_count(int n);
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
#define __match_any_sync(...) (pa_emu::Site{__FILE__, __LINE__}.match_any(__VA_ARGS__))
#define __match_all_sync(...) (pa_emu::Site{__FILE__, __LINE__}.match_all(__VA_ARGS__))
#define __reduce_add_sync(mask, v) (pa_emu::Site{__FILE__, __LINE__}.reduce(pa_emu::Collective::ReduceAdd, mask, v))
#define __reduce_min_sync(mask, v) (pa_emu::Site{__FILE__, __LINE__}.reduce(pa_emu::Collective::ReduceMin, mask, v))
#define __reduce_max_sync(mask, v) (pa_emu::Site{__FILE__, __LINE__}.reduce(pa_emu::Collective::ReduceMax, mask, v))
#define __reduce_and_sync(mask, v) (pa_emu::Site{__FILE__, __LINE__}.reduce_bits(pa_emu::Collective::ReduceAnd, mask, v))
#define __reduce_or_sync(mask, v) (pa_emu::Site{__FILE__, __LINE__}.reduce_bits(pa_emu::Collective::ReduceOr, mask, v))
#define __reduce_xor_sync(mask, v) (pa_emu::Site{__FILE__, __LINE__}.reduce_bits(pa_emu::Collective::ReduceXor, mask, v))
#define __syncthreads_count(p) pa_emu::syncthreads_count(__FILE__, __LINE__, (p))
#define __syncthreads_and(p) \
    int(pa_emu::syncthreads_count(__FILE__, __LINE__, (p)) == int(blockDim.x * blockDim.y * blockDim.z))
#define __syncthreads_or(p) int(pa_emu::syncthreads_count(__FILE__, __LINE__, (p)) != 0)
// On a GPU, the lanes converged at the call. The emulator does not track divergence inside a warp: it answers
// with every lane of the warp that exists and has not exited, the most a GPU could answer (so a mask taken from
// it never leaves out a lane that is running).
#define __activemask() pa_emu::active_mask()
#define __nanosleep(ns) ((void)(ns), pa_emu::nanosleep_yield(__FILE__, __LINE__))
// Device-side assert: a failure is a KernelError naming the expression, the file:line and the thread, and ends
// the launch, as on the GPU (where it ends the context). Off under NDEBUG, as with nvcc.
#undef assert
#if defined(NDEBUG)
#define assert(e) ((void)0)
#else
#define assert(e) ((e) ? (void)0 : pa_emu::device_assert_failed(#e, __FILE__, __LINE__))
#endif

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
