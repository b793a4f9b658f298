// The ThreadSanitizer entry points that GCC's -fsanitize=thread instrumentation calls in the kernel translation
// units, defined once for the two builds that instrument kernels without linking libtsan: the race checker
// (racecheck.cpp) and the memory counters (counters.cpp). Each includes this file after defining
//
//   void pa_emu_tsan_access(const volatile void* p, size_t bytes, pa_emu::TsanAccess kind, uintptr_t pc);
//
// Declared with the ABI of compiler-rt's tsan_interface.h (the types only need the right sizes). Atomics do what
// they say, sequentially consistent whatever order was asked (stronger is always correct), after the access is
// reported; pc is the instrumented instruction's return address.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace pa_emu {
enum class TsanAccess { Read, Write, AtomicLoad, AtomicStore, AtomicUpdate };
// The watchdog's request to preempt (runtime.cpp): every access is a point where kernel code may yield.
extern std::atomic<bool> g_preempt_asked;
void take_preemption(uintptr_t pc);
}  // namespace pa_emu

void pa_emu_tsan_access(const volatile void* p, size_t bytes, pa_emu::TsanAccess kind, uintptr_t pc);

#define PA_TSAN_PC reinterpret_cast<uintptr_t>(__builtin_return_address(0))
#define PA_TSAN_REPORT(p, bytes, kind)                                                          \
    do {                                                                                        \
        if (__builtin_expect(pa_emu::g_preempt_asked.load(std::memory_order_relaxed), 0))       \
            pa_emu::take_preemption(PA_TSAN_PC - 1);                                            \
        pa_emu_tsan_access(p, bytes, pa_emu::TsanAccess::kind, PA_TSAN_PC);                     \
    } while (0)

extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_read(void**) {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_read_range(void* p, unsigned long size) { PA_TSAN_REPORT(p, size, Read); }
void __tsan_write_range(void* p, unsigned long size) { PA_TSAN_REPORT(p, size, Write); }

#define PA_TSAN_PLAIN(N)                                                        \
    void __tsan_read##N(void* p) { PA_TSAN_REPORT(p, N, Read); }                \
    void __tsan_write##N(void* p) { PA_TSAN_REPORT(p, N, Write); }              \
    void __tsan_unaligned_read##N(void* p) { PA_TSAN_REPORT(p, N, Read); }      \
    void __tsan_unaligned_write##N(void* p) { PA_TSAN_REPORT(p, N, Write); }    \
    void __tsan_volatile_read##N(void* p) { PA_TSAN_REPORT(p, N, Read); }       \
    void __tsan_volatile_write##N(void* p) { PA_TSAN_REPORT(p, N, Write); }
PA_TSAN_PLAIN(1)
PA_TSAN_PLAIN(2)
PA_TSAN_PLAIN(4)
PA_TSAN_PLAIN(8)
PA_TSAN_PLAIN(16)
#undef PA_TSAN_PLAIN

// One read-modify-write: report it, then do it.
#define PA_TSAN_RMW(N, T, name, builtin)                                        \
    T __tsan_atomic##N##_##name(volatile T* a, T v, int) {                      \
        PA_TSAN_REPORT(a, sizeof(T), AtomicUpdate);                             \
        return builtin(a, v, __ATOMIC_SEQ_CST);                                 \
    }
#define PA_TSAN_ATOMIC(N, T)                                                                                 \
    T __tsan_atomic##N##_load(const volatile T* a, int) {                                                    \
        PA_TSAN_REPORT(a, sizeof(T), AtomicLoad);                                                            \
        return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                         \
    }                                                                                                        \
    void __tsan_atomic##N##_store(volatile T* a, T v, int) {                                                 \
        PA_TSAN_REPORT(a, sizeof(T), AtomicStore);                                                           \
        __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                            \
    }                                                                                                        \
    PA_TSAN_RMW(N, T, exchange, __atomic_exchange_n)                                                         \
    PA_TSAN_RMW(N, T, fetch_add, __atomic_fetch_add)                                                         \
    PA_TSAN_RMW(N, T, fetch_sub, __atomic_fetch_sub)                                                         \
    PA_TSAN_RMW(N, T, fetch_and, __atomic_fetch_and)                                                         \
    PA_TSAN_RMW(N, T, fetch_or, __atomic_fetch_or)                                                           \
    PA_TSAN_RMW(N, T, fetch_xor, __atomic_fetch_xor)                                                         \
    PA_TSAN_RMW(N, T, fetch_nand, __atomic_fetch_nand)                                                       \
    int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                     \
        PA_TSAN_REPORT(a, sizeof(T), AtomicUpdate);                                                          \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);              \
    }                                                                                                        \
    int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                       \
        PA_TSAN_REPORT(a, sizeof(T), AtomicUpdate);                                                          \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);              \
    }                                                                                                        \
    T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                           \
        PA_TSAN_REPORT(a, sizeof(T), AtomicUpdate);                                                          \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                    \
        return c;                                                                                            \
    }
PA_TSAN_ATOMIC(8, unsigned char)
PA_TSAN_ATOMIC(16, unsigned short)
PA_TSAN_ATOMIC(32, unsigned int)
PA_TSAN_ATOMIC(64, unsigned long long)
#undef PA_TSAN_ATOMIC
#undef PA_TSAN_RMW

void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}
}
