// The race-check build (-DPYALEXNET_EMU_RACECHECK=ON): the runtime's side of the race checker in racecheck.cpp.
//
// The kernel translation units are compiled with -fsanitize=thread but libtsan is never linked: GCC's
// instrumentation calls __tsan_read4(addr), __tsan_write16(addr), __tsan_atomic32_fetch_add(...) and so on, and
// racecheck.cpp defines those functions itself. Each access is stamped with who made it and when, in the terms
// of the CUDA memory model rather than of OS threads:
//   launch  kernel launches on a stream are ordered, so accesses of different launches never race;
//   block   blocks of one launch are never ordered with each other (we have no grid sync);
//   epoch   the number of __syncthreads() the block has passed: accesses of different epochs are ordered;
//   vc      a vector clock per lane over the 32 lanes of its warp: a completed warp collective advances each
//           participant's own component and gives every participant the element-wise maximum, so a lane that
//           has synchronised with another since that lane's access knows a larger clock for it than the
//           access carries (an access records its lane's own component).
// Two accesses to the same bytes race when at least one writes, not both are atomic, and nothing above orders
// them. Shared memory is per block: an earlier block's stamp on a shared address means nothing to the next.
// __threadfence() orders nothing here (none of our kernels communicate between blocks through fences).
// The first race of a launch becomes that launch's KernelError; the kernel still runs to completion.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cuda_emu.h"

namespace pa_emu {
// file:line of the instruction at this offset in the module (runtime.cpp, through addr2line).
std::string source_line(uintptr_t offset);
}  // namespace pa_emu

namespace pa_emu::race {

struct Who {
    uint32_t block = 0;   // linear block index
    uint32_t thread = 0;  // linear thread index within the block
    uint32_t epoch = 0;
    uint32_t vc[32] = {};  // the warp's vector clock as this lane knows it, one component per lane
};

// The fiber running kernel code on this worker; null in the scheduler, the runtime and host code, whose
// accesses are not checked.
extern __thread Who* t_who;

// Clears t_who while the runtime itself runs inside a fiber (a barrier, a collective): the runtime's own
// bookkeeping is shared by the block's fibers by design, and is never a race.
struct Pause {
    Who* saved = t_who;
    Pause() { t_who = nullptr; }
    ~Pause() { t_who = saved; }
    Pause(const Pause&) = delete;
    Pause& operator=(const Pause&) = delete;
};

// Shared memory no access may touch: a redzone after a __shared__ object, or the slack between the end of the
// launch's dynamic shared memory and its guard page.
struct Forbidden {
    const unsigned char* begin;
    const unsigned char* end;
    bool dynamic;
};

// Memory that belongs to the running block: fiber stacks (private to each thread, never checked) and shared
// memory (checked, but forgotten when the block ends).
struct BlockMemory {
    const unsigned char* stacks_begin = nullptr;
    const unsigned char* stacks_end = nullptr;
    std::vector<std::pair<const unsigned char*, const unsigned char*>> shared;  // [begin, end) ranges
    std::vector<Forbidden> forbidden;  // sorted by begin
};

// cp.async (runtime.cpp, async_copy). At the issue the source is read and the destination written, as accesses
// of the issuing thread at the cp.async's instruction `pc`; from then until its group is waited for the
// destination is in flight, and any access to it, by any thread (the issuer too), is reported with both lines.
// At the wait it is written again (landed) by the issuing thread: a thread that reads it with no barrier after
// that wait races with it.
void async_issued(const void* dst, size_t bytes, const void* src, size_t src_bytes, uintptr_t pc);
void async_landed(const void* dst, size_t bytes, uintptr_t pc);

void begin_launch(const LaunchInfo& info);
void begin_block(const BlockMemory& memory);
// The first race the launch made, described with both accesses' kernel source lines; empty if none.
std::string end_launch();

}  // namespace pa_emu::race
