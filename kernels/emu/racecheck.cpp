// The race checker of the race-check build: the __tsan_* functions that -fsanitize=thread instrumentation calls
// in the kernel translation units, a shadow memory of who touched each 4-byte granule last, and the reports.
// The model is described in racecheck.h. This file is not instrumented itself, and it runs with one worker, so
// the shadow memory needs no locks: blocks run one after another, their fibers one at a time.
#include "racecheck.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <unordered_map>

namespace pa_emu::race {

__thread Who* t_who = nullptr;

namespace {

constexpr uint8_t kAtomic = 1;  // an atomic read-modify-write (or atomic load/store)
constexpr uint8_t kMulti = 2;   // a read stamp: another thread read these bytes too, unordered with this read

// One access, as the shadow remembers it.
struct Stamp {
    uint32_t launch = 0;  // 0: none
    uint32_t block = 0;
    uint32_t thread = 0;
    uint32_t epoch = 0;
    uint32_t wclock = 0;
    uint8_t bytes = 0;  // which bytes of the granule
    uint8_t flags = 0;
    uintptr_t pc = 0;
};

struct Granule {
    Stamp write;
    Stamp read;
};

constexpr int kPageShift = 12;
constexpr size_t kGranulesPerPage = (size_t(1) << kPageShift) / 4;
constexpr size_t kMaxPages = 4096;  // 4096 pages of 4 KB touched (~200 MB of shadow): start afresh

struct Shadow {
    std::unordered_map<uintptr_t, std::unique_ptr<Granule[]>> pages;
    uintptr_t cached_key = ~uintptr_t(0);
    Granule* cached = nullptr;

    Granule& at(uintptr_t addr) {
        const uintptr_t key = addr >> kPageShift;
        if (key != cached_key) {
            auto& page = pages[key];
            if (!page) page.reset(new Granule[kGranulesPerPage]);
            cached_key = key;
            cached = page.get();
        }
        return cached[(addr >> 2) & (kGranulesPerPage - 1)];
    }
    void clear() {
        pages.clear();
        cached_key = ~uintptr_t(0);
        cached = nullptr;
    }
};

struct Race {
    bool found = false;
    bool shared = false;
    uintptr_t addr = 0;
    Stamp now, before;
    bool now_writes = false, before_wrote = false;
};

Shadow g_shadow;
uint32_t g_launch = 0;
const LaunchInfo* g_info = nullptr;
BlockMemory g_block;
Race g_race;

bool in_shared(uintptr_t addr) {
    const auto* p = reinterpret_cast<const unsigned char*>(addr);
    for (const auto& [begin, end] : g_block.shared)
        if (p >= begin && p < end) return true;
    return false;
}

// Whether `s` happened before the access `who` is making now (or is stale), so the two cannot race.
bool ordered(const Stamp& s, const Who& who, uintptr_t addr) {
    if (s.launch != g_launch) return true;
    if (s.block != who.block) return in_shared(addr);  // another block's shared memory is gone
    if (s.thread == who.thread || s.epoch != who.epoch) return true;
    return s.thread / 32 == who.thread / 32 && s.wclock < who.wclock;
}

// The same thread, with no barrier or collective since `s`.
bool same_moment(const Stamp& s, const Who& who) {
    return s.launch == g_launch && s.block == who.block && s.thread == who.thread && s.epoch == who.epoch &&
           s.wclock == who.wclock;
}

Stamp stamp(const Who& who, uint8_t bytes, uint8_t flags, uintptr_t pc) {
    return Stamp{g_launch, who.block, who.thread, who.epoch, who.wclock, bytes, flags, pc};
}

void report(uintptr_t addr, const Stamp& now, bool now_writes, const Stamp& before, bool before_wrote) {
    g_race = Race{true, in_shared(addr), addr, now, before, now_writes, before_wrote};
}

// One granule's part of an access: check it against the shadow, then record it.
void touch(uintptr_t addr, uint8_t bytes, bool write, bool atomic, uintptr_t pc) {
    const Who& who = *t_who;
    Granule& g = g_shadow.at(addr);
    const Stamp now = stamp(who, bytes, atomic ? kAtomic : 0, pc);
    const bool both_atomic = atomic && (g.write.flags & kAtomic);
    if ((g.write.bytes & bytes) && !both_atomic && !ordered(g.write, who, addr))
        return report(addr, now, write, g.write, true);
    if (write) {
        // Another thread's unordered read; or, where this thread read last, a third thread that read the same
        // bytes unordered with it (kMulti) and that this thread has not synchronised with since.
        const Stamp& r = g.read;
        const bool other_reader = !ordered(r, who, addr);
        const bool multi_reader = (r.flags & kMulti) && same_moment(r, who);
        if ((r.bytes & bytes) && (other_reader || multi_reader)) return report(addr, now, true, r, false);
        g.write = now;
        g.read.launch = 0;
        return;
    }
    Stamp& r = g.read;
    uint8_t flags = 0, keep = 0;
    if (!ordered(r, who, addr)) {  // two unordered readers: a later write by either races with the other
        keep = r.bytes;
        flags = kMulti;
    } else if (same_moment(r, who)) {
        keep = r.bytes;
        flags = r.flags & kMulti;
    }
    r = now;
    r.bytes = uint8_t(bytes | keep);
    r.flags = flags;
}

void access(const volatile void* p, size_t size, bool write, bool atomic, uintptr_t pc) {
    if (!t_who || g_race.found || size == 0) return;
    const auto addr = reinterpret_cast<uintptr_t>(p);
    const auto* c = reinterpret_cast<const unsigned char*>(addr);
    if (c >= g_block.stacks_begin && c < g_block.stacks_end) return;  // a fiber's own stack
    const uintptr_t end = addr + size;
    for (uintptr_t granule = addr & ~uintptr_t(3); granule < end; granule += 4) {
        const uintptr_t lo = std::max(addr, granule), hi = std::min(end, granule + 4);
        const uint8_t bytes = uint8_t(((1u << (hi - lo)) - 1u) << (lo - granule));
        touch(granule, bytes, write, atomic, pc);
        if (g_race.found) return;
    }
}

// ---- reports ------------------------------------------------------------------------------------------------
// file:line of a code address, from the module's debug information through addr2line (the race-check build has
// -g): the innermost inlined frame that is kernel source (an atomic's access happens inside libstdc++ and the
// emulator's header, but the line worth reading is the kernel's). Falls back to module+offset without addr2line.
std::string source_line(uintptr_t pc) {
    Dl_info info;
    if (!pc || !dladdr(reinterpret_cast<void*>(pc), &info) || !info.dli_fname) return "an unknown line";
    char offset[32];
    std::snprintf(offset, sizeof offset, "0x%zx", size_t(pc - 1 - reinterpret_cast<uintptr_t>(info.dli_fbase)));
    const std::string fallback = std::string(info.dli_fname) + "+" + offset;
    const std::string cmd = "addr2line -i -e '" + std::string(info.dli_fname) + "' " + offset + " 2>/dev/null";
    FILE* f = popen(cmd.c_str(), "r");
    if (!f) return fallback;
    std::string first, kernel;
    char buf[4096];
    while (std::fgets(buf, sizeof buf, f)) {
        std::string s = buf;
        while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
        if (const auto d = s.find(" (discriminator"); d != std::string::npos) s.erase(d);
        if (s.empty() || s.rfind("??", 0) == 0) continue;
        if (first.empty()) first = s;
        // Paths relative to the repository, as the other emulator reports give them.
        const auto k = s.rfind("/kernels/");
        if (kernel.empty() && k != std::string::npos && s.find("/kernels/emu/") == std::string::npos)
            kernel = s.substr(k + 1);
    }
    pclose(f);
    return !kernel.empty() ? kernel : !first.empty() ? first : fallback;
}

std::string fmt3(uint32_t linear, const dim3& dims) {
    return "(" + std::to_string(linear % dims.x) + "," + std::to_string(linear / dims.x % dims.y) + "," +
           std::to_string(linear / (dims.x * dims.y)) + ")";
}

std::string describe(const Race& r, const LaunchInfo& info) {
    auto who = [&](const Stamp& s) {
        return "thread " + fmt3(s.thread, info.block) + " of block " + fmt3(s.block, info.grid);
    };
    auto verb = [](const Stamp& s, bool write, bool past) {
        if (s.flags & kAtomic) return std::string(past ? "updated it atomically" : "updates it atomically");
        return std::string(write ? (past ? "wrote" : "writes") : (past ? "read" : "reads"));
    };
    char addr[32];
    std::snprintf(addr, sizeof addr, "0x%zx", size_t(r.addr));
    std::string why;
    if (r.now.block != r.before.block)
        why = "blocks of one launch are never ordered";
    else if (r.before.thread == r.now.thread)
        why = "another thread read these bytes too, with no __syncthreads() or warp collective between";
    else
        why = "no __syncthreads() or warp collective between them (barrier epoch " + std::to_string(r.now.epoch) + ")";
    return "data race on " + std::string(r.shared ? "shared" : "global") + " memory at " + addr + ": " + who(r.now) +
           " " + verb(r.now, r.now_writes, false) + " at " + source_line(r.now.pc) + ", after " + who(r.before) + " " +
           verb(r.before, r.before_wrote, true) + " at " + source_line(r.before.pc) + "; " + why;
}

}  // namespace

void begin_launch(const LaunchInfo& info) {
    if (++g_launch == 0) {  // wrapped: old stamps could look current
        g_shadow.clear();
        g_launch = 1;
    }
    if (g_shadow.pages.size() > kMaxPages) g_shadow.clear();
    g_info = &info;
    g_race = Race{};
}

void begin_block(const BlockMemory& memory) { g_block = memory; }

std::string end_launch() {
    const std::string out = g_race.found && g_info ? describe(g_race, *g_info) : std::string();
    g_race = Race{};
    g_block = BlockMemory{};
    g_info = nullptr;
    return out;
}

}  // namespace pa_emu::race

// ---- the ThreadSanitizer interface that GCC's instrumentation calls ---------------------------------------------
// Declared here with the ABI of compiler-rt's tsan_interface.h (the types only need the right sizes).
using pa_emu::race::access;
#define PA_PC reinterpret_cast<uintptr_t>(__builtin_return_address(0))

extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_read(void**) {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_read_range(void* p, unsigned long size) { access(p, size, false, false, PA_PC); }
void __tsan_write_range(void* p, unsigned long size) { access(p, size, true, false, PA_PC); }

#define PA_TSAN_PLAIN(N)                                                                           \
    void __tsan_read##N(void* p) { access(p, N, false, false, PA_PC); }                            \
    void __tsan_write##N(void* p) { access(p, N, true, false, PA_PC); }                            \
    void __tsan_unaligned_read##N(void* p) { access(p, N, false, false, PA_PC); }                  \
    void __tsan_unaligned_write##N(void* p) { access(p, N, true, false, PA_PC); }                  \
    void __tsan_volatile_read##N(void* p) { access(p, N, false, false, PA_PC); }                   \
    void __tsan_volatile_write##N(void* p) { access(p, N, true, false, PA_PC); }
PA_TSAN_PLAIN(1)
PA_TSAN_PLAIN(2)
PA_TSAN_PLAIN(4)
PA_TSAN_PLAIN(8)
PA_TSAN_PLAIN(16)
#undef PA_TSAN_PLAIN

// Atomics do what they say (sequentially consistent whatever order was asked: stronger is always correct), and
// all of them, loads included, are recorded as atomic writes: they never race with each other, only with plain
// accesses (which makes a plain read after an atomic load a reported race: our kernels have none).
#define PA_TSAN_ATOMIC(N, T)                                                                                     \
    T __tsan_atomic##N##_load(const volatile T* a, int) {                                                        \
        access(a, sizeof(T), true, true, PA_PC);                                                                 \
        return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                             \
    }                                                                                                            \
    void __tsan_atomic##N##_store(volatile T* a, T v, int) {                                                     \
        access(a, sizeof(T), true, true, PA_PC);                                                                 \
        __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                                \
    }                                                                                                            \
    T __tsan_atomic##N##_exchange(volatile T* a, T v, int) {                                                     \
        access(a, sizeof(T), true, true, PA_PC);                                                                 \
        return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                                      \
    }                                                                                                            \
    T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) {                                                    \
        access(a, sizeof(T), true, true, PA_PC);                                                                 \
        return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                                       \
    }                                                                                                            \
    T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) {                                                    \
        access(a, sizeof(T), true, true, PA_PC);                                                                 \
        return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                                       \
    }                                                                                                            \
    T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int) {                                                    \
        access(a, sizeof(T), true, true, PA_PC);                                                                 \
        return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                                       \
    }                                                                                                            \
    T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int) {                                                     \
        access(a, sizeof(T), true, true, PA_PC);                                                                 \
        return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                                        \
    }                                                                                                            \
    T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int) {                                                    \
        access(a, sizeof(T), true, true, PA_PC);                                                                 \
        return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                                       \
    }                                                                                                            \
    T __tsan_atomic##N##_fetch_nand(volatile T* a, T v, int) {                                                   \
        access(a, sizeof(T), true, true, PA_PC);                                                                 \
        return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                                      \
    }                                                                                                            \
    int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                         \
        access(a, sizeof(T), true, true, PA_PC);                                                                 \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
    }                                                                                                            \
    int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                           \
        access(a, sizeof(T), true, true, PA_PC);                                                                 \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
    }                                                                                                            \
    T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                               \
        access(a, sizeof(T), true, true, PA_PC);                                                                 \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                        \
        return c;                                                                                                \
    }
PA_TSAN_ATOMIC(8, unsigned char)
PA_TSAN_ATOMIC(16, unsigned short)
PA_TSAN_ATOMIC(32, unsigned int)
PA_TSAN_ATOMIC(64, unsigned long long)
#undef PA_TSAN_ATOMIC

void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}
}
