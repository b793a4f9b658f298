// The emulator's runtime: the worker pool, the fibers that stand for CUDA threads, the block scheduler,
// barriers, warp collectives, and the checks that turn GPU-side undefined behaviour into a KernelError.
//
// Scheduling. A worker takes a block, gives each of its threads a fiber on a pre-allocated stack, and runs
// the fibers round-robin. A fiber runs until it blocks (at __syncthreads or in a warp collective) or ends.
// When a pass over the block finds nothing runnable, the scheduler decides:
//   - every live thread waits at the same __syncthreads -> release them all;
//   - some wait at a barrier while others have exited, or they wait at different barriers -> divergent barrier;
//   - anything else (a collective waiting for a lane that never comes) -> deadlock.
// A warp collective completes when the last lane of its mask arrives; results are computed then, from a
// snapshot of what every participating lane brought, so a lane may exit right after it.
#include <dlfcn.h>
#include <elf.h>
#include <setjmp.h>
#include <signal.h>
#include <link.h>
#include <sched.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "cuda_emu.h"

// Fibers switch with our own few instructions (fiber_switch.h) on x86-64 and AArch64, with ucontext elsewhere or
// when the build asks for it (-DPYALEXNET_EMU_UCONTEXT=ON: the fallback CI keeps tested).
#if !defined(PA_EMU_UCONTEXT)
#include "fiber_switch.h"
#endif
#if !defined(PA_EMU_OWN_SWITCH)
#include <ucontext.h>
#endif

// The AddressSanitizer build (-DPYALEXNET_EMU_SANITIZE=ON: ASan + UBSan): ASan is told about every switch
// between stacks, reused stacks are unpoisoned, `__shared__` is plain `static` (ASan puts redzones around
// globals, not around thread_local), so one worker runs every block, and a fault report ends with the kernel,
// block and thread it happened in.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define PA_EMU_ASAN 1
#else
#define PA_EMU_ASAN 0
#endif

// The race-check build (-DPYALEXNET_EMU_RACECHECK=ON, see racecheck.h): every fiber carries its race-check
// identity, barriers and warp collectives advance it, and one worker runs every block.
#if defined(PA_EMU_RACECHECK)
#include "racecheck.h"
#define PA_EMU_RACE 1
#else
#define PA_EMU_RACE 0
#endif

// The counting build (pyalexnet._emu_profile, see counters.h): every access of kernel code is counted per
// warp instruction; the scheduler tells the counters which thread runs, where barriers fall and where blocks
// end, and may run only a sample of the grid's blocks.
#if defined(PA_EMU_PROFILE)
#include "counters.h"
#define PA_EMU_PROF 1
#else
#define PA_EMU_PROF 0
#endif

namespace pa_emu {

__thread const uint3* t_thread_idx = nullptr;
__thread uint3 t_block_idx = {0, 0, 0};
__thread dim3 t_block_dim;
__thread dim3 t_grid_dim;
__thread unsigned char* t_dynamic_shared = nullptr;

namespace {

// The GPU's limits (compute capability 8.0-9.0).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockZ = 64;
constexpr unsigned long long kMaxGridX = 2147483647ull;
constexpr unsigned kMaxGridYZ = 65535;
constexpr size_t kMaxStaticShared = 48 * 1024;
constexpr size_t kDefaultDynamicShared = 48 * 1024;  // without cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr size_t kMaxDynamicShared = 227 * 1024;     // Hopper's opt-in ceiling per block

// Our kernels peak under 4 KB, but CUDA allows a thread hundreds of KB of local memory (a large local array):
// 1 MB each, reserved, not committed (MAP_NORESERVE: only the pages a thread touches cost memory). ASan's
// build keeps 256 KB (its redzones, and its own overflow reports).
constexpr size_t kStackBytes = (PA_EMU_ASAN ? 256 : 1024) * 1024;
constexpr size_t kPage = 4096;
// Each stack has a PROT_NONE guard page below it, and the kernel sources are compiled with
// -fstack-clash-protection (large frames probe each page in order), so an overflow faults on its own guard
// before it writes anything below: the fault handler turns that into a KernelError. A guard page costs a
// memory-map entry (a process has ~65k): where the kernel refuses one, the stacks below go without, and the
// canary in the lowest bytes of each stack, checked every time a fiber switches back, still reports an overflow.
constexpr int kCanaryWords = 8;
constexpr uint64_t kCanary = 0x5AFEC0DE5AFEC0DEull;

enum class State : unsigned char { Runnable, AtBarrier, InCollective, Done };
// Why a runnable fiber last gave up the worker, for the watchdog's report.
enum class Yielded : unsigned char { No, Preempted, Nanosleep, Atomic };

struct Group;

// One cp.async in flight: its source as it was read at the issue (the GPU may read it any time before the
// wait; a kernel that changes it in between is wrong either way), and where it lands.
struct AsyncCopy {
    unsigned char* dst;
    unsigned char data[16];
    int bytes;
    unsigned group;
    uintptr_t pc;  // the issuing instruction (the race checker's reports name its line)
};

struct Fiber {
#if defined(PA_EMU_OWN_SWITCH)
    void* sp = nullptr;  // its stack pointer while it is switched out
#else
    ucontext_t context;
#endif
    uint3 idx = {0, 0, 0};
    int linear = 0;
    State state = State::Done;
    const char* file = nullptr;  // where it waits
    int line = 0;
    Group* group = nullptr;
    // Runtime code on this fiber's stack (scheduler state half-updated): the watchdog must not preempt it.
    // A fiber starts in runtime code; run_thread_body lowers it around the kernel itself.
    volatile int runtime_depth = 1;  // read by the preemption handler: see set_depth
    Yielded yielded = Yielded::No;
    uintptr_t preempted_pc = 0;  // where the watchdog last preempted it (Yielded::Preempted)
#if PA_EMU_ASAN
    void* fake_stack = nullptr;      // ASan's bookkeeping while the fiber is switched out
    const void* bottom = nullptr;
#endif
#if PA_EMU_RACE
    race::Who who;
#endif
    // cp.async copies in flight, in issue order (async_copy), and the groups committed so far: a copy belongs to
    // the group that was open when it was issued (its number: the count committed before it).
    std::vector<AsyncCopy> async;
    unsigned async_committed = 0;
};

// One warp collective in progress: lanes arrive one by one; it completes when `arrived == mask`.
struct Group {
    bool in_use = false;
    bool complete = false;
    Collective kind = Collective::SyncWarp;
    unsigned mask = 0;
    unsigned arrived = 0;
    int readers = 0;  // lanes that have not yet collected their result
    const char* file = nullptr;
    int line = 0;
    int width = 32;
    uint64_t value[32] = {};
    int arg[32] = {};
    uint64_t out[32] = {};
};

const char* collective_name(Collective k) {
    switch (k) {
        case Collective::SyncWarp: return "__syncwarp";
        case Collective::ShflIdx: return "__shfl_sync";
        case Collective::ShflUp: return "__shfl_up_sync";
        case Collective::ShflDown: return "__shfl_down_sync";
        case Collective::ShflXor: return "__shfl_xor_sync";
        case Collective::Ballot: return "__ballot_sync";
        case Collective::Any: return "__any_sync";
        case Collective::All: return "__all_sync";
        case Collective::MatchAny: return "__match_any_sync";
        case Collective::MatchAll: return "__match_all_sync";
        case Collective::ReduceAdd: return "__reduce_add_sync";
        case Collective::ReduceMin: return "__reduce_min_sync";
        case Collective::ReduceMax: return "__reduce_max_sync";
        case Collective::ReduceAnd: return "__reduce_and_sync";
        case Collective::ReduceOr: return "__reduce_or_sync";
        case Collective::ReduceXor: return "__reduce_xor_sync";
    }
    return "?";
}

std::string fmt_idx(const uint3& v) {
    return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

std::string fmt_hex(unsigned v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", v);
    return buf;
}

// The same source line; the pointers are equal when both calls are in one file, so strcmp rarely runs.
bool same_site(const char* file_a, int line_a, const char* file_b, int line_b) {
    return line_a == line_b && (file_a == file_b || std::strcmp(file_a, file_b) == 0);
}

std::string site(const char* file, int line) { return std::string(file) + ":" + std::to_string(line); }

// Everything one worker owns: fiber stacks, the current block's fibers and collectives, dynamic shared memory.
struct Worker {
    unsigned char* stacks = nullptr;
    std::vector<Fiber> fibers = std::vector<Fiber>(kMaxThreadsPerBlock);
    std::vector<std::vector<Group>> groups = std::vector<std::vector<Group>>(kMaxThreadsPerBlock / 32);
    // Lanes that have exited, or do not exist (past the block's last thread): a warp collective waits only
    // for the lanes of its mask that have not exited, as the GPU does.
    std::vector<unsigned> exited = std::vector<unsigned>(kMaxThreadsPerBlock / 32);
    // Dynamic shared memory ends where a PROT_NONE page begins, so reading or writing past the bytes the
    // launch asked for faults at once rather than corrupting the heap (with 0 bytes, any use faults).
    unsigned char* dynamic_region = nullptr;
    unsigned char* dynamic_guard = nullptr;
    unsigned char* tls_block = nullptr;  // this thread's instance of the module's TLS segment (static shared)
    size_t tls_size = 0;
    const LaunchInfo* info = nullptr;    // the launch being run, for fault reports
    int nthreads = 0;
    int guarded_stacks = 0;  // stacks [0, guarded_stacks) have their guard page
#if PA_EMU_ASAN
    void* scheduler_fake_stack = nullptr;
    const void* scheduler_bottom = nullptr;
    size_t scheduler_size = 0;
#endif
    const std::function<void()>* body = nullptr;
    std::string error;  // the first fault of the current block, empty if none
    sigjmp_buf fault_return;      // where a fault in a fiber comes back to (run_block)
    // Kernel code runs: a fault there is the block's, not the process's. Atomic: the watchdog reads it too.
    std::atomic<int> in_fiber{0};
    char fault[512] = {};         // the handler's description of it
    // The barrier being filled: how many threads wait at it, the first of them, and their nonzero predicates.
    int barrier_waiting = 0;
    const Fiber* barrier_first = nullptr;
    int barrier_predicates = 0;
    int barrier_count = 0;  // the last released barrier's count of nonzero predicates (__syncthreads_count)
    // What the watchdog (see the pool) watches: resumes by the scheduler, and progress (a barrier released, a
    // collective completed, a thread finished, a block begun); it asks for a preemption or a livelock report.
    std::atomic<unsigned> resumes{0};
    std::atomic<unsigned> progress{0};
    std::atomic<bool> preempt{false};   // the instrumented builds' hooks yield when they see it
    std::atomic<bool> livelock{false};  // the scheduler fails the block ...
    std::atomic<unsigned> livelock_progress{0};  // ... if its progress is still this
    std::atomic<bool> in_block{false};  // between a block's start and its end
    pthread_t thread{};
#if defined(PA_EMU_OWN_SWITCH)
    void* scheduler_sp = nullptr;  // the worker's own stack while a fiber runs
#else
    ucontext_t scheduler;
#endif

    Worker() {
        void* p = mmap(nullptr, kMaxThreadsPerBlock * kStackSlot, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        const size_t dynamic_bytes = (kMaxDynamicShared + kPage - 1) / kPage * kPage;
        void* d = mmap(nullptr, dynamic_bytes + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED || d == MAP_FAILED) {
            std::fprintf(stderr, "pyalexnet emulator: cannot map fiber stacks or shared memory\n");
            std::abort();
        }
        stacks = static_cast<unsigned char*>(p);
        while (guarded_stacks < int(kMaxThreadsPerBlock) &&
               mprotect(stacks + size_t(guarded_stacks) * kStackSlot, kPage, PROT_NONE) == 0)
            ++guarded_stacks;  // out of map entries: the rest rely on their canaries
        for (unsigned i = 0; i < kMaxThreadsPerBlock; ++i) write_canary(int(i));
        dynamic_region = static_cast<unsigned char*>(d);
        dynamic_guard = dynamic_region + dynamic_bytes;
        if (mprotect(dynamic_guard, kPage, PROT_NONE) != 0) {
            std::fprintf(stderr, "pyalexnet emulator: cannot protect the shared-memory guard page\n");
            std::abort();
        }
        // A warp has at most 32 collectives open (each holds a lane that has not read its result yet), so
        // this never reallocates under the Group* that waiting fibers hold.
        for (auto& warp : groups) warp.reserve(32);
    }
    static constexpr size_t kStackSlot = kPage + kStackBytes;  // a guard page, then the stack
    unsigned char* stack_base(int i) { return stacks + size_t(i) * kStackSlot + kPage; }
    void write_canary(int i) {
        auto* c = reinterpret_cast<uint64_t*>(stack_base(i));
        for (int j = 0; j < kCanaryWords; ++j) c[j] = kCanary;
    }
    bool canary_intact(int i) {
        if (i < guarded_stacks) return true;  // an overflow faults on the guard page before it reaches the canary
        const auto* c = reinterpret_cast<const uint64_t*>(stack_base(i));
        for (int j = 0; j < kCanaryWords; ++j)
            if (c[j] != kCanary) return false;
        return true;
    }
};

__thread Worker* t_worker = nullptr;
__thread Fiber* t_fiber = nullptr;

void record_error(Worker& w, const std::string& msg) {
    if (w.error.empty()) w.error = msg;
}

std::string thread_at(const Fiber& f) { return "thread " + fmt_idx(f.idx); }

// ---- context switching ---------------------------------------------------------------------------------
void lane_exited(Worker& w, Fiber& f);
void land_async_copies(Fiber& f, unsigned before_group);

void note_progress(Worker& w) { w.progress.store(w.progress.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed); }

// The preemption handler reads a fiber's runtime depth between any two instructions: the compiler must not move
// the runtime's own stores across the change (volatile keeps the store, the fence keeps the order).
void set_depth(Fiber& f, int depth) {
    std::atomic_signal_fence(std::memory_order_seq_cst);
    f.runtime_depth = depth;
    std::atomic_signal_fence(std::memory_order_seq_cst);
}

void run_thread_body(Fiber* f) {
    try {
        set_depth(*f, 0);
        (*t_worker->body)();
        set_depth(*f, 1);
        land_async_copies(*f, ~0u);  // a thread may end with copies in flight: the GPU completes them
        lane_exited(*t_worker, *f);
    } catch (const std::exception& e) {
        set_depth(*f, 1);
        record_error(*t_worker, e.what());
    } catch (...) {
        set_depth(*f, 1);
        record_error(*t_worker, thread_at(*f) + ": an exception not derived from std::exception");
    }
    f->state = State::Done;
    note_progress(*t_worker);
}

// Marks runtime code that runs on a fiber (it may switch away inside): not a point to preempt.
struct RuntimeCode {
    Fiber& f;
    explicit RuntimeCode(Fiber& fiber) : f(fiber) { set_depth(f, f.runtime_depth + 1); }
    ~RuntimeCode() { set_depth(f, f.runtime_depth - 1); }
    RuntimeCode(const RuntimeCode&) = delete;
    RuntimeCode& operator=(const RuntimeCode&) = delete;
};

// ASan's side of each switch (no-ops in other builds): the scheduler enters a fiber, a fiber arrives, a fiber
// leaves (for good when it has finished), the scheduler is back.
void asan_enter_fiber(Worker& w, Fiber& f) {
#if PA_EMU_ASAN
    __sanitizer_start_switch_fiber(&w.scheduler_fake_stack, f.bottom, kStackBytes);
#else
    (void)w, (void)f;
#endif
}
void asan_back_in_scheduler(Worker& w) {
#if PA_EMU_ASAN
    __sanitizer_finish_switch_fiber(w.scheduler_fake_stack, nullptr, nullptr);
#else
    (void)w;
#endif
}
void asan_arrived_in_fiber(Worker& w, Fiber& f) {
#if PA_EMU_ASAN
    __sanitizer_finish_switch_fiber(f.fake_stack, &w.scheduler_bottom, &w.scheduler_size);
#else
    (void)w, (void)f;
#endif
}
void asan_leave_fiber(Worker& w, Fiber& f, bool finished) {
#if PA_EMU_ASAN
    __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, w.scheduler_bottom, w.scheduler_size);
#else
    (void)w, (void)f, (void)finished;
#endif
}
void prepare_stack(Worker& w, Fiber& f, int i) {
#if PA_EMU_ASAN
    // A fiber abandoned after a fault leaves its frames' redzones poisoned: this stack starts clean.
    ASAN_UNPOISON_MEMORY_REGION(w.stack_base(i), kStackBytes);
    f.bottom = w.stack_base(i);
    f.fake_stack = nullptr;
#else
    (void)w, (void)f, (void)i;
#endif
}

#if defined(PA_EMU_OWN_SWITCH)
void fiber_entry(void* arg) {
    Fiber* f = static_cast<Fiber*>(arg);
    asan_arrived_in_fiber(*t_worker, *f);
    run_thread_body(f);
    asan_leave_fiber(*t_worker, *f, true);
    pa_fiber_switch(&f->sp, t_worker->scheduler_sp);  // never resumed again
}
void start_fiber(Worker& w, Fiber& f, int i) {
    prepare_stack(w, f, i);
    f.sp = pa_fiber_init(w.stack_base(i) + kStackBytes, fiber_entry, &f);
}
void resume(Worker& w, Fiber& f) {
    asan_enter_fiber(w, f);
    pa_fiber_switch(&w.scheduler_sp, f.sp);
    asan_back_in_scheduler(w);
}
void yield(Worker& w, Fiber& f) {
    asan_leave_fiber(w, f, false);
    pa_fiber_switch(&f.sp, w.scheduler_sp);
    asan_arrived_in_fiber(w, f);
}
#else
void fiber_entry() {
    Fiber* f = t_fiber;
    asan_arrived_in_fiber(*t_worker, *f);
    run_thread_body(f);
    asan_leave_fiber(*t_worker, *f, true);
    setcontext(&t_worker->scheduler);  // never resumed again
}
void start_fiber(Worker& w, Fiber& f, int i) {
    prepare_stack(w, f, i);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = w.stack_base(i);
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
}
void resume(Worker& w, Fiber& f) {
    asan_enter_fiber(w, f);
    swapcontext(&w.scheduler, &f.context);
    asan_back_in_scheduler(w);
}
void yield(Worker& w, Fiber& f) {
    asan_leave_fiber(w, f, false);
    swapcontext(&f.context, &w.scheduler);
    asan_arrived_in_fiber(w, f);
}
#endif

// What the worker's thread-locals say while fiber f runs (the scheduler sets them before it resumes one).
void enter_fiber_context(Fiber& f) {
    t_fiber = &f;
    t_thread_idx = &f.idx;
#if PA_EMU_RACE
    race::t_who = &f.who;
#endif
#if PA_EMU_PROF
    prof::set_thread(f.linear);
#endif
}
// ... and while the scheduler runs: no thread of the block is running.
void leave_fiber_context(Worker& w) {
    w.in_fiber.store(0, std::memory_order_relaxed);
#if PA_EMU_PROF
    prof::set_thread(-1);
#endif
#if PA_EMU_RACE
    race::t_who = nullptr;
#endif
}

// Suspends the calling fiber until the scheduler makes it runnable again. A block that has failed never
// resumes its fibers, so a fault cannot cascade into a second one.
void block_until_runnable(Fiber& f) {
    yield(*t_worker, f);
    enter_fiber_context(f);
}

// ---- the scheduler's decisions when nothing can run -------------------------------------------------------
void resolve_stall(Worker& w) {
    const int n = w.nthreads;
    const Fiber* at_barrier = nullptr;
    const Fiber* exited = nullptr;
    const Fiber* in_collective = nullptr;
    for (int i = 0; i < n; ++i) {
        const Fiber& f = w.fibers[i];
        if (f.state == State::AtBarrier && !at_barrier) at_barrier = &f;
        if (f.state == State::Done && !exited) exited = &f;
        if (f.state == State::InCollective && !in_collective) in_collective = &f;
    }
    if (in_collective) {
        const Group& g = *in_collective->group;
        std::string why;
        const int warp = in_collective->linear / 32;
        for (int lane = 0; lane < 32 && why.empty(); ++lane) {
            if (!(g.mask >> lane & 1u) || (g.arrived >> lane & 1u)) continue;
            const Fiber& missing = w.fibers[warp * 32 + lane];
            if (missing.state == State::Done)
                why = "lane " + std::to_string(lane) + " (" + thread_at(missing) + ") has exited";
            else if (missing.state == State::AtBarrier)
                why = "lane " + std::to_string(lane) + " (" + thread_at(missing) + ") waits at __syncthreads() at " +
                      site(missing.file, missing.line);
            else
                why = "lane " + std::to_string(lane) + " (" + thread_at(missing) + ") waits in another collective at " +
                      site(missing.file, missing.line);
        }
        record_error(w, "deadlock: " + thread_at(*in_collective) + " waits in " + collective_name(g.kind) + " at " +
                            site(g.file, g.line) + " with mask " + fmt_hex(g.mask) + ", but " + why);
        return;
    }
    if (!at_barrier) return;  // every thread is done
    if (exited) {
        record_error(w, "divergent __syncthreads(): " + thread_at(*exited) +
                            " exited without reaching the barrier at " + site(at_barrier->file, at_barrier->line) +
                            " where " + thread_at(*at_barrier) + " waits");
        return;
    }
    // The last thread to reach a barrier releases it (syncthreads_count): with none exited and none in a
    // collective, some thread is still runnable.
    record_error(w, "emulator scheduler: " + thread_at(*at_barrier) + " waits at " +
                        site(at_barrier->file, at_barrier->line) + " and no thread can run");
}

std::string describe_code_address(uintptr_t pc);
double watchdog_seconds();

// The watchdog saw no progress in this block for its whole period: name the threads that still run and where.
std::string livelock_report(Worker& w) {
    std::string where;
    int named = 0, running = 0;
    for (int i = 0; i < w.nthreads; ++i) {
        const Fiber& f = w.fibers[i];
        if (f.state != State::Runnable) continue;
        if (++running > 4) continue;
        where += named++ ? "; " : "";
        where += thread_at(f);
        if (f.yielded == Yielded::Preempted)
            where += " at " + describe_code_address(f.preempted_pc);
        else if (f.yielded == Yielded::Nanosleep)
            where += " in __nanosleep at " + site(f.file, f.line);
        else if (f.yielded == Yielded::Atomic)
            where += " in an atomic operation";
    }
    if (running > named) where += "; and " + std::to_string(running - named) + " more";
    char seconds[32];
    std::snprintf(seconds, sizeof seconds, "%g", watchdog_seconds());
    return "livelock: for " + std::string(seconds) + " s no thread of the block reached a barrier, completed a warp "
           "collective or exited; still running: " + where + ". A thread waiting for a flag that nothing sets, or " +
           seconds + " s of work between two barriers (PYALEXNET_EMU_WATCHDOG sets the period; 0 turns it off)";
}

// The block's memory as the checking and counting builds see it: fiber stacks (each thread's own) and shared
// memory. Every __shared__ object lives in the module's TLS segment, the kernel's own and those of the
// __device__ functions it calls: the whole segment counts as shared memory (the runtime's own __thread
// variables there are only ever read by kernel code).
[[maybe_unused]] const std::vector<std::pair<size_t, size_t>>& shared_redzones();

template <class BlockMemory>
[[maybe_unused]] void describe_block_memory(Worker& w, BlockMemory& memory) {
    memory.stacks_begin = w.stacks;
    memory.stacks_end = w.stacks + kMaxThreadsPerBlock * Worker::kStackSlot;
    memory.shared.emplace_back(t_dynamic_shared, w.dynamic_guard);
    if (w.tls_block) memory.shared.emplace_back(w.tls_block, w.tls_block + w.tls_size);
}

// The dynamic shared memory ends at the next 16-byte boundary, where the guard page begins: the few bytes between
// the size the launch asked for and that boundary start poisoned (0xff), and a block that changed one wrote
// past the end. (A read there goes unseen in this build: the race-check and ASan builds report every access
// there as it happens, naming the thread.)
[[maybe_unused]] void check_dynamic_slack(Worker& w, const LaunchInfo& info) {
    const unsigned char* end = t_dynamic_shared + info.dynamic_shared;
    for (const unsigned char* p = end; p < w.dynamic_guard; ++p)
        if (*p != 0xff) {
            record_error(w, "a thread wrote past the " + std::to_string(info.dynamic_shared) + " bytes of dynamic "
                            "shared memory the launch gave it (byte " + std::to_string(p - t_dynamic_shared) +
                            ", before the guard page at the next 16-byte boundary; the race-check build names the "
                            "thread and line)");
            return;
        }
}

void run_block(Worker& w, const LaunchInfo& info, const std::vector<std::pair<size_t, size_t>>& static_shared,
               unsigned char* static_base, long long linear_block, double weight) {
    const dim3 g = info.grid, b = info.block;
    t_block_idx = {unsigned(linear_block % g.x), unsigned(linear_block / g.x % g.y), unsigned(linear_block / (g.x * 1ull * g.y))};
    t_block_dim = b;
    t_grid_dim = g;
    // Shared memory is not initialised on the GPU: poison it (every float reads as NaN), static and dynamic,
    // so a kernel that reads before writing gets garbage here too, not zeros or the previous block's data.
    t_dynamic_shared = w.dynamic_guard - (info.dynamic_shared + 15) / 16 * 16;
#if PA_EMU_ASAN
    // ASan reports any access to the bytes past the requested size (the guard page covers the rest); the last
    // block's poisoned bytes are unpoisoned first, for the memset below.
    ASAN_UNPOISON_MEMORY_REGION(w.dynamic_region, w.dynamic_guard - w.dynamic_region);
#endif
    std::memset(t_dynamic_shared, 0xff, w.dynamic_guard - t_dynamic_shared);
#if PA_EMU_ASAN
    ASAN_POISON_MEMORY_REGION(t_dynamic_shared + info.dynamic_shared, w.dynamic_guard - t_dynamic_shared - info.dynamic_shared);
#endif
    if (static_base)
        for (const auto& [offset, bytes] : static_shared) std::memset(static_base + offset, 0xff, bytes);
    w.nthreads = int(b.x * b.y * b.z);
    w.barrier_waiting = 0;
    for (int warp = 0; warp < int(kMaxThreadsPerBlock / 32); ++warp) {
        const int lanes = std::clamp(w.nthreads - warp * 32, 0, 32);
        w.exited[warp] = lanes == 32 ? 0u : ~((1u << lanes) - 1u);
    }
    for (int i = 0; i < w.nthreads; ++i) {
        Fiber& f = w.fibers[i];
        f.idx = {unsigned(i) % b.x, unsigned(i) / b.x % b.y, unsigned(i) / (b.x * b.y)};
        f.linear = i;
        f.state = State::Runnable;
        f.group = nullptr;
        f.async.clear();  // (a failed block may leave copies behind)
        f.async_committed = 0;
#if PA_EMU_RACE
        f.who = race::Who{uint32_t(linear_block), uint32_t(i), 0, {}};
#endif
        start_fiber(w, f, i);
    }
#if PA_EMU_RACE
    race::BlockMemory memory;
    describe_block_memory(w, memory);
    // What no access may touch: the redzone after each __shared__ object (cuda_emu.h), and the bytes between the
    // end of the dynamic shared memory the launch asked for and the guard page (it starts 16-byte aligned).
    for (const auto& [offset, bytes] : shared_redzones())
        if (w.tls_block) memory.forbidden.push_back({w.tls_block + offset, w.tls_block + offset + bytes, false});
    if (t_dynamic_shared + info.dynamic_shared < w.dynamic_guard)
        memory.forbidden.push_back({t_dynamic_shared + info.dynamic_shared, w.dynamic_guard, true});
    std::sort(memory.forbidden.begin(), memory.forbidden.end(),
              [](const race::Forbidden& a, const race::Forbidden& b) { return a.begin < b.begin; });
    race::begin_block(memory);
#endif
#if PA_EMU_PROF
    {
        prof::BlockMemory memory;
        describe_block_memory(w, memory);
        // What kernel code reads that is the runtime's: the built-in variables (in TLS, which otherwise counts as
        // shared memory), each fiber's threadIdx, and the launch's argument tuple and thread body.
        auto ignore = [&](const void* p, size_t bytes) {
            const auto* c = static_cast<const unsigned char*>(p);
            memory.ignored.emplace_back(c, c + bytes);
        };
        ignore(&t_thread_idx, sizeof t_thread_idx);
        ignore(&t_block_idx, sizeof t_block_idx);
        ignore(&t_block_dim, sizeof t_block_dim);
        ignore(&t_grid_dim, sizeof t_grid_dim);
        ignore(&t_dynamic_shared, sizeof t_dynamic_shared);
        ignore(w.fibers.data(), w.fibers.size() * sizeof(Fiber));
        if (info.args) ignore(info.args, info.args_bytes);
        if (info.body) ignore(info.body, info.body_bytes);
        prof::begin_block(memory, w.nthreads, weight);
    }
#else
    (void)weight;
#endif
    for (auto& warp : w.groups)
        for (auto& grp : warp) grp.in_use = false;
    w.error.clear();
    note_progress(w);
    w.livelock.store(false, std::memory_order_relaxed);
    // A fault in a fiber (see on_fault) jumps back here: the block has failed, its fibers are abandoned (the next
    // block starts them afresh), and the launch raises the description as its KernelError.
    if (sigsetjmp(w.fault_return, 1) != 0) {
        leave_fiber_context(w);
        record_error(w, w.fault);
        return;
    }
    for (;;) {
        bool ran = false;
        for (int i = 0; i < w.nthreads; ++i) {
            Fiber& f = w.fibers[i];
            if (f.state != State::Runnable) continue;
            ran = true;
            enter_fiber_context(f);
            // Counted on the way in and out: the watchdog preempts only a fiber it saw running for a whole tick.
            w.resumes.store(w.resumes.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
            w.in_fiber.store(1, std::memory_order_relaxed);
            resume(w, f);
            leave_fiber_context(w);
            w.resumes.store(w.resumes.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
            w.preempt.store(false, std::memory_order_relaxed);  // a request for the fiber that just yielded
            if (w.livelock.load(std::memory_order_relaxed)) {
                w.livelock.store(false, std::memory_order_relaxed);
                if (w.livelock_progress.load(std::memory_order_relaxed) == w.progress.load(std::memory_order_relaxed))
                    record_error(w, livelock_report(w));  // (else: the watchdog's look predates some progress)
            }
            if (!w.canary_intact(i)) {
                // The overflow ran into the stacks below this one: every canary is suspect, so renew them all.
                for (unsigned j = 0; j < kMaxThreadsPerBlock; ++j) w.write_canary(int(j));
                record_error(w, thread_at(f) + " overflowed its " + std::to_string(kStackBytes / 1024) +
                                    " KB emulator stack (large local arrays? deep recursion?)");
            }
            if (!w.error.empty()) return;
        }
        if (!ran) {
            resolve_stall(w);
            if (!w.error.empty()) return;
            bool any_runnable = false;
            for (int i = 0; i < w.nthreads && !any_runnable; ++i) any_runnable = w.fibers[i].state == State::Runnable;
            if (!any_runnable) {  // all done
#if !PA_EMU_ASAN && !PA_EMU_RACE
                check_dynamic_slack(w, info);  // (those two builds report the access itself, with its thread)
#endif
                return;
            }
        }
    }
}

// ---- the pool ---------------------------------------------------------------------------------------------
struct Job {
    const LaunchInfo* info = nullptr;
    const std::function<void()>* body = nullptr;
    const std::vector<std::pair<size_t, size_t>>* static_shared = nullptr;  // (offset, bytes) to poison
    unsigned char* module_base = nullptr;  // the ASan build's static shared memory is at module_base + offset
    long long nblocks = 0;
#if PA_EMU_PROF
    const std::vector<prof::Sample>* sample = nullptr;  // the blocks to run (nblocks of them), or null: all
#endif
    std::atomic<long long> next{0};
    std::atomic<bool> failed{false};
    std::mutex error_mutex;
    std::string error;
};

void work_on(Worker& w, Job& job) {
    w.body = job.body;
    w.info = job.info;
    for (;;) {
        if (job.failed.load(std::memory_order_relaxed)) return;
        long long blk = job.next.fetch_add(1, std::memory_order_relaxed);
        if (blk >= job.nblocks) return;
        double weight = 1.0;
#if PA_EMU_PROF
        if (job.sample) weight = (*job.sample)[size_t(blk)].weight, blk = (*job.sample)[size_t(blk)].block;
#endif
        w.in_block.store(true, std::memory_order_relaxed);
        run_block(w, *job.info, *job.static_shared, PA_EMU_ASAN ? job.module_base : w.tls_block, blk, weight);
        w.in_block.store(false, std::memory_order_relaxed);
#if PA_EMU_PROF
        prof::end_block();
#endif
        if (!w.error.empty()) {
            std::lock_guard<std::mutex> lk(job.error_mutex);
            if (!job.failed.load()) {
                job.error = "block " + fmt_idx(t_block_idx) + ": " + w.error;
                job.failed.store(true);
            }
            return;
        }
    }
}

unsigned char* module_tls_block(size_t* size);

// ---- faults: a guard page, an unmapped address ------------------------------------------------------------------
// A load or store in kernel code that hits a guard page (a stack's, the one after the dynamic shared memory) or any
// unmapped address raises SIGSEGV or SIGBUS in a worker. The handler (on the worker's own signal stack) describes
// it, naming the thread, and jumps back to the scheduler, which fails the block: the launch raises a KernelError
// and the pool goes on (the faulting fiber's stack is abandoned, as after any fault). Anywhere else, host code or
// the runtime, the signal goes to whoever had it before (Python's faulthandler, or the default action). Not in the
// ASan build: ASan's handler reports those, with the access's stack.
struct sigaction g_previous_segv, g_previous_bus;

void describe_fault(Worker& w, int sig, const unsigned char* addr) {
    const Fiber& f = *t_fiber;
    const auto* own = w.stack_base(f.linear);
    const char* what = sig == SIGBUS ? "bus error" : "segmentation fault";
    if (addr >= own - kPage && addr < own)
        std::snprintf(w.fault, sizeof w.fault, "thread (%u,%u,%u) overflowed its %zu KB emulator stack (large local "
                      "arrays? deep recursion?) at address %p: its guard page", f.idx.x, f.idx.y, f.idx.z,
                      kStackBytes / 1024, static_cast<const void*>(addr));
    else if (addr >= w.dynamic_guard && addr < w.dynamic_guard + kPage)
        std::snprintf(w.fault, sizeof w.fault, "thread (%u,%u,%u) accessed address %p, past the %zu bytes of dynamic "
                      "shared memory the launch gave it (%s on the guard page after it)", f.idx.x, f.idx.y, f.idx.z,
                      static_cast<const void*>(addr), w.info ? w.info->dynamic_shared : size_t(0), what);
    else
        std::snprintf(w.fault, sizeof w.fault, "thread (%u,%u,%u): %s at address %p (no buffer of the launch is there: "
                      "an index out of bounds?)", f.idx.x, f.idx.y, f.idx.z, what, static_cast<const void*>(addr));
}

void on_fault(int sig, siginfo_t* info, void* context) {
    Worker* w = t_worker;
    if (w && w->in_fiber.load(std::memory_order_relaxed) && t_fiber) {
        describe_fault(*w, sig, static_cast<const unsigned char*>(info->si_addr));
        siglongjmp(w->fault_return, 1);  // restores the signal mask saved there, this signal unblocked
    }
    const struct sigaction& previous = sig == SIGBUS ? g_previous_bus : g_previous_segv;
    if (previous.sa_flags & SA_SIGINFO) {
        previous.sa_sigaction(sig, info, context);
        return;
    }
    if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    signal(sig, SIG_DFL);  // the default action: the faulting access runs again and ends the process
}

void install_fault_handler() {
#if !PA_EMU_ASAN
    struct sigaction sa = {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_previous_segv);
    sigaction(SIGBUS, &sa, &g_previous_bus);
#endif
}

// Each worker handles its faults on a stack of its own: a fiber's may be the one that overflowed.
void give_worker_a_signal_stack() {
#if !PA_EMU_ASAN
    static constexpr size_t kSignalStack = 64 * 1024;
    stack_t ss = {};
    ss.ss_sp = std::malloc(kSignalStack);  // for the thread's lifetime, which is the process's
    ss.ss_size = kSignalStack;
    if (ss.ss_sp) sigaltstack(&ss, nullptr);
#endif
}

// ---- spin-waits: preemption and the watchdog -------------------------------------------------------------------
// Fibers switch only at barriers, collectives, atomics and __nanosleep, but since Volta a thread may legally
// poll a flag with plain or volatile loads until another thread of its block sets it, which a cooperative
// scheduler would never let happen. So the pool's watchdog thread looks at every worker each kWatchdogTick: one
// whose fiber has run a whole tick without a switch is preempted, and the others get their turn. And a block
// that has made no progress at all (no barrier released, no collective completed, no thread finished) for
// PYALEXNET_EMU_WATCHDOG seconds (default 30, 120 in the checking builds; 0: never) fails with a livelock report
// naming where its running
// threads are.
//
// Preempting: in the default and ASan builds the watchdog sends the worker kPreemptSignal, whose handler runs
// on the fiber's own stack and, if the fiber is in kernel code (not in the runtime, whose state may be half
// updated, nor in another library, which may hold a lock), yields from inside the handler: the interrupted
// registers stay in the signal frame on that stack until the fiber resumes there. In the instrumented builds
// (race checker, counters), whose hooks run at every memory access, the hook yields instead when asked.
constexpr auto kWatchdogTick = std::chrono::milliseconds(20);
constexpr int kPreemptSignal = SIGURG;  // ignored by default: harmless should one ever reach another thread
struct sigaction g_previous_preempt;
uintptr_t g_text_begin = 0, g_text_end = 0;  // this module's code
}  // namespace
std::atomic<bool> g_preempt_asked{false};  // some worker has `preempt` set (a cheap first test for the hooks)
namespace {

void find_module_text() {
    Dl_info self;
    if (!dladdr(reinterpret_cast<void*>(&find_module_text), &self)) return;
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* base) {
            if (reinterpret_cast<void*>(info->dlpi_addr) != base) return 0;
            for (int i = 0; i < info->dlpi_phnum; ++i) {
                const auto& ph = info->dlpi_phdr[i];
                if (ph.p_type != PT_LOAD || !(ph.p_flags & PF_X)) continue;
                g_text_begin = info->dlpi_addr + ph.p_vaddr;
                g_text_end = g_text_begin + ph.p_memsz;
            }
            return 1;
        },
        self.dli_fbase);
}

uintptr_t interrupted_pc(const void* context) {
    const auto* uc = static_cast<const ucontext_t*>(context);
#if defined(__x86_64__)
    return uintptr_t(uc->uc_mcontext.gregs[REG_RIP]);
#elif defined(__aarch64__)
    return uintptr_t(uc->uc_mcontext.pc);
#else
    (void)uc;
    return 0;  // unknown: never preempted (a spin there never ends: use __nanosleep or an atomic)
#endif
}

// Whether fiber f, interrupted at pc with the handler's frame at sp, may be switched away from here.
bool preemptible(Worker& w, const Fiber& f, uintptr_t pc, const unsigned char* sp) {
    const unsigned char* stack = w.stack_base(f.linear);
    return f.runtime_depth == 0 && sp > stack && sp < stack + kStackBytes && pc >= g_text_begin && pc < g_text_end;
}

void preempt(Fiber& f, uintptr_t pc) {
    f.preempted_pc = pc;
#if PA_EMU_RACE
    const race::Pause runtime_code;
#endif
    const RuntimeCode runtime(f);
    f.yielded = Yielded::Preempted;
    block_until_runnable(f);
}

}  // namespace

// The instrumented builds' preemption point, at a hook's entry (kernel code, about to access memory).
void take_preemption(uintptr_t pc) {
    Worker* w = t_worker;
    if (!w || !w->preempt.exchange(false, std::memory_order_relaxed)) return;  // another worker's request
    g_preempt_asked.store(false, std::memory_order_relaxed);  // (the watchdog asks again while others need it)
    if (w->in_fiber.load(std::memory_order_relaxed) && t_fiber && t_fiber->runtime_depth == 0) preempt(*t_fiber, pc);
}

namespace {

void on_preempt(int sig, siginfo_t* info, void* context) {
    Worker* w = t_worker;
    if (!w || !w->in_fiber.load(std::memory_order_relaxed) || !t_fiber) {
        const struct sigaction& previous = g_previous_preempt;
        if (previous.sa_flags & SA_SIGINFO)
            previous.sa_sigaction(sig, info, context);
        else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN)
            previous.sa_handler(sig);
        return;
    }
#if PA_EMU_RACE || PA_EMU_PROF
    (void)info, (void)context;  // the watchdog asks these builds through w->preempt, not by signal
#else
    const int saved_errno = errno;
    Fiber& f = *t_fiber;
    const uintptr_t pc = interrupted_pc(context);
    if (preemptible(*w, f, pc, static_cast<const unsigned char*>(__builtin_frame_address(0)))) {
#if defined(__x86_64__)
        // The handler starts with the default floating-point control state; the fibers that run before this
        // one's sigreturn must get the thread's own (rounding, flush-to-zero), as after any other switch.
        if (const auto* fp = static_cast<const ucontext_t*>(context)->uc_mcontext.fpregs) {
            unsigned mxcsr = fp->mxcsr;
            unsigned short cw = fp->cwd;
            asm volatile("ldmxcsr %0\n\tfldcw %1" : : "m"(mxcsr), "m"(cw));
        }
#endif
        preempt(f, pc);
    }
    errno = saved_errno;
#endif
}

void install_preempt_handler() {
    find_module_text();
    struct sigaction sa = {};
    sa.sa_sigaction = on_preempt;
    // On the interrupted stack (no SA_ONSTACK): the fiber's, which it may then leave for a while. SA_NODEFER: the
    // signal stays unblocked meanwhile, so the fibers that run next can be preempted too.
    sa.sa_flags = SA_SIGINFO | SA_RESTART | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(kPreemptSignal, &sa, &g_previous_preempt);
}

double configured_watchdog_seconds() {
    const char* s = std::getenv("PYALEXNET_EMU_WATCHDOG");
    if (!s) return PA_EMU_ASAN || PA_EMU_RACE || PA_EMU_PROF ? 120.0 : 30.0;  // the checking builds run 10-100x slower
    char* end = nullptr;
    const double v = std::strtod(s, &end);
    if (end == s || *end != '\0' || !(v >= 0.0) || v > 1e6)
        throw pa::KernelError("PYALEXNET_EMU_WATCHDOG must be a number of seconds in [0, 1e6] (0: off), got '" +
                              std::string(s) + "'");
    return v;
}

// Created once and never destroyed: destroying a condition variable that workers wait on at exit hangs.
class Pool {
public:
    explicit Pool(int n, double watchdog_seconds) : size_(n), watchdog_seconds_(watchdog_seconds) {
        install_fault_handler();
        install_preempt_handler();
        for (int i = 0; i < n; ++i) std::thread([this] { loop(); }).detach();
        std::thread([this] { watchdog(); }).detach();
    }
    int size() const { return size_; }
    double watchdog_seconds() const { return watchdog_seconds_; }

    void run(Job& job) {
        std::lock_guard<std::mutex> serial(launch_mutex_);  // one launch at a time, as on one stream
        std::unique_lock<std::mutex> lk(m_);
        job_ = &job;
        busy_ = size_;
        ++generation_;
        wake_.notify_all();
        done_.wait(lk, [this] { return busy_ == 0; });
        job_ = nullptr;
    }

private:
    void loop() {
        give_worker_a_signal_stack();
        sigset_t preempt_signal;  // a worker inherits its creator's signal mask: make sure the watchdog reaches it
        sigemptyset(&preempt_signal);
        sigaddset(&preempt_signal, kPreemptSignal);
        pthread_sigmask(SIG_UNBLOCK, &preempt_signal, nullptr);
        Worker w;
        t_worker = &w;  // also makes sure this thread's TLS block for the module exists before we look for it
        w.tls_block = module_tls_block(&w.tls_size);
        w.thread = pthread_self();
        {
            std::lock_guard<std::mutex> lk(workers_mutex_);
            workers_.push_back(&w);  // workers live as long as the process: the watchdog may read them any time
        }
        unsigned long long seen = 0;
        for (;;) {
            Job* job;
            {
                std::unique_lock<std::mutex> lk(m_);
                wake_.wait(lk, [&] { return generation_ != seen; });
                seen = generation_;
                job = job_;
            }
            work_on(w, *job);
            std::lock_guard<std::mutex> lk(m_);
            if (--busy_ == 0) done_.notify_all();
        }
    }

    // Every tick: preempt a fiber that has run the whole tick, and flag a block without progress for the period.
    void watchdog() {
        struct Seen {
            unsigned resumes = 0, progress = 0;
            int stale_ticks = 0;
        };
        std::vector<Seen> seen;
        const double tick = std::chrono::duration<double>(kWatchdogTick).count();
        for (;;) {
            std::this_thread::sleep_for(kWatchdogTick);
            std::lock_guard<std::mutex> lk(workers_mutex_);
            seen.resize(workers_.size());
            for (size_t i = 0; i < workers_.size(); ++i) {
                Worker& w = *workers_[i];
                Seen& was = seen[i];
                const unsigned resumes = w.resumes.load(std::memory_order_relaxed);
                const unsigned progress = w.progress.load(std::memory_order_relaxed);
                if (w.in_fiber.load(std::memory_order_relaxed) && resumes == was.resumes) {
#if PA_EMU_RACE || PA_EMU_PROF
                    w.preempt.store(true, std::memory_order_relaxed);
                    g_preempt_asked.store(true, std::memory_order_relaxed);
#else
                    pthread_kill(w.thread, kPreemptSignal);
#endif
                }
                const bool in_block = w.in_block.load(std::memory_order_relaxed);
                was.stale_ticks = in_block && progress == was.progress ? was.stale_ticks + 1 : 0;
                if (watchdog_seconds_ > 0 && was.stale_ticks * tick >= watchdog_seconds_) {
                    w.livelock_progress.store(progress, std::memory_order_relaxed);
                    w.livelock.store(true, std::memory_order_relaxed);
                    was.stale_ticks = 0;
                }
                was.resumes = resumes;
                was.progress = progress;
            }
        }
    }

    int size_;
    double watchdog_seconds_;
    std::mutex workers_mutex_;
    std::vector<Worker*> workers_;
    std::mutex launch_mutex_, m_;
    std::condition_variable wake_, done_;
    Job* job_ = nullptr;
    int busy_ = 0;
    unsigned long long generation_ = 0;
};

int configured_workers() {
    if (const char* s = std::getenv("PYALEXNET_EMU_WORKERS")) {
        char* end = nullptr;
        const long v = std::strtol(s, &end, 10);
        // The ASan build's static shared memory is one plain `static` per kernel, and the race checker's shadow
        // memory has no locks: one block at a time.
        if (end != s && *end == '\0' && v >= 1 && v <= 1024) return PA_EMU_ASAN || PA_EMU_RACE ? 1 : int(v);
        throw pa::KernelError("PYALEXNET_EMU_WORKERS must be an integer in [1, 1024], got '" + std::string(s) + "'");
    }
    if (PA_EMU_ASAN || PA_EMU_RACE) return 1;
    // The CPUs this process may run on (a container's limit), not every CPU of the machine.
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
    const unsigned hw = std::thread::hardware_concurrency();
    return hw ? int(hw) : 1;
}

// A forked child inherits the pool object but none of its threads: it starts a pool of its own (the
// parent's is abandoned, its mutexes possibly held by threads that do not exist in the child).
Pool* g_pool = nullptr;
std::once_flag g_atfork_once;

#if PA_EMU_ASAN
// A sanitizer report names the source line; this names the emulated thread it happened on.
void report_emulated_thread() {
    const Worker* w = t_worker;
    if (!w || !w->info || !t_fiber) return;
    std::fprintf(stderr, "pyalexnet emulator: the fault above is in kernel %s (launched at %s:%d), block %s, thread %s\n",
                 w->info->name, w->info->file, w->info->line, fmt_idx(t_block_idx).c_str(), fmt_idx(t_fiber->idx).c_str());
}
#endif

Pool& pool() {
    std::call_once(g_atfork_once, [] {
        pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; });
#if PA_EMU_ASAN
        __sanitizer_set_death_callback(report_emulated_thread);
        // GCC's UBSan runtime is a library of its own, with its own death callback: register there too.
        if (void* ubsan = dlopen("libubsan.so.1", RTLD_NOW | RTLD_NOLOAD)) {
            using SetCallback = void (*)(void (*)());
            if (auto set = reinterpret_cast<SetCallback>(dlsym(ubsan, "__sanitizer_set_death_callback")))
                set(report_emulated_thread);
        }
#endif
    });
    static std::mutex* creating = new std::mutex;
    std::lock_guard<std::mutex> lk(*creating);
    if (!g_pool) g_pool = new Pool(configured_workers(), configured_watchdog_seconds());
    return *g_pool;
}

std::mutex& optin_mutex() {
    static std::mutex* m = new std::mutex;
    return *m;
}
std::map<const void*, size_t>& optins() {
    static auto* m = new std::map<const void*, size_t>;
    return *m;
}

// ---- static shared memory, measured from the symbol table ----------------------------------------------------
// `__shared__` variables are function-local `static thread_local` objects here, so the compiler names each
// one after its enclosing function: kernel `_ZN2pa6kernelEPf` owns `_ZZN2pa6kernelEPfE4tile`. Reading the
// module's own ELF symbol table gives each kernel's static shared bytes, which we hold to the GPU's 48 KB.
// A stripped module has no symbol table: the check is then skipped (-1), and ptxas still enforces the limit
// on the CUDA build.
struct SymbolTable {
    std::map<uintptr_t, std::string> functions;  // offset in the module -> mangled name
    // Function-local statics: mangled name -> (TLS offset or, for a plain static, address in the module; size).
    std::map<std::string, std::pair<size_t, size_t>> tls_objects;
    std::vector<std::pair<size_t, size_t>> shared_redzones;  // (TLS offset, size): the race-check build's
    bool loaded = false;
};

SymbolTable read_symbols(const char* path) {
    SymbolTable table;
    std::ifstream f(path, std::ios::binary);
    const std::string image((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (image.size() < sizeof(Elf64_Ehdr) || image.compare(0, 4, ELFMAG) != 0) return table;
    const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(image.data());
    if (eh->e_shoff == 0 || eh->e_shoff + size_t(eh->e_shnum) * sizeof(Elf64_Shdr) > image.size()) return table;
    const auto* sections = reinterpret_cast<const Elf64_Shdr*>(image.data() + eh->e_shoff);
    for (int i = 0; i < eh->e_shnum; ++i) {
        if (sections[i].sh_type != SHT_SYMTAB || sections[i].sh_link >= eh->e_shnum) continue;
        const Elf64_Shdr& strtab = sections[sections[i].sh_link];
        if (sections[i].sh_offset + sections[i].sh_size > image.size() || strtab.sh_offset + strtab.sh_size > image.size())
            return table;
        const auto* syms = reinterpret_cast<const Elf64_Sym*>(image.data() + sections[i].sh_offset);
        const size_t count = sections[i].sh_size / sizeof(Elf64_Sym);
        for (size_t j = 0; j < count; ++j) {
            if (syms[j].st_name >= strtab.sh_size) continue;
            const char* name = image.data() + strtab.sh_offset + syms[j].st_name;
            const int type = ELF64_ST_TYPE(syms[j].st_info);
            if (type == STT_FUNC && syms[j].st_value) table.functions[syms[j].st_value] = name;
            const bool local_static = std::strncmp(name, "_ZZ", 3) == 0;
            if (type == STT_TLS || (PA_EMU_ASAN && type == STT_OBJECT && local_static))
                table.tls_objects[name] = {syms[j].st_value, syms[j].st_size};
            if (type == STT_TLS && std::strstr(name, "pa_shared_redzone_"))
                table.shared_redzones.emplace_back(syms[j].st_value, syms[j].st_size);
        }
        table.loaded = true;
    }
    return table;
}

struct StaticShared {
    long long bytes = -1;                              // -1: unknown (no symbol table)
    std::vector<std::pair<size_t, size_t>> objects;    // (TLS offset, size) of each __shared__ variable
    unsigned char* module_base = nullptr;              // where plain statics (the ASan build) are
    std::string symbol;                                // the kernel's mangled name, empty if unknown
};

// A module's symbol table, read once per file and cached (map nodes never move, so the reference stays valid).
const SymbolTable& module_symbols(const char* path) {
    static std::mutex* m = new std::mutex;
    static auto* tables = new std::map<std::string, SymbolTable>;
    std::lock_guard<std::mutex> lk(*m);
    auto t = tables->find(path);
    if (t == tables->end()) t = tables->emplace(path, read_symbols(path)).first;
    return t->second;
}

// The kernel's static shared memory, measured once and cached (map nodes never move, so the reference stays valid).
const StaticShared& static_shared(const void* kernel) {
    static std::mutex* m = new std::mutex;
    static auto* cache = new std::map<const void*, StaticShared>;
    std::lock_guard<std::mutex> lk(*m);
    if (auto it = cache->find(kernel); it != cache->end()) return it->second;
    StaticShared found;
    Dl_info info;
    if (dladdr(kernel, &info) && info.dli_fname) {
        const SymbolTable& table = module_symbols(info.dli_fname);
        const uintptr_t offset = reinterpret_cast<uintptr_t>(kernel) - reinterpret_cast<uintptr_t>(info.dli_fbase);
        auto fn = table.functions.find(offset);
        found.module_base = static_cast<unsigned char*>(info.dli_fbase);
        if (fn != table.functions.end()) found.symbol = fn->second;
        if (table.loaded && fn != table.functions.end() && fn->second.rfind("_Z", 0) == 0) {
            const std::string prefix = "_ZZ" + fn->second.substr(2) + "E";
            found.bytes = 0;
            for (auto it = table.tls_objects.lower_bound(prefix);
                 it != table.tls_objects.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
                if (it->first.find("pa_shared_redzone_") != std::string::npos) continue;  // the race checker's
                found.bytes += (long long)it->second.second;
                found.objects.push_back(it->second);
            }
        }
    }
    return cache->emplace(kernel, std::move(found)).first->second;
}

// ---- __launch_bounds__ ----------------------------------------------------------------------------------------
// The bound is the number of NOP instructions the kernel's code begins with (cuda_emu.h explains why): after the
// indirect-branch landing pad, if the compiler put one first. 0: the kernel declares no bound.
std::mutex& bounds_seen_mutex() {
    static auto* m = new std::mutex;
    return *m;
}
std::map<const char*, int>& bounds_seen() {  // keyed by the launch's name literal: no allocation per launch
    static auto* m = new std::map<const char*, int>;
    return *m;
}

int launch_bound(const void* kernel) {
    const auto* code = static_cast<const unsigned char*>(kernel);
    int nops = 0;
#if defined(__x86_64__)
    if (std::memcmp(code, "\xf3\x0f\x1e\xfa", 4) == 0) code += 4;  // endbr64 (-fcf-protection)
    while (nops <= int(kMaxThreadsPerBlock) && code[nops] == 0x90) ++nops;
#elif defined(__aarch64__)
    auto word = [&](int i) {
        uint32_t w;
        std::memcpy(&w, code + 4 * i, 4);
        return w;
    };
    int first = (word(0) & 0xffffff3fu) == 0xd503241fu ? 1 : 0;  // bti c/j/jc (-mbranch-protection)
    while (nops <= int(kMaxThreadsPerBlock) && word(first + nops) == 0xd503201fu) ++nops;
#else
    (void)code;
#endif
    return nops;
}

// The race-check build's redzones of every __shared__ object in this module (TLS offset, size), read once.
[[maybe_unused]] const std::vector<std::pair<size_t, size_t>>& shared_redzones() {
    static const auto* redzones = []() -> const std::vector<std::pair<size_t, size_t>>* {
        Dl_info self;
        if (!dladdr(reinterpret_cast<void*>(&module_tls_block), &self) || !self.dli_fname)
            return new std::vector<std::pair<size_t, size_t>>;
        return &module_symbols(self.dli_fname).shared_redzones;
    }();
    return *redzones;
}

// This thread's instance of our module's TLS segment, where the static __shared__ variables live, and its size.
unsigned char* module_tls_block(size_t* size) {
    *size = 0;
    Dl_info self;
    if (!dladdr(reinterpret_cast<void*>(&module_tls_block), &self)) return nullptr;
    struct Search {
        void* base;
        unsigned char* tls;
        size_t size;
    } search{self.dli_fbase, nullptr, 0};
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* data) {
            auto* want = static_cast<Search*>(data);
            if (reinterpret_cast<void*>(info->dlpi_addr) != want->base) return 0;
            want->tls = static_cast<unsigned char*>(info->dlpi_tls_data);
            for (int i = 0; i < info->dlpi_phnum; ++i)
                if (info->dlpi_phdr[i].p_type == PT_TLS) want->size = info->dlpi_phdr[i].p_memsz;
            return 1;
        },
        &search);
    *size = search.tls ? search.size : 0;
    return search.tls;
}

}  // namespace

int worker_count() { return pool().size(); }

namespace {
std::atomic<int> g_emulated_sms{132};
}

int emulated_sm_count() { return g_emulated_sms.load(); }

void set_emulated_sm_count(int n) {
    if (n < 1) throw std::invalid_argument("set_emulated_sm_count: n = " + std::to_string(n) + ", expected >= 1");
    g_emulated_sms.store(n);
}

std::map<std::string, int> launch_bounds_seen() {
    std::lock_guard<std::mutex> lk(bounds_seen_mutex());
    std::map<std::string, int> out;
    for (const auto& [name, bound] : bounds_seen()) out[name] = bound;
    return out;
}

namespace {
double watchdog_seconds() { return pool().watchdog_seconds(); }

std::string shell_quote(const std::string& s) {
    std::string out = "'";
    for (char ch : s) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
    return out + "'";
}
}  // namespace

// file:line of an instruction (an offset in this module), from the module's debug information through addr2line:
// the innermost inlined frame that is kernel source (an atomic's access happens inside libstdc++ and the
// emulator's header, but the line worth reading is the kernel's). Falls back to module+offset without addr2line.
std::string source_line(uintptr_t offset) {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&source_line), &info) || !info.dli_fname) return "an unknown line";
    char hex[32];
    std::snprintf(hex, sizeof hex, "0x%zx", size_t(offset));
    const std::string fallback = std::string(info.dli_fname) + "+" + hex;
    const std::string cmd = "addr2line -i -e " + shell_quote(info.dli_fname) + " " + hex + " 2>/dev/null";
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
        // Paths relative to the repository, as the other emulator reports give them. The emulator's own frames
        // and the instruction wrappers (async_copy.cuh) are not the kernel's line: the call site is.
        const auto k = s.rfind("/kernels/");
        if (kernel.empty() && k != std::string::npos && s.find("/kernels/emu/") == std::string::npos &&
            s.find("/kernels/async_copy.cuh") == std::string::npos)
            kernel = s.substr(k + 1);
    }
    pclose(f);
    return !kernel.empty() ? kernel : !first.empty() ? first : fallback;
}

namespace {
std::string describe_code_address(uintptr_t pc) {
    Dl_info info;
    if (!pc || !dladdr(reinterpret_cast<void*>(pc), &info)) return "an unknown address";
    return source_line(pc - reinterpret_cast<uintptr_t>(info.dli_fbase));
}
}  // namespace
const char* fiber_switch_name() {
#if defined(PA_EMU_OWN_SWITCH) && defined(__x86_64__)
    return "own (x86-64)";
#elif defined(PA_EMU_OWN_SWITCH)
    return "own (aarch64)";
#else
    return "ucontext";
#endif
}

long long kernel_static_shared_bytes(const void* kernel) { return static_shared(kernel).bytes; }

void set_max_dynamic_shared(const void* kernel, size_t bytes) {
    if (bytes > kMaxDynamicShared)
        throw pa::KernelError("set_max_dynamic_shared: " + std::to_string(bytes) + " bytes exceeds the device's " +
                              std::to_string(kMaxDynamicShared) + " bytes of shared memory per block");
    std::lock_guard<std::mutex> lk(optin_mutex());
    optins()[kernel] = bytes;
}

// ---- what kernel code calls ----------------------------------------------------------------------------------
void syncthreads(const char* file, int line) { syncthreads_count(file, line, 0); }

// The count is the worker's, set when the barrier releases: it stays valid until every thread has read it,
// because the next release needs every thread at the next barrier.
//
// Threads arrive one by one; each is checked against the first to arrive (one barrier for the whole block), and
// the last to arrive releases them all. A thread that exited instead never arrives: the block stalls, and
// resolve_stall reports it.
int syncthreads_count(const char* file, int line, int predicate) {
#if PA_EMU_RACE
    const race::Pause runtime_code;
#endif
    Worker& w = *t_worker;
    Fiber& f = *t_fiber;
    const RuntimeCode runtime(f);
    f.file = file;
    f.line = line;
    f.yielded = Yielded::No;
    if (w.barrier_waiting == 0) {
        w.barrier_first = &f;
        w.barrier_predicates = 0;
    } else if (!same_site(file, line, w.barrier_first->file, w.barrier_first->line)) {
        const Fiber& first = *w.barrier_first;
        record_error(w, "divergent __syncthreads(): " + thread_at(first) + " waits at " + site(first.file, first.line) +
                            " but " + thread_at(f) + " waits at " + site(file, line));
        f.state = State::AtBarrier;
        block_until_runnable(f);  // a failed block is never resumed
    }
    w.barrier_predicates += predicate != 0;
    if (++w.barrier_waiting < w.nthreads) {
        f.state = State::AtBarrier;
        block_until_runnable(f);
        return w.barrier_count;
    }
    w.barrier_waiting = 0;
    w.barrier_count = w.barrier_predicates;
    note_progress(w);
    for (int i = 0; i < w.nthreads; ++i) {
        w.fibers[i].state = State::Runnable;
#if PA_EMU_RACE
        ++w.fibers[i].who.epoch;  // everything before the barrier happened before everything after it
#endif
    }
#if PA_EMU_PROF
    prof::barrier();
#endif
    // Yield all the same, so that the threads resume past the barrier in order, the first one first, as they
    // always have here (a racy kernel's results and reports do not depend on which thread arrived last).
    block_until_runnable(f);
    return w.barrier_count;
}

unsigned active_mask() { return ~t_worker->exited[t_fiber->linear / 32]; }

namespace {
// Gives the other threads a turn: this one stays Runnable, and the scheduler comes back to it after them.
void yield_turn(Fiber& f, Yielded why) {
#if PA_EMU_RACE
    const race::Pause runtime_code;
#endif
    const RuntimeCode runtime(f);
    f.yielded = why;
    block_until_runnable(f);
}
}  // namespace

void nanosleep_yield(const char* file, int line) {
    Fiber& f = *t_fiber;
    f.file = file;
    f.line = line;
    yield_turn(f, Yielded::Nanosleep);
}

__thread unsigned t_atomics = 0;
void atomic_poll() {
    if (++t_atomics % 64 == 0 && t_fiber) yield_turn(*t_fiber, Yielded::Atomic);
}

void device_assert_failed(const char* expression, const char* file, int line) {
    set_depth(*t_fiber, t_fiber->runtime_depth + 1);  // never lowered: the thread ends
    throw pa::KernelError("assertion failed at " + site(file, line) + ", " + thread_at(*t_fiber) + ": " + expression);
}

namespace {
// Whether [p, p + bytes) lies in the running block's shared memory (its dynamic shared memory, or the TLS block
// that holds the __shared__ objects; in the ASan build those are plain statics, so only the dynamic part is known).
bool in_block_shared(const Worker& w, const void* p, size_t bytes) {
    const auto* c = static_cast<const unsigned char*>(p);
    if (c >= t_dynamic_shared && c + bytes <= w.dynamic_guard) return true;
    return w.tls_block && c >= w.tls_block && c + bytes <= w.tls_block + w.tls_size;
}

// Makes the copies of every group numbered below `before_group`, in issue order, and forgets them.
void land_async_copies(Fiber& f, unsigned before_group) {
    size_t kept = 0;
    for (size_t i = 0; i < f.async.size(); ++i) {
        const AsyncCopy& c = f.async[i];
        if (c.group >= before_group) {
            f.async[kept++] = c;
            continue;
        }
#if PA_EMU_RACE
        race::async_landed(c.dst, size_t(c.bytes), c.pc);
#endif
        std::memcpy(c.dst, c.data, size_t(c.bytes));
    }
    f.async.resize(kept);
}
}  // namespace

void async_copy(void* dst, const void* src, int bytes, int src_bytes, const char* file, int line) {
    const auto pc = reinterpret_cast<uintptr_t>(__builtin_return_address(0));
    Worker& w = *t_worker;
    Fiber& f = *t_fiber;
    auto fail = [&](const std::string& why) {
        throw pa::KernelError("cp.async at " + site(file, line) + ", " + thread_at(f) + ": " + why);
    };
    if (bytes != 4 && bytes != 8 && bytes != 16)
        fail("copies 4, 8 or 16 bytes, not " + std::to_string(bytes));
    if (src_bytes < 0 || src_bytes > bytes)
        fail("reads " + std::to_string(src_bytes) + " source bytes of a " + std::to_string(bytes) + "-byte copy");
    char where[64];
    if (reinterpret_cast<uintptr_t>(dst) % unsigned(bytes)) {
        std::snprintf(where, sizeof where, "%p", dst);
        fail("misaligned shared destination " + std::string(where) + " for a " + std::to_string(bytes) + "-byte copy");
    }
    if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % unsigned(bytes)) {
        std::snprintf(where, sizeof where, "%p", src);
        fail("misaligned global source " + std::string(where) + " for a " + std::to_string(bytes) + "-byte copy");
    }
#if !PA_EMU_ASAN
    if (!in_block_shared(w, dst, size_t(bytes))) fail("the destination is not the block's shared memory");
#endif
    if (src_bytes > 0 && in_block_shared(w, src, size_t(src_bytes)))
        fail("the source is shared memory (cp.async copies global to shared)");
#if PA_EMU_RACE
    race::async_issued(dst, size_t(bytes), src, size_t(src_bytes), pc);
#endif
#if PA_EMU_PROF
    prof::async_copy_access(src, size_t(src_bytes), dst, size_t(bytes), pc);
#endif
    AsyncCopy c{static_cast<unsigned char*>(dst), {}, bytes, f.async_committed, pc};
    if (src_bytes > 0) std::memcpy(c.data, src, size_t(src_bytes));
    std::memset(c.data + src_bytes, 0, size_t(bytes - src_bytes));
    std::memset(dst, 0xff, size_t(bytes));  // until the group is waited for, the destination is undefined
    f.async.push_back(c);
}

void async_copy_commit() { ++t_fiber->async_committed; }

void async_copy_wait(int pending) {
    Fiber& f = *t_fiber;
    const unsigned keep = unsigned(std::max(pending, 0));
    land_async_copies(f, f.async_committed > keep ? f.async_committed - keep : 0u);
}

namespace {

[[noreturn]] void collective_error(const Fiber& f, Collective kind, const char* file, int line, const std::string& what) {
    throw pa::KernelError(std::string(collective_name(kind)) + " at " + site(file, line) + ", " + thread_at(f) +
                          " (lane " + std::to_string(f.linear % 32) + "): " + what);
}

// The lane each participant reads, by CUDA's rules for `width`; -1 for "its own value". Like shfl.sync, only
// the low 5 bits of srcLane / delta / laneMask count.
int source_lane(Collective kind, int lane, int arg, int width) {
    arg &= 31;
    const int segment = lane & ~(width - 1);
    switch (kind) {
        case Collective::ShflIdx: return segment + (arg & (width - 1));
        case Collective::ShflUp: return (lane - segment) >= arg ? lane - arg : -1;
        case Collective::ShflDown: return (lane - segment) + arg < width ? lane + arg : -1;
        case Collective::ShflXor: {
            const int src = lane ^ arg;
            return src < segment + width ? src : -1;
        }
        default: return -1;
    }
}

// Every lane of the mask has arrived or exited: compute each arrived lane's result and wake it.
void complete(Worker& w, Group& g, int warp) {
    note_progress(w);
    g.complete = true;
    g.readers = __builtin_popcount(g.arrived);
    unsigned ballot = 0;
    for (int lane = 0; lane < 32; ++lane)
        if ((g.arrived >> lane & 1u) && g.value[lane]) ballot |= 1u << lane;
    // The reductions and the all-match, over the lanes that arrived (the exited ones of the mask do not count).
    bool all_match = true;
    uint32_t r_add = 0, r_and = ~0u, r_or = 0, r_xor = 0;
    uint32_t r_umin = ~0u, r_umax = 0;
    int32_t r_smin = INT32_MAX, r_smax = INT32_MIN;
    int first = -1;
    for (int lane = 0; lane < 32; ++lane) {
        if (!(g.arrived >> lane & 1u)) continue;
        if (first < 0) first = lane;
        all_match = all_match && g.value[lane] == g.value[first];
        const uint32_t v = uint32_t(g.value[lane]);
        r_add += v, r_and &= v, r_or |= v, r_xor ^= v;
        r_umin = std::min(r_umin, v), r_umax = std::max(r_umax, v);
        r_smin = std::min(r_smin, int32_t(v)), r_smax = std::max(r_smax, int32_t(v));
    }
    const bool is_signed = first >= 0 && g.arg[first] != 0;
    for (int lane = 0; lane < 32; ++lane) {
        if (!(g.arrived >> lane & 1u)) continue;
        switch (g.kind) {
            case Collective::SyncWarp: g.out[lane] = 0; break;
            case Collective::MatchAny: {
                unsigned same = 0;
                for (int other = 0; other < 32; ++other)
                    if ((g.arrived >> other & 1u) && g.value[other] == g.value[lane]) same |= 1u << other;
                g.out[lane] = same;
                break;
            }
            case Collective::MatchAll: g.out[lane] = all_match ? g.arrived : 0u; break;
            case Collective::ReduceAdd: g.out[lane] = r_add; break;
            case Collective::ReduceMin: g.out[lane] = is_signed ? uint32_t(r_smin) : r_umin; break;
            case Collective::ReduceMax: g.out[lane] = is_signed ? uint32_t(r_smax) : r_umax; break;
            case Collective::ReduceAnd: g.out[lane] = r_and; break;
            case Collective::ReduceOr: g.out[lane] = r_or; break;
            case Collective::ReduceXor: g.out[lane] = r_xor; break;
            case Collective::Ballot: g.out[lane] = ballot; break;
            case Collective::Any: g.out[lane] = ballot != 0; break;
            case Collective::All: g.out[lane] = ballot == g.arrived; break;
            default: {
                // A lane outside the mask, or one that has exited (or does not exist), is legal to name: the value
                // is undefined on the GPU. Here it is all bits set (a NaN, or -1), so a result that is used shows.
                const int src = source_lane(g.kind, lane, g.arg[lane], g.width);
                const bool undefined = src >= 0 && (!(g.mask >> src & 1u) || !(g.arrived >> src & 1u));
                g.out[lane] = undefined ? ~uint64_t(0) : src >= 0 ? g.value[src] : g.value[lane];
            }
        }
    }
#if PA_EMU_RACE
    // The participants synchronise: each advances its own clock component, then all take the element-wise
    // maximum of their vector clocks.
    uint32_t joined[32] = {};
    for (int lane = 0; lane < 32; ++lane) {
        if (!(g.arrived >> lane & 1u)) continue;
        race::Who& who = w.fibers[warp * 32 + lane].who;
        ++who.vc[lane];
        for (int j = 0; j < 32; ++j) joined[j] = std::max(joined[j], who.vc[j]);
    }
    for (int lane = 0; lane < 32; ++lane)
        if (g.arrived >> lane & 1u) std::copy(joined, joined + 32, w.fibers[warp * 32 + lane].who.vc);
#endif
    for (int lane = 0; lane < 32; ++lane) {
        Fiber& f = w.fibers[warp * 32 + lane];
        if ((g.arrived >> lane & 1u) && f.state == State::InCollective && f.group == &g) f.state = State::Runnable;
    }
#if PA_EMU_PROF
    if ((g.arrived | w.exited[warp]) == ~0u) prof::warp_converged(warp);
#endif
}

bool ready(const Group& g, unsigned exited) { return (g.mask & ~(g.arrived | exited)) == 0; }

// A lane that exits no longer holds back the collectives of its warp (shfl.sync and bar.warp.sync wait only
// for non-exited lanes): complete those it was the last one missing from.
void lane_exited(Worker& w, Fiber& f) {
    const int lane = f.linear % 32, warp = f.linear / 32;
    w.exited[warp] |= 1u << lane;
#if PA_EMU_PROF
    prof::lane_exited(f.linear);
#endif
    for (Group& g : w.groups[warp])
        if (g.in_use && !g.complete && (g.mask >> lane & 1u) && ready(g, w.exited[warp])) complete(w, g, warp);
}

}  // namespace

uint64_t warp_collective(Collective kind, const char* file, int line, unsigned mask, uint64_t value, int arg, int width) {
#if PA_EMU_RACE
    const race::Pause runtime_code;
#endif
    Worker& w = *t_worker;
    Fiber& f = *t_fiber;
    const RuntimeCode runtime(f);
    f.yielded = Yielded::No;
    const int lane = f.linear % 32, warp = f.linear / 32;
    if (width < 1 || width > 32 || (width & (width - 1)))
        collective_error(f, kind, file, line, "width " + std::to_string(width) + " is not a power of two in [1, 32]");
    if (!(mask >> lane & 1u))
        collective_error(f, kind, file, line, "the mask " + fmt_hex(mask) + " does not include the calling lane");

    std::vector<Group>& groups = w.groups[warp];
    Group* g = nullptr;
    for (Group& cand : groups) {
        if (!cand.in_use || cand.complete || !(cand.mask & mask)) continue;
        if (cand.mask != mask)
            collective_error(f, kind, file, line,
                             "called with mask " + fmt_hex(mask) + " while lanes " + fmt_hex(cand.arrived) + " wait in " +
                                 collective_name(cand.kind) + " at " + site(cand.file, cand.line) + " with mask " +
                                 fmt_hex(cand.mask));
        if (cand.kind != kind || (kind != Collective::SyncWarp && !same_site(cand.file, cand.line, file, line)))
            collective_error(f, kind, file, line,
                             "divergent warp collective: lanes " + fmt_hex(cand.arrived) + " of the same mask wait in " +
                                 collective_name(cand.kind) + " at " + site(cand.file, cand.line));
        if (cand.arrived >> lane & 1u)
            collective_error(f, kind, file, line, "lane arrived twice at one collective");
        g = &cand;
        break;
    }
    if (!g) {
        for (Group& cand : groups)
            if (!cand.in_use) {
                g = &cand;
                break;
            }
        if (!g) g = &groups.emplace_back();
        g->in_use = true;
        g->complete = false;
        g->kind = kind;
        g->mask = mask;
        g->arrived = 0;
        g->file = file;
        g->line = line;
        g->width = width;
    }
    if (g->width != width)
        collective_error(f, kind, file, line, "lanes disagree on the width (" + std::to_string(width) + " vs " +
                                                  std::to_string(g->width) + ")");
    g->value[lane] = value;
    g->arg[lane] = arg;
    g->arrived |= 1u << lane;
    if (ready(*g, w.exited[warp])) {
        complete(w, *g, warp);
    } else {
        f.state = State::InCollective;
        f.group = g;
        f.file = file;
        f.line = line;
        block_until_runnable(f);
    }
    f.group = nullptr;
    const uint64_t result = g->out[lane];
    if (--g->readers == 0) g->in_use = false;
    return result;
}

void launch_blocks(const LaunchInfo& info, const std::function<void()>& thread_body) {
    const std::string where = "kernel " + std::string(info.name) + " (launched at " + site(info.file, info.line) + ")";
    const dim3 g = info.grid, b = info.block;
    const unsigned long long threads = 1ull * b.x * b.y * b.z;
    if (threads == 0 || threads > kMaxThreadsPerBlock || b.x > kMaxThreadsPerBlock || b.y > kMaxThreadsPerBlock ||
        b.z > kMaxBlockZ)
        throw pa::KernelError(where + ": invalid block " + fmt_idx({b.x, b.y, b.z}) +
                              ": a block has 1 to 1024 threads (z at most 64)");
    const int bound = launch_bound(info.kernel);
    {
        std::lock_guard<std::mutex> lk(bounds_seen_mutex());
        bounds_seen()[info.name] = bound;
    }
    if (bound > 0 && threads > (unsigned long long)bound)
        throw pa::KernelError(where + ": block " + fmt_idx({b.x, b.y, b.z}) + " has " + std::to_string(threads) +
                              " threads, more than the kernel's __launch_bounds__(" + std::to_string(bound) +
                              "): a GPU refuses the launch");
    if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > kMaxGridX || g.y > kMaxGridYZ || g.z > kMaxGridYZ)
        throw pa::KernelError(where + ": invalid grid " + fmt_idx({g.x, g.y, g.z}) +
                              ": x in [1, 2^31-1], y and z in [1, 65535]");
    size_t allowed = kDefaultDynamicShared;
    {
        std::lock_guard<std::mutex> lk(optin_mutex());
        auto it = optins().find(info.kernel);
        if (it != optins().end()) allowed = std::max(allowed, it->second);
    }
    if (info.dynamic_shared > allowed)
        throw pa::KernelError(where + ": requests " + std::to_string(info.dynamic_shared) +
                              " bytes of dynamic shared memory but the kernel may use " + std::to_string(allowed) +
                              " (opt in with pa::set_max_dynamic_shared, at most " + std::to_string(kMaxDynamicShared) + ")");
    const StaticShared& shared = static_shared(info.kernel);
    const long long static_bytes = shared.bytes;
    if (static_bytes > (long long)kMaxStaticShared)
        throw pa::KernelError(where + ": declares " + std::to_string(static_bytes) +
                              " bytes of static __shared__ memory; a kernel may declare at most " +
                              std::to_string(kMaxStaticShared) + " (move the rest to dynamic shared memory)");
    if (static_bytes > 0 && size_t(static_bytes) + info.dynamic_shared > kMaxDynamicShared)
        throw pa::KernelError(where + ": static (" + std::to_string(static_bytes) + ") plus dynamic (" +
                              std::to_string(info.dynamic_shared) + ") shared memory exceeds the device's " +
                              std::to_string(kMaxDynamicShared) + " bytes per block");
    Job job;
    job.info = &info;
    job.body = &thread_body;
    job.static_shared = &shared.objects;
    job.module_base = shared.module_base;
    job.nblocks = (long long)g.x * g.y * g.z;
#if PA_EMU_RACE
    // One launch at a time through the checker, from begin to end, whichever Python threads launch.
    static std::mutex* race_mutex = new std::mutex;
    std::string race_report;
    {
        std::lock_guard<std::mutex> lk(*race_mutex);
        race::begin_launch(info);
        pool().run(job);
        race_report = race::end_launch();
    }
    if (job.failed && !race_report.empty())
        throw pa::KernelError(where + ", " + job.error + " (the race checker also saw a " + race_report + ")");
    if (!race_report.empty()) throw pa::KernelError(where + ", " + race_report);
#elif PA_EMU_PROF
    // One launch at a time through the counters, from begin to end, whichever Python threads launch.
    static std::mutex* prof_mutex = new std::mutex;
    {
        std::lock_guard<std::mutex> lk(*prof_mutex);
        const std::vector<prof::Sample> sample = prof::begin_launch(info, shared.symbol, shared.bytes);
        if (!sample.empty()) {
            job.sample = &sample;
            job.nblocks = (long long)sample.size();
        }
        pool().run(job);
        prof::end_launch(job.failed);
    }
#else
    pool().run(job);
#endif
    if (job.failed) throw pa::KernelError(where + ", " + job.error);
}

}  // namespace pa_emu
