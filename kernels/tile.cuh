// The tile engine shared by the SGEMM (gemm.cu) and the implicit-GEMM convolution (conv.cu).
//
// A block of 256 threads computes a BM x BN tile of C = A B: BN = 128, and BM = 128, or 64 where C's rows fill
// 64-row tiles better (conv1's 64 filters, conv2's 192; tile_rows_for). Thread (ty, tx) = (t / 16, t % 16) owns a TM x TN register tile, TM = BM / 16 and
// TN = BN / 16 (8 x 8, or 4 x 8), made of 4 x 4 blocks 64 rows and 64 columns apart: rows 4 ty + i (+ 64),
// columns 4 tx + j (+ 64) (tile_row, tile_col). K is walked in BK = 16-deep slices staged through two shared
// buffers, both operands stored k-major (As[k][m], Bs[k][n]). For each k a thread reads TM / 4 float4s of A and
// two of B and does TM x TN FFMAs: 16 FFMAs per shared load at 8 x 8 (the 64 x 64 engine before it did 8, and
// shared memory co-limited it). A warp's A reads hit two distinct float4s (broadcast), its B reads 16 consecutive
// float4s: no bank conflicts. The next slice is fetched into registers while the current one is multiplied, then
// stored into the other buffer: buffer (s + 1) & 1 is written only after the barrier that ended slice s - 1, its
// last reader, so one barrier per slice suffices. What a thread fetches and where it stores it is the caller's:
// the two functors, with the staging layouts below.
//
// Split-K. A GEMM whose C has too few tiles to fill the card (the filter gradients: C is the filter bank, K runs
// over every pixel of the batch; the FC layers at batch 128) splits K into `count` ranges of `chunk` (a multiple
// of BK): grid layer z handles range z % count and writes its partial tile to a workspace, one partial C per
// range, and a second launch adds the partials in range order. Every sum is then taken in the same order on every
// run: bitwise reproducible, no atomics. choose_split_k picks the count from the grid and the number of SMs.
#pragma once

#include <algorithm>

#include "async_copy.cuh"
#include "common.cuh"

namespace pa {

constexpr int kTileN = 128, kTileThreads = 256, kTileBK = 16, kTilePad = 4;  // the pad keeps rows 16-byte aligned
// Two blocks per SM (16 warps) at most 128 registers a thread: what __launch_bounds__ holds the engine's kernels to.
constexpr int kTileBlocksPerSm = 2;

// The rows of C a block covers: 128, or 64 where 128-row tiles would leave more than an eighth of their rows
// empty that 64-row ones would not (M = 64: half; M = 192, conv2's filters: a quarter).
inline int tile_rows_for(int M) {
    const long long rows128 = (M + 127LL) / 128 * 128, rows64 = (M + 63LL) / 64 * 64;
    return rows128 * 8 > rows64 * 9 ? 64 : 128;
}

template <int BM>
struct TileBuffers {
    float a[2][kTileBK][BM + kTilePad];
    float b[2][kTileBK][kTileN + kTilePad];
};

// Row (column) of the block's tile that a thread's accumulator row i (column j) holds.
__device__ __forceinline__ int tile_row(int i) { return i / 4 * 64 + threadIdx.x / 16 * 4 + i % 4; }
__device__ __forceinline__ int tile_col(int j) { return j / 4 * 64 + threadIdx.x % 16 * 4 + j % 4; }

// Staging layouts: which elements of a slice thread t fetches, for an operand of R rows (R = BM for A, BN for B)
// in groups of four consecutive elements, R / 64 groups per thread.
//   kk-contiguous (a row of the operand is contiguous in kk: w rows, a GEMM operand stored (rows, K)):
//       group g: row t / 4 + 64 g, kk = t % 4 * 4 + e; stored one float at a time into s[kk][row].
//   row-contiguous (a kk row of the operand is contiguous: a GEMM operand stored (K, rows), the pixels of x or dy):
//       group g: kk = t / (R / 4) + (1024 / R) g, rows t % (R / 4) * 4 + e; stored as one float4 at s[kk][row].
template <int R>
struct KContiguousStage {
    static constexpr int groups = R / 64;
    __device__ __forceinline__ static int row(int g) { return threadIdx.x / 4 + 64 * g; }
    __device__ __forceinline__ static int kk() { return threadIdx.x % 4 * 4; }
};
template <int R>
struct RowContiguousStage {
    static constexpr int groups = R / 64;
    __device__ __forceinline__ static int kk(int g) { return threadIdx.x / (R / 4) + 1024 / R * g; }
    __device__ __forceinline__ static int row() { return threadIdx.x % (R / 4) * 4; }
};

// How K is split: `count` ranges of `chunk` each (the last may be shorter); partial C number z starts `stride`
// floats after number z - 1 in the workspace. count == 1: no split, the kernel writes its result in place.
struct SplitK {
    int count = 1, chunk = 0;
    long long stride = 0;
    __host__ __device__ int begin(int part) const { return part * chunk; }
    __host__ __device__ int end(int part, int K) const {
        const int e = (part + 1) * chunk;
        return count == 1 || e > K ? K : e;
    }
};

// Below this many CTAs per SM a grid is split along K: 8 covers at least two full waves at the 2-4 CTAs per SM
// that the engine's kernels keep resident, so neither a thin grid nor a ragged last wave leaves SMs idle for long.
constexpr int kSplitCtasPerSm = 8;
// Each range is at least this many slices deep: below it, writing and re-reading the partial tiles costs more
// than the range's own work saves.
constexpr int kSplitMinSlices = 8;

// The split for a GEMM of `tiles` CTAs per grid layer, `layers` layers (groups), depth K, on `sms` SMs: none when
// the grid is large enough or K too shallow; otherwise the count in [need, 2 need) (need: the fewest ranges that
// reach kSplitCtasPerSm CTAs per SM) whose grid spreads most evenly over the SMs, the smaller on a tie.
inline SplitK choose_split_k(long long tiles, int layers, int K, int BK, int sms) {
    SplitK none;
    const long long ctas = tiles * layers, target = (long long)kSplitCtasPerSm * sms;
    const int slices = (K + BK - 1) / BK;
    const int most = std::min(slices / kSplitMinSlices, 65535 / std::max(layers, 1));
    if (ctas <= 0 || ctas >= target || most < 2) return none;
    const long long need = (target + ctas - 1) / ctas;
    // Ranges are whole slices, so asking for n ranges gives ceil(slices / ceil(slices / n)) of them: judge that.
    auto ranges = [&](long long n) { return (slices + (slices + n - 1) / n - 1) / ((slices + n - 1) / n); };
    long long best = most;  // K too shallow to reach the target: as many ranges as it allows
    double best_balance = -1.0;
    for (long long n = need; n < 2 * need && n <= most; ++n) {
        const long long count = ranges(n);
        if (count < need) continue;
        const long long grid = ctas * count, waves = (grid + sms - 1) / sms;
        const double balance = double(grid) / double(waves * sms);
        if (balance > best_balance + 1e-12) best = n, best_balance = balance;
    }
    SplitK split;
    split.chunk = int((slices + best - 1) / best) * BK;
    split.count = (K + split.chunk - 1) / split.chunk;  // no empty range
    return split.count > 1 ? split : none;
}

// fetch(k0): load slice [k0, k0 + BK) into the caller's registers (zero at and past k_end); store(buf): write
// them into buffer `buf`. The loop covers [k_begin, k_end).
//
// ASYNC: fetch(k0, buf) may also copy operands straight into buffer `buf` with cp.async (async_copy.cuh; where
// a row of the slice is contiguous and 16-byte aligned, so no register holds it and no STS writes it). The copies
// of a slice are one group, issued into the buffer the barrier before has freed and waited for before the
// barrier that ends the slice: they overlap the slice's FFMAs, as the register-staged loads do.
template <int BM, bool ASYNC = false, class Fetch, class Store>
__device__ __forceinline__ void tile_k_loop(int k_begin, int k_end, TileBuffers<BM>& s, Fetch&& fetch, Store&& store,
                                            float (&acc)[BM / 16][kTileN / 16]) {
    constexpr int TM = BM / 16, TN = kTileN / 16, BK = kTileBK;
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const int slices = (k_end - k_begin + BK - 1) / BK;
    auto fetch_into = [&](int k0, int buf) {
        if constexpr (ASYNC) {
            fetch(k0, buf);
            cp_async_commit();
        } else {
            fetch(k0);
        }
    };
    if (slices > 0) {
        fetch_into(k_begin, 0);
        store(0);
    }
    if constexpr (ASYNC) cp_async_wait<0>();
    __syncthreads();
    for (int sl = 0; sl < slices; ++sl) {
        const int cur = sl & 1;
        if (sl + 1 < slices) fetch_into(k_begin + (sl + 1) * BK, cur ^ 1);
        for (int k = 0; k < BK; ++k) {  // (unrolled whole, the FFMAs need more than 128 registers: spills)
            float av[TM], bv[TN];
            for (int blk = 0; blk < TM / 4; ++blk) {
                const float4 a = *reinterpret_cast<const float4*>(&s.a[cur][k][blk * 64 + ty * 4]);
                av[blk * 4] = a.x, av[blk * 4 + 1] = a.y, av[blk * 4 + 2] = a.z, av[blk * 4 + 3] = a.w;
            }
            for (int blk = 0; blk < TN / 4; ++blk) {
                const float4 b = *reinterpret_cast<const float4*>(&s.b[cur][k][blk * 64 + tx * 4]);
                bv[blk * 4] = b.x, bv[blk * 4 + 1] = b.y, bv[blk * 4 + 2] = b.z, bv[blk * 4 + 3] = b.w;
            }
            for (int i = 0; i < TM; ++i)
                for (int j = 0; j < TN; ++j) acc[i][j] += av[i] * bv[j];
        }
        if (sl + 1 < slices) store(cur ^ 1);
        if constexpr (ASYNC) cp_async_wait<0>();
        __syncthreads();
    }
}

}  // namespace pa
