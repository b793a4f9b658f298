// Device-side assert is on in this file whatever the build type (planted_assert below).
#undef NDEBUG
// Test-only kernels. The first four are ordinary, correct CUDA that exercise one emulator mechanism each
// (they run on the GPU too, so the same test checks both backends). The planted faults below them are
// deliberately wrong, to prove that the emulator reports each fault instead of hanging or crashing; they
// are launched on the emulator only (on a GPU several would hang).
#include <cassert>  // before common.cuh: the emulator redefines assert as a KernelError
#include <cstring>

#include "async_copy.cuh"
#include "common.cuh"
#include "elementwise.cuh"
#include "kernels.h"

namespace pa {

// ---- a textbook tiled GEMM: C[M,N] = A[M,K] B[K,N], TILE x TILE threads, two barriers per K-tile -------------
template <int TILE>
__global__ void __launch_bounds__(TILE * TILE)
    selftest_tiled_gemm_kernel(const float* A, const float* B, float* C, int M, int N, int K) {
    __shared__ float As[TILE][TILE];
    __shared__ float Bs[TILE][TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row = blockIdx.y * TILE + ty, col = blockIdx.x * TILE + tx;
    float acc = 0.0f;
    for (int k0 = 0; k0 < K; k0 += TILE) {
        As[ty][tx] = (row < M && k0 + tx < K) ? A[int64_t(row) * K + k0 + tx] : 0.0f;
        Bs[ty][tx] = (k0 + ty < K && col < N) ? B[int64_t(k0 + ty) * N + col] : 0.0f;
        __syncthreads();
        for (int k = 0; k < TILE; ++k) acc += As[ty][k] * Bs[k][tx];
        __syncthreads();
    }
    if (row < M && col < N) C[int64_t(row) * N + col] = acc;
}

void selftest_tiled_gemm(const float* A, const float* B, float* C, int M, int N, int K, Stream stream) {
    constexpr int T = 16;
    PA_LAUNCH((selftest_tiled_gemm_kernel<T>), dim3(ceil_div(N, T), ceil_div(M, T)), dim3(T, T), 0,
              as_stream(stream), A, B, C, M, N, K);
}

// ---- warp collectives: each variant reduces the block's slice of x to out[block] by another route ------------
//   0: butterfly sum (__shfl_xor_sync)          1: tree sum (__shfl_down_sync)
//   2: inclusive scan (__shfl_up_sync), lane 31  3: count of x > 0 (__ballot_sync)
//   4: per warp, any(x > 0) + 1000 * all(x > 0) 5: sums within groups of 8 lanes (width 8), broadcast
//      (__any_sync, __all_sync)                    from each group's lane 0 (__shfl_sync), then added
__global__ void __launch_bounds__(128) selftest_shuffle_kernel(const float* x, float* out, int n, int variant) {
    __shared__ float warp_totals[4];
    const int i = blockIdx.x * 128 + threadIdx.x;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const float v = i < n ? x[i] : 0.0f;
    const unsigned full = 0xffffffffu;
    float total = 0.0f;
    if (variant == 0) {
        total = v;
        for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(full, total, o);
    } else if (variant == 1) {
        total = v;
        for (int o = 16; o > 0; o >>= 1) total += __shfl_down_sync(full, total, o);
        total = __shfl_sync(full, total, 0);
    } else if (variant == 2) {
        float scan = v;
        for (int o = 1; o < 32; o <<= 1) {
            const float up = __shfl_up_sync(full, scan, o);
            if (lane >= o) scan += up;
        }
        total = __shfl_sync(full, scan, 31);
    } else if (variant == 3) {
        total = float(__popc(__ballot_sync(full, v > 0.0f)));
    } else if (variant == 4) {
        total = float(__any_sync(full, v > 0.0f)) + 1000.0f * float(__all_sync(full, v > 0.0f));
    } else {
        float group = v;
        for (int o = 4; o > 0; o >>= 1) group += __shfl_xor_sync(full, group, o, 8);
        const float leader = __shfl_sync(full, group, 0, 8);  // every lane of a group gets its lane 0's sum
        total = 0.0f;
        for (int g = 0; g < 4; ++g) total += __shfl_sync(full, leader, g * 8);
    }
    __syncwarp();
    if (lane == 0) warp_totals[warp] = total;
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = warp_totals[0] + warp_totals[1] + warp_totals[2] + warp_totals[3];
}

void selftest_shuffle_sum(const float* x, float* out, int n, int variant, Stream stream) {
    PA_LAUNCH(selftest_shuffle_kernel, ceil_div(n, 128), 128, 0, as_stream(stream), x, out, n, variant);
}

// ---- dynamic shared memory: each block reverses its tile of `tile` floats through shared memory -----------
__global__ void __launch_bounds__(128) selftest_reverse_tiles(const float* x, float* y, int n, int tile) {
    PA_DYNAMIC_SHARED(float, buf);
    const int64_t base = int64_t(blockIdx.x) * tile;
    const int len = int(min(int64_t(tile), int64_t(n) - base));
    for (int i = threadIdx.x; i < len; i += blockDim.x) buf[i] = x[base + i];
    __syncthreads();
    for (int i = threadIdx.x; i < len; i += blockDim.x) y[base + i] = buf[len - 1 - i];
}

void selftest_dynamic_shared(const float* x, float* y, int n, int shared_floats, Stream stream) {
    const size_t bytes = size_t(shared_floats) * sizeof(float);
    if (bytes > 48 * 1024) set_max_dynamic_shared(selftest_reverse_tiles, bytes);
    PA_LAUNCH(selftest_reverse_tiles, ceil_div(n, shared_floats), 128, bytes, as_stream(stream), x, y, n,
              shared_floats);
}

// ---- atomics from every block at once: counters = {sum, max, count (by CAS), min} --------------------------
__global__ void __launch_bounds__(256) selftest_atomics_kernel(const int* x, int* counters, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        atomicAdd(&counters[0], x[i]);
        atomicMax(&counters[1], x[i]);
        int seen = atomicAdd(&counters[2], 0), prev;  // an atomic read: a plain one would race with the CAS
        do {
            prev = seen;
            seen = atomicCAS(&counters[2], prev, prev + 1);
        } while (seen != prev);
        atomicMin(&counters[3], x[i]);
    }
}

void selftest_atomics(const int* x, int* counters, int n, Stream stream) {
    PA_LAUNCH(selftest_atomics_kernel, std::min(64u, ceil_div(n, 256)), 256, 0, as_stream(stream), x, counters, n);
}

// ---- lanes that exit early: a full-mask collective waits only for the lanes still running ---------------------
// 48 threads (the second warp is partial); threads >= 40 return at once. Each remaining thread writes how many
// of its warp's running lanes hold a positive x (a __ballot_sync over the full mask, after a __syncwarp).
__global__ void selftest_exited_lanes_kernel(const float* x, float* out) {
    const int t = threadIdx.x;
    if (t >= 40) return;
    __syncwarp();
    out[t] = float(__popc(__ballot_sync(0xffffffffu, x[t] > 0.0f)));
}

void selftest_exited_lanes(const float* x, float* out, Stream stream) {
    PA_LAUNCH(selftest_exited_lanes_kernel, 1, 48, 0, as_stream(stream), x, out);
}

// ---- the less common intrinsics, one block of 48 threads (the second warp partial) ---------------------------
// out[t * kIntrinsicSlots + k], as tests/test_intrinsics.py spells out slot by slot.
constexpr int kIntrinsicSlots = 29;

__global__ void __launch_bounds__(64) selftest_intrinsics_kernel(unsigned* out) {
    __shared__ unsigned counters[5];  // atomicInc, atomicDec, atomicAnd, atomicOr, atomicXor
    __shared__ int flag, plain_flag;
    const unsigned t = threadIdx.x;
    unsigned* o = out + t * kIntrinsicSlots;
    if (t == 0) {
        counters[0] = 0, counters[1] = 0, counters[2] = ~0u, counters[3] = 0, counters[4] = 0;
        flag = 0, plain_flag = 0;
    }
    __syncthreads();
    const long long c0 = clock64();
    o[0] = __brev(t * 0x01234567u + 1u);
    const unsigned lo = 0x89abcdefu * t, hi = 0x01234567u + t;
    o[1] = __funnelshift_l(lo, hi, t);
    o[2] = __funnelshift_lc(lo, hi, t);
    o[3] = __funnelshift_r(lo, hi, t);
    o[4] = __funnelshift_rc(lo, hi, t);
    const float f = (float(t) - 24.0f) * 0.75f;
    o[5] = unsigned(__float2int_rn(f));
    o[6] = unsigned(__float2int_rz(f));
    o[7] = unsigned(__float2int_ru(f));
    o[8] = unsigned(__float2int_rd(f));
    o[9] = __float2uint_rn(f);  // negative: clamped to 0
    o[10] = __match_any_sync(0xffffffffu, t % 5);
    int all_same = -1;
    o[11] = __match_all_sync(0xffffffffu, t / 32, &all_same);
    o[12] = unsigned(all_same);
    o[13] = __reduce_add_sync(0xffffffffu, t);
    o[14] = unsigned(__reduce_min_sync(0xffffffffu, int(t) - 20));
    o[15] = __reduce_max_sync(0xffffffffu, t * 7 % 13);
    o[16] = __reduce_xor_sync(0xffffffffu, t * t);
    o[17] = __activemask();
    o[18] = unsigned(__syncthreads_count(t % 3 == 0));
    o[19] = unsigned(__syncthreads_and(t < 100));
    o[20] = unsigned(__syncthreads_or(t == 47));
    atomicInc(&counters[0], 9u);
    atomicDec(&counters[1], 9u);
    atomicAnd(&counters[2], ~(1u << (t % 32)));
    atomicOr_block(&counters[3], 1u << (t % 32));
    atomicXor_system(&counters[4], t);
    // A spin-wait on another thread of the block: legal since Volta; the emulator must let thread 47 run.
    if (t == 0)
        while (atomicAdd(&flag, 0) == 0) __nanosleep(100);
    if (t == 47) atomicExch(&flag, 1);
    // The same without __nanosleep: a spin on an atomic alone.
    if (t == 1)
        while (atomicAdd(&plain_flag, 0) == 0) {
        }
    if (t == 46) atomicExch(&plain_flag, 1);
    __syncthreads();
    for (int k = 0; k < 5; ++k) o[21 + k] = atomicAdd(&counters[k], 0u);
    o[26] = atomicAdd(&flag, 0);
    o[27] = clock64() >= c0;
    o[28] = atomicAdd(&plain_flag, 0);
}

void selftest_intrinsics(unsigned* out, Stream stream) {
    PA_LAUNCH(selftest_intrinsics_kernel, 1, 48, 0, as_stream(stream), out);
}

// ---- shared memory read before it is written: what a block finds there (the emulator poisons it) -------------
// out[block * 64 + t] = the static shared float t, out[block * 64 + 32 + t] = the dynamic one; two blocks, so the
// second block would see the first block's writes if shared memory kept them.
__global__ void selftest_uninitialised_shared_kernel(float* out) {
    __shared__ float fixed[32];
    PA_DYNAMIC_SHARED(float, dynamic);
    const int t = threadIdx.x;
    out[blockIdx.x * 64 + t] = fixed[t];
    out[blockIdx.x * 64 + 32 + t] = dynamic[t];
    __syncthreads();
    fixed[t] = 1000.0f + blockIdx.x;
    dynamic[t] = 2000.0f + blockIdx.x;
}

void selftest_uninitialised_shared(float* out, Stream stream) {
    PA_LAUNCH(selftest_uninitialised_shared_kernel, 2, 32, 32 * sizeof(float), as_stream(stream), out);
}

// ---- 64-bit offsets: the elementwise map at element indices past 2^32 -----------------------------------------
// Proves without allocating 16 GB that the map's index arithmetic is 64-bit: the kernel runs over indices
// [2^32 + 3, 2^32 + 3 + n) of arrays based 2^32 + 3 elements before the real buffers, so it touches exactly the
// n real elements, and only if no index is truncated to 32 bits (a truncated one lands 16 GB away and faults, or
// an ASan report). The ops that index with 32-bit ints refuse such sizes instead (pyalexnet/_checks.index32).
struct SelftestTimesTwo {
    __device__ __forceinline__ float operator()(float a, float) const { return 2.0f * a; }
};

void selftest_index64(const float* x, float* y, int n, Stream stream) {
    const int64_t offset = (int64_t(1) << 32) + 3;
    // Pointer arithmetic far outside the buffers, as integers, so the compiler cannot reason about it.
    const auto shift = [offset](const float* p) {
        return reinterpret_cast<float*>(reinterpret_cast<uintptr_t>(p) - uintptr_t(offset) * sizeof(float));
    };
    PA_LAUNCH((map2_scalar<SelftestTimesTwo>), ceil_div(n, 256), 256, 0, as_stream(stream), shift(x), shift(x), shift(y),
              offset, offset + n, SelftestTimesTwo{});
}

// ---- memory patterns with known costs: what the counting emulator (pyalexnet profile) must count exactly -------
// x holds 65536 floats, y 4096. Each is correct CUDA, run on both backends; the comments give the counts.
//   coalesced   y[i] = x[i], 4096 threads, one warp a block: each warp load and store covers 128 contiguous
//               bytes, 4 sectors
//   stride32    y[i] = x[32 i], 2048 threads, one warp a block: each lane's float in a sector of its own, 32
//               sectors per load
//   bank32      one warp writes and reads column 0 of a 32 x 32 shared tile: every word in bank 0, 32 wavefronts
//   broadcast   lane 0 writes one shared word, then all 32 lanes read it: 1 wavefront each
//   predicated  one warp, 8 iterations split by barriers; in iteration i only lanes i..31 load x[32 i + lane]:
//               8 warp loads (228 lanes in all), each 4 sectors, though lane 0 loads 8 times and lane 7 once
//   tail6       6 blocks of 256 threads, each thread 4096 FFMAs per shared load it broadcasts: FMA-bound work
//               on 6 of the card's SMs, which the model must call "tail"
__global__ void __launch_bounds__(32) selftest_copy_kernel(const float* x, float* y, int stride) {
    const int i = blockIdx.x * 32 + threadIdx.x;
    y[i] = x[int64_t(i) * stride];
}

__global__ void __launch_bounds__(32) selftest_bank_kernel(const float* x, float* y, int broadcast) {
    __shared__ float tile[32][32];
    const int lane = threadIdx.x;
    if (broadcast) {
        if (lane == 0) tile[0][0] = x[0];
        __syncwarp();
        y[lane] = tile[0][0];
    } else {
        tile[lane][0] = x[lane];
        __syncwarp();
        y[lane] = tile[lane][0];
    }
}

__global__ void __launch_bounds__(32) selftest_predicated_kernel(const float* x, float* y) {
    const int lane = threadIdx.x;
    float acc = 0.0f;
    for (int i = 0; i < 8; ++i) {
        if (lane >= i) acc += x[32 * i + lane];
        __syncthreads();
    }
    y[lane] = acc;
}

__global__ void __launch_bounds__(256) selftest_fma_kernel(const float* x, float* y) {
    __shared__ float coefficient[64];
    if (threadIdx.x < 64) coefficient[threadIdx.x] = x[threadIdx.x];
    __syncthreads();
    float a0 = x[threadIdx.x], a1 = a0 + 1.0f, a2 = a0 + 2.0f, a3 = a0 + 3.0f;
    for (int k = 0; k < 1024; ++k) {
        const float c = coefficient[k % 64];  // the same word for every lane: a broadcast
        a0 = a0 * c + 0.5f, a1 = a1 * c + 0.25f, a2 = a2 * c + 0.125f, a3 = a3 * c + 0.0625f;
    }
    y[blockIdx.x * 256 + threadIdx.x] = a0 + a1 + a2 + a3;
}

void selftest_memory_pattern(const char* pattern, const float* x, float* y, Stream stream) {
    const cudaStream_t st = as_stream(stream);
    if (std::strcmp(pattern, "coalesced") == 0) PA_LAUNCH(selftest_copy_kernel, 128, 32, 0, st, x, y, 1);
    else if (std::strcmp(pattern, "stride32") == 0) PA_LAUNCH(selftest_copy_kernel, 64, 32, 0, st, x, y, 32);
    else if (std::strcmp(pattern, "bank32") == 0) PA_LAUNCH(selftest_bank_kernel, 1, 32, 0, st, x, y, 0);
    else if (std::strcmp(pattern, "broadcast") == 0) PA_LAUNCH(selftest_bank_kernel, 1, 32, 0, st, x, y, 1);
    else if (std::strcmp(pattern, "predicated") == 0) PA_LAUNCH(selftest_predicated_kernel, 1, 32, 0, st, x, y);
    else if (std::strcmp(pattern, "tail6") == 0) PA_LAUNCH(selftest_fma_kernel, 6, 256, 0, st, x, y);
    else throw KernelError(std::string("selftest_memory_pattern: unknown pattern '") + pattern + "'");
}

// ---- planted faults ------------------------------------------------------------------------------------------
__global__ void planted_divergent_barrier(float* s) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    s[threadIdx.x] = 1.0f;
}

__global__ void planted_exit_before_barrier(float* s) {
    if (threadIdx.x == 5) return;
    __syncthreads();
    s[threadIdx.x] = 1.0f;
}

__global__ void planted_deadlock(float* s) {
    float v = s[threadIdx.x];
    if (threadIdx.x % 32 == 0) __syncthreads();
    else v = __shfl_sync(0xffffffffu, v, 0);
    s[threadIdx.x] = v;
}

__global__ void planted_inactive_lane(float* s) {
    float v = s[threadIdx.x];
    if (threadIdx.x < 16) v = __shfl_sync(0x0000ffffu, v, threadIdx.x + 16);
    s[threadIdx.x] = v;
}

__global__ void planted_mask_mismatch(float* s) {
    float v = s[threadIdx.x];
    if (threadIdx.x < 16) v = __shfl_sync(0xffffffffu, v, 0);
    else v = __shfl_sync(0xffff0000u, v, 16);
    s[threadIdx.x] = v;
}

__global__ void planted_reads_exited_lane(float* s) {
    if (threadIdx.x >= 16) return;
    s[threadIdx.x] = __shfl_down_sync(0xffffffffu, s[threadIdx.x], 16);
}


// A read one element past the 1024 bytes of dynamic shared memory: the emulator places them right below a guard
// page, and no error check can turn that fault into a KernelError: the process ends, and the emulator's fault
// handler names kernel, block and thread first.
__global__ void planted_shared_guard_page(float* s) {
    PA_DYNAMIC_SHARED(float, dynamic);
    s[threadIdx.x] = dynamic[256 + threadIdx.x];
}

// A device-side assert that fails in thread 5 only.
__global__ void planted_assert(float* s) {
    assert(threadIdx.x != 5);
    s[threadIdx.x] = 1.0f;
}

__global__ void planted_trivial(float* s) {
    if (threadIdx.x == 0 && blockIdx.x == 0) s[0] = 1.0f;
}

__global__ void planted_dynamic_shared(float* s) {
    PA_DYNAMIC_SHARED(float, buf);
    buf[threadIdx.x] = 1.0f;
    s[threadIdx.x] = buf[threadIdx.x];
}

// Faults only the emulator build sees: ptxas refuses 64 KB of static shared memory outright, and 80 KB of
// locals would be a GPU stack frame (local memory), which tests/test_ptxas.py forbids.
#if !defined(__CUDACC__)
__global__ void planted_static_shared(float* s) {
    __shared__ float big[16384];
    big[threadIdx.x] = 1.0f;
    s[threadIdx.x] = big[threadIdx.x];
}

// Thread 7 of 8 puts 300 KB of locals on its emulator stack (64 KB; 256 KB in the ASan build). The stacks of
// the finished threads 0-6 lie below it, so the overflow lands there and the canary reports it.
__global__ void planted_stack_overflow(float* s) {
    if (threadIdx.x != 7) return;
    volatile float big[300000];  // 1.2 MB: more than the emulator's 1 MB stack
    for (int i = 0; i < 300000; ++i) big[i] = float(i);
    s[7] = big[299999];
}

// Valid CUDA: 512 KB of local memory in one thread (a GPU allows it; the emulator's stacks are 1 MB).
__global__ void planted_large_local_array(float* s) {
    if (threadIdx.x != 3) return;
    volatile float big[131072];
    for (int i = 0; i < 131072; ++i) big[i] = float(i % 7);
    float sum = 0.0f;
    for (int i = 0; i < 131072; ++i) sum += big[i];
    s[3] = sum;
}
#endif

// Faults only the sanitizer build can catch (elsewhere they would corrupt memory): each is a one-off bug.
#if defined(__SANITIZE_ADDRESS__)
__global__ void planted_global_overflow(float* s) { s[1024 + threadIdx.x] = 1.0f; }  // s holds 1024 floats

__global__ void planted_shared_overflow(float* s) {
    __shared__ float tile[32];
    tile[threadIdx.x] = s[threadIdx.x];
    __syncthreads();
    s[threadIdx.x] = tile[threadIdx.x + 1];  // thread 31 reads tile[32]
}

__global__ void planted_misaligned_float4(float* s) {
    const float4 v = *reinterpret_cast<const float4*>(s + 1 + 4 * threadIdx.x);  // 4-byte, not 16-byte, aligned
    s[threadIdx.x] = v.x;
}
#endif

// Spin-waits on plain volatile loads, legal since Volta (independent thread scheduling): a waiting thread must not
// starve the one it waits for, in its warp or in another. The emulator preempts a fiber that runs too long without
// a switch. Thread 0 waits for thread 63 (another warp) and thread 1 for thread 30 (its own); each setter first
// publishes a value, fenced, then the flag. With `FLAG_IN_GLOBAL`, the flags live in global memory (s[512..513]).
// These are correct CUDA; the two livelocks after them wait for a flag nothing ever sets (a GPU would hang).
#if !defined(__CUDACC__)
template <bool FLAG_IN_GLOBAL>
__global__ void planted_spin_volatile(float* s) {
    __shared__ int shared_flags[2];
    __shared__ float published[2];
    volatile int* flags = FLAG_IN_GLOBAL ? reinterpret_cast<volatile int*>(s + 512) : shared_flags;
    const int t = threadIdx.x;
    if (t < 2) flags[t] = 0;
    __syncthreads();
    if (t == 63 || t == 30) {
        published[t == 63 ? 0 : 1] = float(t) * 3.0f;
        __threadfence_block();
        flags[t == 63 ? 0 : 1] = 1;
    }
    if (t < 2) {
        while (flags[t] == 0) {
        }
        __threadfence_block();
        s[t] = reinterpret_cast<volatile float*>(published)[t];
    }
}

// Out-of-bounds shared memory: thread 31 reads one float past a 32-float __shared__ array; thread 5 writes one past
// 20 bytes of dynamic shared memory (inside the 16-byte rounding, before the guard page). With IN_BOUNDS, the
// same kernels stay inside (the static read wraps; the launch gives 24 dynamic bytes).
template <bool IN_BOUNDS>
__global__ void planted_shared_past_end(float* s) {
    __shared__ float tile[32];
    const int t = threadIdx.x;
    tile[t] = float(t);
    __syncthreads();
    s[t] = tile[IN_BOUNDS ? (t + 1) % 32 : t + 1];
}

__global__ void planted_dynamic_past_end(float* s) {
    PA_DYNAMIC_SHARED(float, dynamic);
    const int t = threadIdx.x;
    if (t == 5) dynamic[5] = 1.0f;
    if (t < 5) dynamic[t] = float(t);
    __syncthreads();
    if (t < 5) s[t] = dynamic[t];
}

// __launch_bounds__ as a number and as a template's expression: launched with more threads, a GPU refuses both.
__global__ void __launch_bounds__(64) planted_bounded(float* s) { s[threadIdx.x] = 1.0f; }
template <int SIDE>
__global__ void __launch_bounds__(SIDE * SIDE, 2) planted_bounded_square(float* s) {
    s[threadIdx.y * blockDim.x + threadIdx.x] = 2.0f;
}

__global__ void planted_livelock_spin(float* s) {
    volatile int* flag = reinterpret_cast<volatile int*>(s + 512);
    if (threadIdx.x == 0)
        while (*flag == 0) {
        }
    __syncthreads();
}

__global__ void planted_livelock_nanosleep(float* s) {
    volatile int* flag = reinterpret_cast<volatile int*>(s + 512);
    if (threadIdx.x == 0)
        while (*flag == 0) __nanosleep(1000);
    __syncthreads();
}
#endif

// Races: right answers in the plain emulator (its fibers run in order) and wrong ones, sometimes, on a GPU. Only
// the race-check build sees them. Each is a pair: the bug, and the same kernel made correct (a control that must
// pass the checker, so it cannot pass by reporting everything). 64 threads: two warps.
#if !defined(__CUDACC__)
template <bool BARRIER>
__global__ void planted_race_block_shared(float* s) {
    __shared__ float tile[64];
    const int t = threadIdx.x;
    tile[t] = s[t];
    if (BARRIER) __syncthreads();
    s[64 + t] = tile[63 - t];  // thread t reads what thread 63 - t wrote, in the other warp
}

template <bool SYNCWARP>
__global__ void planted_race_warp_shared(float* s) {
    __shared__ float tile[64];
    const int t = threadIdx.x;
    tile[t] = s[t];
    if (SYNCWARP) __syncwarp();
    s[64 + t] = tile[t ^ 1];  // a neighbour in the same warp
}

// The classic tiled-loop bug: without the second barrier, a fast thread overwrites the tile of the next
// iteration while a slow one still reads this iteration's.
template <bool SECOND_BARRIER>
__global__ void planted_race_reused_tile(float* s) {
    __shared__ float tile[64];
    const int t = threadIdx.x;
    float acc = 0.0f;
    for (int it = 0; it < 2; ++it) {
        tile[t] = s[64 * it + t];
        __syncthreads();
        acc += tile[63 - t];
        if (SECOND_BARRIER) __syncthreads();
    }
    s[128 + t] = acc;
}

// The checker's own corner cases (each found wanting once): shared memory declared in a __device__ helper;
// byte arrays; a collective of a subset of the warp; a reader that a later read by another warp would hide;
// a plain store after many threads' atomics.
__device__ float planted_helper_block_sum(float v) {
    __shared__ float partial[64];  // the helper's own shared array, reused by every block on a worker
    partial[threadIdx.x] = v;
    __syncthreads();
    float sum = 0.0f;
    for (int i = 0; i < 64; ++i) sum += partial[i];
    __syncthreads();
    return sum;
}

__global__ void planted_race_control_helper_shared(float* s) {
    s[64 * blockIdx.x + threadIdx.x] = planted_helper_block_sum(s[64 * blockIdx.x + threadIdx.x]);
}

template <bool ACROSS_BLOCKS>
__global__ void planted_race_bytes(float* s) {
    unsigned char* m = reinterpret_cast<unsigned char*>(s + 256);
    const int t = threadIdx.x;
    if (ACROSS_BLOCKS) {
        m[t] = static_cast<unsigned char>(blockIdx.x);  // every block writes the same 64 bytes
    } else {
        const unsigned char v = m[t];  // each thread its own byte: no race, though 4 threads share each word
        if (t % 2) m[t] = static_cast<unsigned char>(v + 1);
    }
}

// Uninitialised shared memory (the race-check build's initcheck), each fault with its corrected twin:
//   uninit_tile:     thread 63 skips its store, thread 0 reads tile[63] after the barrier (twin: all store);
//   uninit_helper:   a __device__ helper reads dynamic shared memory that only block 0 wrote: block 1 finds
//                    block 0's values (twin: every block writes its own);
//   uninit_bytes:    bytes stored one by one, then read as a word of which one byte was never stored (twin: all).
template <bool FIXED>
__global__ void planted_uninit_tile(float* s) {
    __shared__ float tile[64];
    const int t = threadIdx.x;
    if (FIXED || t != 63) tile[t] = s[t];
    __syncthreads();
    if (t == 0) s[64] = tile[63];
}

__device__ float planted_helper_read_dynamic(int i) {
    PA_DYNAMIC_SHARED(float, dynamic);
    return dynamic[i];
}

template <bool FIXED>
__global__ void planted_uninit_helper(float* s) {
    PA_DYNAMIC_SHARED(float, dynamic);
    const int t = threadIdx.x;
    if (FIXED || blockIdx.x == 0) dynamic[t] = s[t];
    __syncthreads();
    s[128 + 64 * blockIdx.x + t] = planted_helper_read_dynamic(63 - t);
}

template <bool FIXED>
__global__ void planted_uninit_bytes(float* s) {
    __shared__ unsigned words[16];
    unsigned char* bytes = reinterpret_cast<unsigned char*>(words);
    const int t = threadIdx.x;
    if (FIXED || t != 6) bytes[t] = static_cast<unsigned char>(t);
    __syncthreads();
    if (t < 16) s[t] = float(words[t]);  // word 1 holds byte 6
}

__global__ void planted_race_partial_syncwarp(float* s) {
    __shared__ float tile[64];
    const int t = threadIdx.x;
    if (t < 2) __syncwarp(0x3u);   // lanes 0 and 1 synchronise with each other, not with lane 2
    if (t == 2) tile[0] = 1.0f;
    if (t == 0) s[0] = tile[0];    // lane 0 reads what lane 2 wrote, after its collective with lane 1
}

__global__ void planted_race_hidden_reader(float* s) {
    __shared__ float tile[64];
    const int t = threadIdx.x;
    if (t == 0) tile[0] = 5.0f;
    __syncthreads();
    if (t == 32) s[1] = tile[0];   // warp 1 reads
    if (t < 32) {
        __syncwarp();
        if (t == 0) s[2] = tile[0];  // warp 0 reads too: the last reader is now thread 0
        __syncwarp();
        if (t == 0) tile[0] = 6.0f;  // and writes, ordered after its own read but not after thread 32's
    }
}

// Three readers: thread 0 (warp 0), then threads 32 and 33 (warp 1), which then synchronise with each other;
// thread 33's write is ordered after both their reads, not after thread 0's.
__global__ void planted_race_third_reader(float* s) {
    __shared__ float tile[64];
    const int t = threadIdx.x;
    if (t == 0) tile[0] = 5.0f;
    __syncthreads();
    if (t == 0 || t == 32 || t == 33) s[t] = tile[0];
    if (t == 32 || t == 33) {
        __syncwarp(0x3u);
        if (t == 33) tile[0] = 7.0f;
    }
}

// The documented limit: three readers in one warp (lanes 0, 1, 2), lanes 1 and 2 then synchronise with each other
// only, and lane 2 writes. Lane 0's read is unordered with the write, but the checker kept lanes 1 and 2's.
__global__ void planted_race_third_reader_same_warp(float* s) {
    __shared__ float tile[64];
    const int t = threadIdx.x;
    if (t == 0) tile[0] = 5.0f;
    __syncthreads();
    if (t < 3) s[t] = tile[0];
    if (t == 1 || t == 2) {
        __syncwarp(0x6u);
        if (t == 2) tile[0] = 7.0f;
    }
}

__global__ void planted_race_store_after_atomics(float* s) {
    int* counter = reinterpret_cast<int*>(s + 512);
    atomicAdd(counter, 1);
    if (threadIdx.x == 63) *counter = 0;  // a plain store, unordered with the other threads' atomics
}

template <bool OWN_SLOT>
__global__ void planted_race_between_blocks(float* s) {
    // Every block writes the same 64 floats; the correct version gives each block its own.
    s[(OWN_SLOT ? 64 * blockIdx.x : 0) + threadIdx.x] = float(blockIdx.x);
}
#endif

// ---- cp.async (async_copy.cuh): a two-stage pipeline, and the ways to get one wrong ---------------------------
// Three 256-float tiles of s through two shared buffers: thread t copies float4 t of each (thread 63 only half of
// the last one: the rest is zero-filled) and adds up float4 t ^ 1, its partner's copy, into s[768 + t].
enum AsyncFault { kAsyncCorrect, kAsyncReadBeforeWait, kAsyncNoBarrierAfterWait, kAsyncRefillTooEarly, kAsyncMisaligned };

template <int FAULT>
__global__ void __launch_bounds__(64) planted_async_copy(float* s) {
    __shared__ __align__(16) float tile[2][256];
    const int t = threadIdx.x;
    auto issue = [&](int n) {
        const int src_bytes = n == 2 && t == 63 ? 8 : 16;
        float* dst = &tile[n & 1][4 * t + (FAULT == kAsyncMisaligned ? 1 : 0)];
        cp_async<16>(dst, s + 256 * n + 4 * t, src_bytes);
        cp_async_commit();
    };
    float acc = 0.0f;
    issue(0);
    for (int n = 0; n < 3; ++n) {
        if (n + 1 < 3) issue(n + 1);
        else cp_async_commit();  // an empty group: the wait below still means "all but the newest group"
        if (FAULT == kAsyncReadBeforeWait) acc += tile[(n + 1) & 1][4 * t];  // its own next copy, in flight
        cp_async_wait<1>();
        if (FAULT != kAsyncNoBarrierAfterWait) __syncthreads();  // the partner's copy is visible after this
        for (int e = 0; e < 4; ++e) acc += tile[n & 1][4 * (t ^ 1) + e];
        if (FAULT != kAsyncRefillTooEarly) __syncthreads();  // the buffer is refilled next iteration
    }
    s[768 + t] = acc;
}

long long selftest_static_shared_bytes() { return static_shared_bytes(selftest_tiled_gemm_kernel<16>); }

void selftest_planted(const char* fault, float* s, Stream stream) {
    const cudaStream_t st = as_stream(stream);
    const std::string f = fault;
    if (f == "divergent_barrier") PA_LAUNCH(planted_divergent_barrier, 1, 32, 0, st, s);
    else if (f == "exit_before_barrier") PA_LAUNCH(planted_exit_before_barrier, 1, 32, 0, st, s);
    else if (f == "deadlock") PA_LAUNCH(planted_deadlock, 1, 32, 0, st, s);
    else if (f == "inactive_lane") PA_LAUNCH(planted_inactive_lane, 1, 32, 0, st, s);
    else if (f == "mask_mismatch") PA_LAUNCH(planted_mask_mismatch, 1, 32, 0, st, s);
    else if (f == "reads_exited_lane") PA_LAUNCH(planted_reads_exited_lane, 1, 32, 0, st, s);
    else if (f == "assert") PA_LAUNCH(planted_assert, 1, 32, 0, st, s);

    else if (f == "too_many_threads") PA_LAUNCH(planted_trivial, 1, 2048, 0, st, s);
    else if (f == "grid_too_large") PA_LAUNCH(planted_trivial, dim3(1, 70000), 32, 0, st, s);
    else if (f == "dynamic_shared_over_limit") PA_LAUNCH(planted_dynamic_shared, 1, 32, 64 * 1024, st, s);
    else if (f == "dynamic_shared_over_optin") set_max_dynamic_shared(planted_dynamic_shared, 300 * 1024);
    else if (f == "async_copy") PA_LAUNCH(planted_async_copy<kAsyncCorrect>, 1, 64, 0, st, s);
    else if (f == "async_read_before_wait") PA_LAUNCH(planted_async_copy<kAsyncReadBeforeWait>, 1, 64, 0, st, s);
    else if (f == "async_no_barrier_after_wait")
        PA_LAUNCH(planted_async_copy<kAsyncNoBarrierAfterWait>, 1, 64, 0, st, s);
    else if (f == "async_refill_too_early") PA_LAUNCH(planted_async_copy<kAsyncRefillTooEarly>, 1, 64, 0, st, s);
    else if (f == "async_misaligned") PA_LAUNCH(planted_async_copy<kAsyncMisaligned>, 1, 64, 0, st, s);
#if !defined(__CUDACC__)
    else if (f == "static_shared_over_limit") PA_LAUNCH(planted_static_shared, 1, 32, 0, st, s);
    else if (f == "stack_overflow") PA_LAUNCH(planted_stack_overflow, 1, 8, 0, st, s);
    else if (f == "large_local_array") PA_LAUNCH(planted_large_local_array, 1, 8, 0, st, s);
    else if (f == "race_missing_syncthreads") PA_LAUNCH(planted_race_block_shared<false>, 1, 64, 0, st, s);
    else if (f == "race_control_syncthreads") PA_LAUNCH(planted_race_block_shared<true>, 1, 64, 0, st, s);
    else if (f == "race_missing_syncwarp") PA_LAUNCH(planted_race_warp_shared<false>, 1, 64, 0, st, s);
    else if (f == "race_control_syncwarp") PA_LAUNCH(planted_race_warp_shared<true>, 1, 64, 0, st, s);
    else if (f == "race_missing_second_barrier") PA_LAUNCH(planted_race_reused_tile<false>, 1, 64, 0, st, s);
    else if (f == "race_control_second_barrier") PA_LAUNCH(planted_race_reused_tile<true>, 1, 64, 0, st, s);
    else if (f == "race_control_helper_shared") PA_LAUNCH(planted_race_control_helper_shared, 4, 64, 0, st, s);
    else if (f == "race_control_bytes") PA_LAUNCH(planted_race_bytes<false>, 1, 64, 0, st, s);
    else if (f == "race_bytes_between_blocks") PA_LAUNCH(planted_race_bytes<true>, 4, 64, 0, st, s);
    else if (f == "race_partial_syncwarp") PA_LAUNCH(planted_race_partial_syncwarp, 1, 64, 0, st, s);
    else if (f == "race_hidden_reader") PA_LAUNCH(planted_race_hidden_reader, 1, 64, 0, st, s);
    else if (f == "race_third_reader") PA_LAUNCH(planted_race_third_reader, 1, 64, 0, st, s);
    else if (f == "race_third_reader_same_warp") PA_LAUNCH(planted_race_third_reader_same_warp, 1, 64, 0, st, s);
    else if (f == "race_store_after_atomics") PA_LAUNCH(planted_race_store_after_atomics, 1, 64, 0, st, s);
    else if (f == "race_between_blocks") PA_LAUNCH(planted_race_between_blocks<false>, 4, 64, 0, st, s);
    else if (f == "race_control_between_blocks") PA_LAUNCH(planted_race_between_blocks<true>, 4, 64, 0, st, s);
    else if (f == "uninit_tile") PA_LAUNCH(planted_uninit_tile<false>, 1, 64, 0, st, s);
    else if (f == "uninit_control_tile") PA_LAUNCH(planted_uninit_tile<true>, 1, 64, 0, st, s);
    else if (f == "uninit_helper") PA_LAUNCH(planted_uninit_helper<false>, 2, 64, 64 * sizeof(float), st, s);
    else if (f == "uninit_control_helper") PA_LAUNCH(planted_uninit_helper<true>, 2, 64, 64 * sizeof(float), st, s);
    else if (f == "uninit_bytes") PA_LAUNCH(planted_uninit_bytes<false>, 1, 64, 0, st, s);
    else if (f == "uninit_control_bytes") PA_LAUNCH(planted_uninit_bytes<true>, 1, 64, 0, st, s);
    else if (f == "spin_volatile_shared") PA_LAUNCH(planted_spin_volatile<false>, 1, 64, 0, st, s);
    else if (f == "spin_volatile_global") PA_LAUNCH(planted_spin_volatile<true>, 1, 64, 0, st, s);
    else if (f == "shared_past_end") PA_LAUNCH(planted_shared_past_end<false>, 1, 32, 0, st, s);
    else if (f == "shared_in_bounds") PA_LAUNCH(planted_shared_past_end<true>, 1, 32, 0, st, s);
    else if (f == "dynamic_past_end") PA_LAUNCH(planted_dynamic_past_end, 1, 32, 20, st, s);
    else if (f == "dynamic_in_bounds") PA_LAUNCH(planted_dynamic_past_end, 1, 32, 24, st, s);
    else if (f == "bounds_at_limit") PA_LAUNCH(planted_bounded, 1, 64, 0, st, s);
    else if (f == "bounds_exceeded") PA_LAUNCH(planted_bounded, 1, 65, 0, st, s);
    else if (f == "bounds_template_at_limit") PA_LAUNCH(planted_bounded_square<8>, 1, dim3(8, 8), 0, st, s);
    else if (f == "bounds_template_exceeded") PA_LAUNCH(planted_bounded_square<8>, 1, dim3(8, 9), 0, st, s);
    else if (f == "livelock_spin") PA_LAUNCH(planted_livelock_spin, 1, 64, 0, st, s);
    else if (f == "livelock_nanosleep") PA_LAUNCH(planted_livelock_nanosleep, 1, 64, 0, st, s);
#endif
#if !defined(__CUDACC__) && !defined(__SANITIZE_ADDRESS__)
    else if (f == "shared_guard_page") PA_LAUNCH(planted_shared_guard_page, 1, 32, 1024, st, s);
#endif
#if defined(__SANITIZE_ADDRESS__)
    else if (f == "global_overflow") PA_LAUNCH(planted_global_overflow, 1, 32, 0, st, s);
    else if (f == "shared_overflow") PA_LAUNCH(planted_shared_overflow, 1, 32, 0, st, s);
    else if (f == "misaligned_float4") PA_LAUNCH(planted_misaligned_float4, 1, 32, 0, st, s);
#endif
    else throw KernelError("selftest_planted: unknown fault '" + f + "'");
}

}  // namespace pa
