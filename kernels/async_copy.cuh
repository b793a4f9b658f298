// cp.async: copies from global to shared memory that run while the thread goes on (sm_80 and newer), in groups.
//
//   pa::cp_async<BYTES>(dst, src, src_bytes = BYTES)
//       queues a copy of BYTES (4, 8 or 16) from global `src` to shared `dst`, both aligned to BYTES, into the
//       thread's open group. Only the first src_bytes are read; the rest of dst is zero-filled, so src_bytes = 0
//       writes zeros (the edge of a tile) without reading src (which must still be a valid address to pass).
//   pa::cp_async_commit()     closes the thread's open group.
//   pa::cp_async_wait<N>()    waits until at most the newest N of the thread's committed groups are in flight.
//
// A destination is undefined from the copy's issue until its group has been waited for, and then visible to the
// issuing thread only: other threads read it after a __syncthreads() that follows the wait. The source is read at
// some time in between: nothing may write it then. So a pipeline over shared buffers issues the copies of slice
// s + STAGES - 1 into the buffer that slice s - 1 used (freed by the barrier that ended slice s - 1), commits,
// waits for slice s's group (cp_async_wait<STAGES - 1>), and ends the wait with a barrier before reading.
//
// nvcc sees the PTX instructions. The emulator (kernels/emu/cuda_emu.h, runtime.cpp) keeps a queue per thread:
// the destination holds the poison (NaN) until the wait makes the copy, so a read that comes too early gets
// garbage in every build, and the race-check build reports it naming both lines; a misaligned or misplaced
// operand is a KernelError naming the line, as on the GPU (a misaligned-address fault).
#pragma once

#include "common.cuh"

namespace pa {

#if defined(__CUDACC__)

template <int BYTES>
__device__ __forceinline__ void cp_async(void* dst, const void* src, int src_bytes = BYTES) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    const unsigned shared = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    if constexpr (BYTES == 16)  // .cg (through L2 only) exists for 16-byte copies: tiles are not reused from L1
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(src), "r"(src_bytes)
                     : "memory");
    else
        asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(shared), "l"(src), "n"(BYTES),
                     "r"(src_bytes)
                     : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

#else

// The call site's file and line come with each call (default arguments are evaluated where the call is), so the
// emulator's reports name the kernel's line, not this header's; always inlined, so that each call site is an
// instruction of its own to the counters and the race checker (the runtime takes its return address).
template <int BYTES>
[[gnu::always_inline]] inline void cp_async(void* dst, const void* src, int src_bytes = BYTES,
                                            const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async copies 4, 8 or 16 bytes");
    pa_emu::async_copy(dst, src, BYTES, src_bytes, file, line);
}

__forceinline__ void cp_async_commit() { pa_emu::async_copy_commit(); }

template <int N>
__forceinline__ void cp_async_wait() {
    pa_emu::async_copy_wait(N);
}

#endif

}  // namespace pa
