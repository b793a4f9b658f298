// Inverted dropout with a bit mask from our counter-based generator (random.cuh).
//
//   element i (0 <= i < n, row-major over the whole tensor) draws r = philox4x32_10((i/4, i/2^34, 0, 0),
//   seed)[i % 4]; it is kept iff (r >> 8) >= keep_threshold, where keep_threshold = ceil(p * 2^24), so that
//   P(drop) = p to 24 bits and the decision is exact integer arithmetic on both backends.
//   forward:  y[i] = kept ? x[i] * scale : 0, scale = 1 / (1 - p)     (identity in expectation at test time)
//   backward: dx[i] = kept ? dy[i] * scale : 0
//   mask: uint32 words, bit b of word w is element 32 w + b (1 = kept); ceil(n / 32) words; bits past n are 0.
// Thread mapping: thread t owns elements 4t .. 4t+3, one Philox call for all four. A warp's 32 threads own 128
// elements = 4 mask words; each lane's 4-bit nibble is OR-ed into its word across the 8 lanes that share it
// with three shuffles, and lane 8k writes word k. The loop is warp-uniform (every lane of a warp steps
// through the same 128-element chunks), so the shuffles always see the full warp.
#include "common.cuh"
#include "kernels.h"
#include "random.cuh"

namespace pa {

constexpr int kDropoutThreads = 256;

__global__ void __launch_bounds__(kDropoutThreads)
    dropout_forward_kernel(const float* __restrict__ x, float* __restrict__ y, unsigned* __restrict__ mask, int64_t n,
                           unsigned long long seed, unsigned keep_threshold, float scale) {
    const int lane = threadIdx.x % 32;
    const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
    for (int64_t chunk = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; chunk * 128 < n; chunk += warps) {
        const int64_t quad = chunk * 32 + lane;  // Philox counter: this thread's four elements
        const Philox4 r = philox4x32_10(Philox4{{unsigned(quad), unsigned(quad >> 32), 0u, 0u}}, unsigned(seed),
                                        unsigned(seed >> 32));
        unsigned nibble = 0;
        for (int j = 0; j < 4; ++j) {
            const int64_t i = quad * 4 + j;
            if (i < n) {
                const bool kept = (r.v[j] >> 8) >= keep_threshold;
                y[i] = kept ? x[i] * scale : 0.0f;
                nibble |= unsigned(kept) << j;
            }
        }
        unsigned word = nibble << (4 * (lane % 8));
        word |= __shfl_xor_sync(0xffffffffu, word, 1);
        word |= __shfl_xor_sync(0xffffffffu, word, 2);
        word |= __shfl_xor_sync(0xffffffffu, word, 4);
        const int64_t w = chunk * 4 + lane / 8;
        if (lane % 8 == 0 && w * 32 < n) mask[w] = word;
    }
}

__global__ void __launch_bounds__(kDropoutThreads)
    dropout_backward_kernel(const float* __restrict__ dy, const unsigned* __restrict__ mask, float* __restrict__ dx,
                            int64_t n, float scale) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const bool kept = (mask[i / 32] >> (i % 32)) & 1u;
        dx[i] = kept ? dy[i] * scale : 0.0f;
    }
}

namespace {
unsigned grid_for(int64_t items, int64_t per_block) {
    return unsigned(std::max<int64_t>(1, std::min<int64_t>(4096, (items + per_block - 1) / per_block)));
}
}  // namespace

void dropout_forward(const float* x, float* y, unsigned* mask, int64_t n, unsigned long long seed,
                     unsigned keep_threshold, float scale, Stream stream) {
    if (n <= 0) return;
    PA_LAUNCH(dropout_forward_kernel, grid_for(n, 4 * kDropoutThreads), kDropoutThreads, 0, as_stream(stream), x, y,
              mask, n, seed, keep_threshold, scale);
}

void dropout_backward(const float* dy, const unsigned* mask, float* dx, int64_t n, float scale, Stream stream) {
    if (n <= 0) return;
    PA_LAUNCH(dropout_backward_kernel, grid_for(n, kDropoutThreads), kDropoutThreads, 0, as_stream(stream), dy, mask,
              dx, n, scale);
}

}  // namespace pa
