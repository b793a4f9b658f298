// The counting build (pyalexnet._emu_profile): the runtime's side of the memory counters in counters.cpp.
//
// What `pyalexnet profile` needs from a launch, and the GPU cannot tell us without a GPU: how each warp-level
// memory instruction maps onto the memory system. The kernel translation units of this module are compiled
// with -fsanitize=thread, but libtsan is never linked: counters.cpp defines the __tsan_read4(addr) ...
// functions that GCC's instrumentation calls on every load and store, exactly as the race checker does, and
// records each access with its instruction (the return address: one per access in the compiled kernel).
//
// Threads of a warp run one after another here, not in lock step, so a warp-level instruction is rebuilt:
// the k-th time lane i executes the access at address `pc` belongs to the same warp instruction as the k-th
// time lane j executes it. That is how SIMT hardware runs convergent code, and a loop that some lanes leave
// early simply has fewer lanes in its later instructions. An instruction is complete when every live lane
// of the warp has brought its address, or at the next __syncthreads() or the end of the block. Each barrier,
// and each warp collective that every live lane joins, restarts the occurrence counts, so a lane that skipped
// a predicated access pairs up again from there. Between such points the pairing is by count alone: in a loop
// without barriers where some lanes skip an access in one iteration (the bounds checks of a pooling window)
// their later executions pair with other lanes' later iterations, which can overstate the sectors a little.
//
// For each complete warp instruction (the hardware's rules, CUDA C++ Programming Guide, compute capability
// 8.x/9.x, "Global Memory" and "Shared Memory"):
//   global   the distinct 32-byte sectors its lanes touch (a 128-byte coalesced float load: 4 sectors);
//   shared   the wavefronts it takes: 32 banks of 4 bytes; lanes reading the same word share it
//            (broadcast); an access of w bytes (4, 8, 16) occupies w/4 consecutive banks, so a wavefront serves
//            at most one distinct word per group of w/4 banks, and the count is the largest number of distinct
//            words that fall into one bank group (a float4 load by 32 lanes of distinct addresses: 4).
// Aggregated per instruction (pc) and per launch, with the unique global bytes each pointer argument of the
// kernel had read and written, and the block barriers.
//
// Sampling. Full-size AlexNet layers have thousands of CTAs; profile mode can run a stratified sample of
// them: in each grid dimension the first and the last block (the edge classes, where tiles hang over the
// matrix) and `interior` blocks spread evenly over the rest, each standing for its share of the interior
// (more in the largest dimension where the sample would otherwise have fewer than 32 blocks). The
// counts of a sampled block are scaled by the number of blocks it stands for. Unsampled blocks do not run
// at all, so their outputs are never written: profile mode is for counting, not for results.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "cuda_emu.h"

namespace pa_emu::prof {

// Memory the running block may touch that is not kernel data: fiber stacks (registers and locals on the GPU),
// and the runtime's own storage that kernel code reads (threadIdx, blockIdx, the launch's argument tuple).
struct BlockMemory {
    const unsigned char* stacks_begin = nullptr;
    const unsigned char* stacks_end = nullptr;
    std::vector<std::pair<const unsigned char*, const unsigned char*>> shared;   // [begin, end)
    std::vector<std::pair<const unsigned char*, const unsigned char*>> ignored;  // [begin, end)
};

// One sampled block: its linear index and how many blocks of the grid it stands for.
struct Sample {
    long long block;
    double weight;
};

// Which blocks to run; empty when every block runs (sampling off, or a grid small enough).
std::vector<Sample> begin_launch(const LaunchInfo& info, const std::string& kernel, long long static_shared);
void begin_block(const BlockMemory& memory, int nthreads, double weight);
// The fiber of linear thread `thread` is about to run (-1: the scheduler, whose accesses are not counted).
void set_thread(int thread);
void barrier();  // every thread of the block has passed a __syncthreads()
void warp_converged(int warp);  // every live lane of the warp has joined one warp collective
void lane_exited(int thread);   // the thread has finished: the warp's instructions no longer wait for it
void end_block();
void end_launch(bool failed);
// A cp.async (runtime.cpp, async_copy) at instruction `pc`: its global read and its shared write, counted at the
// issue (the copy itself is made later, uncounted).
void async_copy_access(const void* src, size_t src_bytes, void* dst, size_t bytes, uintptr_t pc);

// Python's side (bindings.cpp): 0 runs every block; n > 0 samples the first, the last and n interior blocks
// of each grid dimension.
void set_interior_samples(int n);
int interior_samples();

// Every launch since the last call, oldest first, as plain data for the bindings.
struct InstructionCounts {
    uint64_t pc = 0;        // offset of the access in this module (addr2line names its source line)
    int space = 0;          // 0 global, 1 shared
    int kind = 0;           // 0 load, 1 store, 2 atomic
    int width = 0;          // bytes per lane
    double instructions = 0, lanes = 0;            // warp-level instructions, active lanes summed over them
    double sectors = 0, ideal_sectors = 0;         // global: sectors, and the fewest its distinct bytes need
    double wavefronts = 0, ideal_wavefronts = 0;   // shared: wavefronts, and the fewest its distinct bytes need
};
struct BufferCounts {
    int argument = 0;                // which pointer argument of the kernel (0 = the first pointer)
    double read_bytes = 0, write_bytes = 0;  // unique bytes, estimated for the whole grid
    double extent = 0;               // bytes from the pointer to the furthest byte any sampled block touched
};
struct LaunchCounts {
    std::string kernel;       // the mangled name (the same as nvcc's for the same kernel)
    std::string name, file;   // the launch macro's spelling and site
    int line = 0;
    unsigned grid[3] = {1, 1, 1}, block[3] = {1, 1, 1};
    size_t dynamic_shared = 0;
    long long static_shared = -1;
    long long ctas = 0, sampled_ctas = 0;
    double barriers = 0;      // block-wide barriers passed, summed over the grid
    double other_global_bytes = 0;  // unique bytes read plus written below every pointer argument (a kernel that
                                    // gets its pointers inside a struct, as sgd_update_many does)
    std::vector<InstructionCounts> instructions;
    std::vector<BufferCounts> buffers;
};
std::vector<LaunchCounts> take_launches();

}  // namespace pa_emu::prof
