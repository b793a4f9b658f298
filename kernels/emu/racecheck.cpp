// The race checker of the race-check build: the __tsan_* functions that -fsanitize=thread instrumentation calls
// in the kernel translation units, a shadow memory of who touched each byte range last, and the reports.
// The model is described in racecheck.h. This file is not instrumented itself; launches go through it one at a
// time (the runtime holds a lock from begin_launch to end_launch) on one worker, so the shadow needs no locks.
//
// Shadow memory. Each 4-byte granule keeps up to two write stamps and two read stamps: the last access of each
// kind and one earlier one that nothing ordered with it (from another warp or block if there is one), so a later
// access that is ordered after the last but not after an earlier one is still checked against it (concurrent
// readers, then a write by one of them; many atomics, then a plain store by one of them). This is exact for
// readers in any number of warps and blocks; within one warp, where a collective over part of the lanes can order
// some readers with the writer and not others, for the last two readers (a third, earlier one that only a
// partial-mask collective leaves unordered can go unreported). Accesses
// of 4 bytes or more use the granule's stamps; narrower ones get a shadow per byte (in a side table), checked
// against the granule's stamps too, so that byte arrays are neither falsely reported (neighbouring bytes of two
// threads) nor missed. About 100 bytes of shadow per 4 bytes touched: tiny shapes only, and a launch touching
// more than kMaxLaunchPages pages is reported as too large rather than allowed to exhaust memory.
#include "racecheck.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <unordered_map>

namespace pa_emu::race {

__thread Who* t_who = nullptr;

namespace {

constexpr uint8_t kAtomic = 1;  // an atomic read-modify-write (atomic loads and stores count as one)

// One access, as the shadow remembers it.
struct Stamp {
    uint32_t launch = 0;  // 0: none
    uint32_t block = 0;
    uint32_t epoch = 0;
    uint32_t clock = 0;   // the thread's own warp-clock component at the access
    uint32_t pc = 0;      // the instruction, as an offset in this module
    uint16_t thread = 0;
    uint8_t bytes = 0;    // which bytes of the granule
    uint8_t flags = 0;
};

struct Granule {
    Stamp write, write2, read, read2;
    uint32_t bytes_launch = 0;  // the launch whose narrower accesses have per-byte shadows for this granule
};

constexpr int kPageShift = 12;
constexpr size_t kGranulesPerPage = (size_t(1) << kPageShift) / 4;
constexpr size_t kMaxPages = 4096;          // more pages than this at a launch's start: start afresh
constexpr size_t kMaxLaunchPages = 8192;    // 32 MB touched by one launch (~800 MB of shadow): refuse

struct Shadow {
    std::unordered_map<uintptr_t, std::unique_ptr<Granule[]>> pages;
    std::unordered_map<uintptr_t, Granule> bytes;  // per-byte shadows, this launch only
    uintptr_t cached_key = ~uintptr_t(0);
    Granule* cached = nullptr;
    size_t launch_pages = 0;  // pages first touched in this launch

    Granule* at(uintptr_t addr) {
        const uintptr_t key = addr >> kPageShift;
        if (key != cached_key) {
            auto& page = pages[key];
            if (!page) {
                if (++launch_pages > kMaxLaunchPages) return nullptr;
                page.reset(new Granule[kGranulesPerPage]);
            }
            cached_key = key;
            cached = page.get();
        }
        return &cached[(addr >> 2) & (kGranulesPerPage - 1)];
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

// An access past the end of a __shared__ array (into its redzone) or of the dynamic shared memory.
struct OutOfBounds {
    bool found = false;
    uintptr_t addr = 0;
    size_t bytes = 0;
    bool write = false;
    bool dynamic = false;
    size_t past = 0;  // how far past the end (0: the first byte after it)
    Stamp now;
};

// A read of shared memory that no thread of the reading block wrote in this launch (the initcheck of shared
// memory): what the GPU returns there is whatever an earlier block or kernel left.
struct Uninitialised {
    bool found = false;
    uintptr_t addr = 0;
    Stamp now;
};

// An access to a cp.async destination still in flight (async_issued to async_landed).
struct InFlight {
    bool found = false;
    uintptr_t addr = 0;
    bool write = false;
    Stamp now, issue;
};

Shadow g_shadow;
Uninitialised g_uninit;
std::unordered_map<uintptr_t, Stamp> g_in_flight;  // 4-byte granule -> the cp.async copying into it
InFlight g_in_flight_access;
uint32_t g_launch = 0;
const LaunchInfo* g_info = nullptr;
BlockMemory g_block;
Race g_race;
OutOfBounds g_oob;
bool g_too_large = false;
uintptr_t g_module_base = 0;

bool in_shared(uintptr_t addr) {
    const auto* p = reinterpret_cast<const unsigned char*>(addr);
    for (const auto& [begin, end] : g_block.shared)
        if (p >= begin && p < end) return true;
    return false;
}

bool live(const Stamp& s) { return s.launch == g_launch; }

// Whether `s` happened before the access `who` is making now (or is stale), so the two cannot race: another
// launch; shared memory of a block that has ended; the same thread; an earlier barrier epoch; or, in the same
// warp, a collective that this thread joined after `s` (its clock for s's lane has moved past s's).
bool ordered(const Stamp& s, const Who& who, uintptr_t addr) {
    if (!live(s)) return true;
    if (s.block != who.block) return in_shared(addr);
    if (s.thread == who.thread || s.epoch != who.epoch) return true;
    return s.thread / 32 == who.thread / 32 && who.vc[s.thread % 32] > s.clock;
}

Stamp stamp(const Who& who, uint8_t bytes, uint8_t flags, uintptr_t pc) {
    return Stamp{g_launch, who.block, who.epoch, who.vc[who.thread % 32], uint32_t(pc - g_module_base),
                 uint16_t(who.thread), bytes, flags};
}

// The first earlier access in `g` that the access `now` races with, or null.
const Stamp* conflict(const Granule& g, const Stamp& now, bool write, bool atomic, uintptr_t addr, bool& was_write) {
    const Who& who = *t_who;
    auto clash = [&](const Stamp& s) {
        return (s.bytes & now.bytes) && !(atomic && (s.flags & kAtomic)) && !ordered(s, who, addr);
    };
    was_write = true;
    if (clash(g.write)) return &g.write;
    if (clash(g.write2)) return &g.write2;
    was_write = false;
    if (write && clash(g.read)) return &g.read;
    if (write && clash(g.read2)) return &g.read2;
    return nullptr;
}

void record(Granule& g, const Stamp& now, bool write, bool atomic, uintptr_t addr) {
    const Who& who = *t_who;
    // Beside `now`, keeps as the second stamp one earlier access that nothing orders with `now`, preferring one
    // from another warp or block: no later collective of now's warp can order that one, so whichever thread
    // accesses next, one of the two stamps is unordered with it if any earlier access still is, as long as the
    // accesses that might be come from more than one warp. Among lanes of one warp only the last two are kept.
    auto push = [&](Stamp& last, Stamp& second) {
        auto open = [&](const Stamp& s) { return live(s) && !ordered(s, who, addr); };
        auto elsewhere = [&](const Stamp& s) { return s.block != now.block || s.thread / 32 != now.thread / 32; };
        const bool keep_second = open(second) && elsewhere(second);
        if (open(last) && (elsewhere(last) || !keep_second))
            second = last;
        else if (!open(second))
            second.launch = 0;
        last = now;
    };
    if (!write) return push(g.read, g.read2);
    if (atomic) return push(g.write, g.write2);
    // A plain write: anything unordered with it has just been reported; anything ordered before it is ordered
    // before whatever is ordered after it.
    g.write = now;
    g.write2.launch = g.read.launch = g.read2.launch = 0;
}

void report(uintptr_t addr, const Stamp& now, bool now_writes, const Stamp& before, bool before_wrote) {
    g_race = Race{true, in_shared(addr), addr, now, before, now_writes, before_wrote};
}

// Checks (and, with `keep`, records) one access to one shadow entry.
void visit(Granule& g, uintptr_t addr, uint8_t bytes, bool write, bool atomic, uintptr_t pc, bool keep) {
    const Stamp now = stamp(*t_who, bytes, atomic ? kAtomic : 0, pc);
    bool was_write = false;
    if (const Stamp* s = conflict(g, now, write || atomic, atomic, addr, was_write))
        return report(addr, now, write || atomic, *s, was_write);
    if (keep) record(g, now, write || atomic, atomic, addr);
}

// Whether the running block wrote byte `b` (in granule `g`) in this launch: the granule's write stamps, or the
// byte's own for narrower writes.
bool written_by_this_block(const Granule& g, uintptr_t b) {
    const Who& who = *t_who;
    auto ours = [&](const Stamp& s, uint8_t bit) { return live(s) && s.block == who.block && (s.bytes & bit); };
    const auto bit = uint8_t(1u << (b & 3));
    if (ours(g.write, bit) || ours(g.write2, bit)) return true;
    if (g.bytes_launch != g_launch) return false;
    const auto it = g_shadow.bytes.find(b);
    return it != g_shadow.bytes.end() && (ours(it->second.write, 1) || ours(it->second.write2, 1));
}

// The runtime's own __thread variables that kernel code reads (threadIdx and friends): in the TLS segment with
// the __shared__ objects, written only by the uninstrumented runtime, so never "written" in the shadow.
template <class T>
bool within(uintptr_t a, const T& var) {
    const auto v = reinterpret_cast<uintptr_t>(&var);
    return a >= v && a < v + sizeof(T);
}
bool runtime_variable(uintptr_t a) {
    return within(a, t_thread_idx) || within(a, t_block_idx) || within(a, t_block_dim) || within(a, t_grid_dim) ||
           within(a, t_dynamic_shared);
}

void check_initialised(const Granule& g, uintptr_t lo, uintptr_t hi, uintptr_t pc) {
    if (runtime_variable(lo)) return;
    for (uintptr_t b = lo; b < hi && !g_uninit.found; ++b)
        if (!written_by_this_block(g, b)) g_uninit = Uninitialised{true, b, stamp(*t_who, 1, 0, pc)};
}

// Whether [c, c + size) touches forbidden shared memory; records the first such access.
bool out_of_bounds(const unsigned char* c, size_t size, bool write, uintptr_t pc) {
    const auto& zones = g_block.forbidden;
    if (zones.empty() || c + size <= zones.front().begin || c >= zones.back().end) return false;
    auto it = std::upper_bound(zones.begin(), zones.end(), c,
                               [](const unsigned char* p, const Forbidden& z) { return p < z.begin; });
    // The zone that starts at or before c, or the next one if the access reaches into it.
    const Forbidden* hit = nullptr;
    if (it != zones.begin() && c < std::prev(it)->end) hit = &*std::prev(it);
    else if (it != zones.end() && c + size > it->begin) hit = &*it;
    if (!hit) return false;
    if (!g_oob.found) {
        const size_t past = c > hit->begin ? size_t(c - hit->begin) : 0;
        g_oob = OutOfBounds{true, reinterpret_cast<uintptr_t>(c), size, write, hit->dynamic, past,
                            stamp(*t_who, 0, 0, pc)};
    }
    return true;
}

// Whether [addr, addr + size) touches a cp.async destination in flight; records the first such access.
bool in_flight(uintptr_t addr, size_t size, bool write, uintptr_t pc) {
    for (uintptr_t granule = addr & ~uintptr_t(3); granule < addr + size; granule += 4) {
        const auto it = g_in_flight.find(granule);
        if (it == g_in_flight.end()) continue;
        if (!g_in_flight_access.found)
            g_in_flight_access = InFlight{true, std::max(addr, granule), write, stamp(*t_who, 0, 0, pc), it->second};
        return true;
    }
    return false;
}

void access(const volatile void* p, size_t size, bool write, bool atomic, uintptr_t pc) {
    if (!t_who || g_race.found || g_too_large || size == 0) return;
    const auto addr = reinterpret_cast<uintptr_t>(p);
    const auto* c = reinterpret_cast<const unsigned char*>(addr);
    if (c >= g_block.stacks_begin && c < g_block.stacks_end) return;  // a fiber's own stack
    if (out_of_bounds(c, size, write, pc)) return;
    if (!g_in_flight.empty() && in_flight(addr, size, write, pc)) return;
    const uintptr_t end = addr + size;
    for (uintptr_t granule = addr & ~uintptr_t(3); granule < end && !g_race.found; granule += 4) {
        Granule* g = g_shadow.at(granule);
        if (!g) {
            g_too_large = true;
            return;
        }
        const uintptr_t lo = std::max(addr, granule), hi = std::min(end, granule + 4);
        if (!write && !g_uninit.found && in_shared(granule)) check_initialised(*g, lo, hi, pc);
        if (lo == granule && hi == granule + 4) {
            visit(*g, granule, 0xF, write, atomic, pc, true);
            if (g->bytes_launch == g_launch)  // narrower accesses touched this granule in this launch
                for (uintptr_t b = granule; b < granule + 4 && !g_race.found; ++b)
                    visit(g_shadow.bytes[b], b, 1, write, atomic, pc, true);
        } else {
            // Against the whole-granule accesses (without recording: that would merge bytes), then per byte.
            visit(*g, granule, uint8_t(((1u << (hi - lo)) - 1u) << (lo - granule)), write, atomic, pc, false);
            g->bytes_launch = g_launch;
            for (uintptr_t b = lo; b < hi && !g_race.found; ++b) visit(g_shadow.bytes[b], b, 1, write, atomic, pc, true);
        }
    }
}

// ---- reports ------------------------------------------------------------------------------------------------
// A stamp's pc is the return address of the hook's call: the access is the instruction before it.
uintptr_t call_site(uint32_t pc) { return pc ? pc - 1 : 0; }

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
    const std::string why = r.now.block != r.before.block
                                ? "blocks of one launch are never ordered"
                                : "no __syncthreads() or warp collective between them (barrier epoch " +
                                      std::to_string(r.now.epoch) + ")";
    return "data race on " + std::string(r.shared ? "shared" : "global") + " memory at " + addr + ": " + who(r.now) +
           " " + verb(r.now, r.now_writes, false) + " at " + source_line(call_site(r.now.pc)) + ", after " + who(r.before) + " " +
           verb(r.before, r.before_wrote, true) + " at " + source_line(call_site(r.before.pc)) + "; " + why;
}

std::string describe(const OutOfBounds& o, const LaunchInfo& info) {
    char addr[32];
    std::snprintf(addr, sizeof addr, "0x%zx", size_t(o.addr));
    const std::string where = o.past == 0 ? "just past the end of " : std::to_string(o.past) + " bytes past the end of ";
    const std::string what = o.dynamic ? "the " + std::to_string(info.dynamic_shared) +
                                             " bytes of dynamic shared memory the launch gave it"
                                       : "a __shared__ array";
    return "out-of-bounds shared memory: thread " + fmt3(o.now.thread, info.block) + " of block " +
           fmt3(o.now.block, info.grid) + (o.write ? " writes " : " reads ") + std::to_string(o.bytes) +
           " bytes at " + addr + ", " + where + what + ", at " + source_line(call_site(o.now.pc));
}

std::string describe(const Uninitialised& u, const LaunchInfo& info) {
    char addr[32];
    std::snprintf(addr, sizeof addr, "0x%zx", size_t(u.addr));
    return "uninitialised shared memory at " + std::string(addr) + ": thread " + fmt3(u.now.thread, info.block) +
           " of block " + fmt3(u.now.block, info.grid) + " reads it at " + source_line(call_site(u.now.pc)) +
           ", but no thread of its block wrote it in this launch (the GPU returns whatever was there)";
}

std::string describe(const InFlight& a, const LaunchInfo& info) {
    char addr[32];
    std::snprintf(addr, sizeof addr, "0x%zx", size_t(a.addr));
    const bool own = a.now.thread == a.issue.thread;
    return "cp.async destination in flight: thread " + fmt3(a.now.thread, info.block) + " of block " +
           fmt3(a.now.block, info.grid) + (a.write ? " writes " : " reads ") + addr + " at " +
           source_line(call_site(a.now.pc)) + ", which the cp.async of " +
           (own ? std::string("the same thread") : "thread " + fmt3(a.issue.thread, info.block)) + " at " +
           source_line(call_site(a.issue.pc)) + " is still copying (" +
           (own ? "it must cp.async.wait_group for that copy's group first"
                : "its thread must wait for the copy's group, and a __syncthreads() follow, first") + ")";
}

}  // namespace

void async_issued(const void* dst, size_t bytes, const void* src, size_t src_bytes, uintptr_t pc) {
    if (!t_who) return;
    if (src_bytes) access(src, src_bytes, false, false, pc);
    access(dst, bytes, true, false, pc);
    const auto d = reinterpret_cast<uintptr_t>(dst);
    const Stamp issue = stamp(*t_who, 0, 0, pc);
    for (uintptr_t granule = d & ~uintptr_t(3); granule < d + bytes; granule += 4) g_in_flight[granule] = issue;
}

void async_landed(const void* dst, size_t bytes, uintptr_t pc) {
    const auto d = reinterpret_cast<uintptr_t>(dst);
    for (uintptr_t granule = d & ~uintptr_t(3); granule < d + bytes; granule += 4) g_in_flight.erase(granule);
    if (t_who) access(dst, bytes, true, false, pc);
}

void begin_launch(const LaunchInfo& info) {
    if (!g_module_base) {
        Dl_info self;
        if (dladdr(reinterpret_cast<void*>(&begin_launch), &self)) g_module_base = uintptr_t(self.dli_fbase);
    }
    if (++g_launch == 0) {  // wrapped: old stamps could look current
        g_shadow.clear();
        g_launch = 1;
    }
    if (g_shadow.pages.size() > kMaxPages) g_shadow.clear();
    g_shadow.bytes.clear();
    g_shadow.launch_pages = 0;
    g_info = &info;
    g_race = Race{};
    g_oob = OutOfBounds{};
    g_uninit = Uninitialised{};
    g_in_flight.clear();
    g_in_flight_access = InFlight{};
    g_too_large = false;
}

void begin_block(const BlockMemory& memory) {
    g_block = memory;
    g_in_flight.clear();  // (the last block's copies landed when its threads ended, or it failed)
}

std::string end_launch() {
    std::string out;
    if (g_oob.found && g_info)
        out = describe(g_oob, *g_info);
    else if (g_in_flight_access.found && g_info)
        out = describe(g_in_flight_access, *g_info);
    else if (g_race.found && g_info)
        out = describe(g_race, *g_info);
    else if (g_uninit.found && g_info)
        out = describe(g_uninit, *g_info);
    else if (g_too_large)
        out = "the race checker gave up: the launch touched more than " +
              std::to_string(kMaxLaunchPages * (size_t(1) << kPageShift) >> 20) +
              " MB, and the race-check build is for small shapes (its shadow memory takes ~25x what it covers)";
    g_race = Race{};
    g_oob = OutOfBounds{};
    g_uninit = Uninitialised{};
    g_in_flight.clear();
    g_in_flight_access = InFlight{};
    g_block = BlockMemory{};
    g_info = nullptr;
    g_too_large = false;
    return out;
}

}  // namespace pa_emu::race

// ---- the ThreadSanitizer interface (tsan_hooks.h) -------------------------------------------------------------
#include "tsan_hooks.h"

// All atomics, loads included, are recorded as atomic writes: they never race with each other, only with plain
// accesses (which makes a plain read after an atomic load a reported race: our kernels have none).
void pa_emu_tsan_access(const volatile void* p, size_t bytes, pa_emu::TsanAccess kind, uintptr_t pc) {
    using pa_emu::TsanAccess;
    pa_emu::race::access(p, bytes, kind != TsanAccess::Read, kind != TsanAccess::Read && kind != TsanAccess::Write, pc);
}

