// Single-precision GEMM with a fused epilogue: the engine under the fully-connected layers.
//
//   C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C + bias[n]
//
// Layouts (all row-major): op(A) is A stored (M, K) with row stride lda, or (K, M) when TRANS_A;
// op(B) is B stored (K, N) with row stride ldb, or (N, K) when TRANS_B. The four combinations cover
// y = x w^T (NT), dx = dy w (NN) and dw = dy^T x (TN) without any transpose kernel.
// beta == 0 never reads C (it may hold garbage, NaN included); bias may be null. C is overwritten.
//
// Thread mapping: the 128 x 128 tile engine of tile.cuh (256 threads, 8 x 8 per thread, 16-deep K slices
// double-buffered in shared memory); this file supplies what a thread fetches for each slice. A grid of too few
// tiles for the card (the FC layers at batch 128: fc6's forward has 128) splits K (tile.cuh, SplitK): each range
// writes its partial C to a workspace and sgemm_splitk_reduce adds them in range order and applies the epilogue.
// Loads are float4 when VEC (every row start 16-byte aligned) and the four elements are in bounds; tiles
// that hang over the matrix edge are zero-filled, so any M, N, K works. With VEC an operand stored (K, rows)
// (A when TRANS_A, B when !TRANS_B: dx = dy w's w, both of dw = dy^T x) is copied by cp.async (async_copy.cuh)
// straight into its shared buffer: no registers, no shared stores.
#include "common.cuh"
#include "kernels.h"
#include "tile.cuh"

namespace pa {

// Grid layer z is K range z of `split`. No split: C = the epilogue of the product. A split: the raw partial
// product of range z to partial + z * split.stride, an M x N row-major matrix.
// Staging (tile.cuh): an operand stored with K contiguous (A when !TRANS_A, B when TRANS_B) takes the
// kk-contiguous layout, one stored (K, rows) the row-contiguous one.
template <bool TRANS_A, bool TRANS_B, bool VEC>
__global__ void __launch_bounds__(kTileThreads, kTileBlocksPerSm)
    sgemm_kernel(int M, int N, int K, SplitK split, float alpha, const float* __restrict__ A, int lda,
                 const float* __restrict__ B, int ldb, float beta, float* __restrict__ C, int ldc,
                 const float* __restrict__ bias, bool relu, float* __restrict__ partial) {
    constexpr int BM = 128, BN = kTileN, TM = BM / 16, TN = BN / 16;
    using KStageA = KContiguousStage<BM>;
    using RStageA = RowContiguousStage<BM>;
    using KStageB = KContiguousStage<BN>;
    using RStageB = RowContiguousStage<BN>;
    __shared__ __align__(16) TileBuffers<BM> tiles;

    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int part = blockIdx.z, k_begin = split.begin(part), k_end = split.end(part, K);

    // Fetch four consecutive elements of a row-major matrix, zero outside [rows, cols).
    auto fetch4 = [](const float* P, int ld, int rows, int cols, int r, int c, float v[4]) {
        if (VEC && r < rows && c + 3 < cols) {
            const float4 q = *reinterpret_cast<const float4*>(P + int64_t(r) * ld + c);
            v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
        } else {
            for (int j = 0; j < 4; ++j) v[j] = (r < rows && c + j < cols) ? P[int64_t(r) * ld + c + j] : 0.0f;
        }
    };
    // The same four elements copied with cp.async straight into shared memory (VEC: the source is 16-byte
    // aligned); past the edge it reads only what is in bounds and zero-fills the rest.
    auto copy4 = [](float* dst, const float* P, int ld, int rows, int cols, int r, int c) {
        const int valid = r < rows ? max(0, min(4, cols - c)) : 0;
        cp_async<16>(dst, valid ? P + int64_t(r) * ld + c : P, 4 * valid);
    };
    // A row-contiguous operand needs no transpose on its way to shared memory: with VEC it goes by cp.async.
    constexpr bool ASYNC_A = VEC && TRANS_A, ASYNC_B = VEC && !TRANS_B;
    float a_stage[BM / 64][4], b_stage[BN / 64][4];
    auto fetch_slice = [&](int k0, int buf) {
        for (int g = 0; g < BM / 64; ++g) {
            if (ASYNC_A) copy4(&tiles.a[buf][RStageA::kk(g)][RStageA::row()], A, lda, k_end, M, k0 + RStageA::kk(g),
                               m0 + RStageA::row());
            else if (TRANS_A) fetch4(A, lda, k_end, M, k0 + RStageA::kk(g), m0 + RStageA::row(), a_stage[g]);
            else fetch4(A, lda, M, k_end, m0 + KStageA::row(g), k0 + KStageA::kk(), a_stage[g]);
        }
        for (int g = 0; g < BN / 64; ++g) {
            if (ASYNC_B) copy4(&tiles.b[buf][RStageB::kk(g)][RStageB::row()], B, ldb, k_end, N, k0 + RStageB::kk(g),
                               n0 + RStageB::row());
            else if (TRANS_B) fetch4(B, ldb, N, k_end, n0 + KStageB::row(g), k0 + KStageB::kk(), b_stage[g]);
            else fetch4(B, ldb, k_end, N, k0 + RStageB::kk(g), n0 + RStageB::row(), b_stage[g]);
        }
    };
    auto store_slice = [&](int buf) {
        for (int g = 0; g < BM / 64; ++g) {
            if (ASYNC_A) continue;  // already on its way (fetch_slice)
            if (TRANS_A) {
                *reinterpret_cast<float4*>(&tiles.a[buf][RStageA::kk(g)][RStageA::row()]) =
                    make_float4(a_stage[g][0], a_stage[g][1], a_stage[g][2], a_stage[g][3]);
            } else {
                for (int j = 0; j < 4; ++j) tiles.a[buf][KStageA::kk() + j][KStageA::row(g)] = a_stage[g][j];
            }
        }
        for (int g = 0; g < BN / 64; ++g) {
            if (ASYNC_B) continue;
            if (TRANS_B) {
                for (int j = 0; j < 4; ++j) tiles.b[buf][KStageB::kk() + j][KStageB::row(g)] = b_stage[g][j];
            } else {
                *reinterpret_cast<float4*>(&tiles.b[buf][RStageB::kk(g)][RStageB::row()]) =
                    make_float4(b_stage[g][0], b_stage[g][1], b_stage[g][2], b_stage[g][3]);
            }
        }
    };

    float acc[TM][TN] = {};
    if constexpr (ASYNC_A || ASYNC_B) {
        tile_k_loop<BM, true>(k_begin, k_end, tiles, fetch_slice, store_slice, acc);
    } else {
        tile_k_loop(k_begin, k_end, tiles, [&](int k0) { fetch_slice(k0, 0); }, store_slice, acc);
    }

    // Unrolled, so that acc stays in registers (a loop nvcc leaves rolled indexes it at run time: local memory).
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + tile_row(i);
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + tile_col(j);
            if (n >= N) continue;
            if (split.count > 1) {
                partial[part * split.stride + int64_t(m) * N + n] = acc[i][j];
                continue;
            }
            float* c = C + int64_t(m) * ldc + n;
            float v = alpha * acc[i][j];
            if (beta != 0.0f) v += beta * *c;
            if (bias) v += bias[n];
            *c = relu && v < 0.0f ? 0.0f : v;  // ReLU as relu_forward: NaN stays
        }
    }
}

// The split product's second half: C = alpha (sum of the partials, in range order) + beta C + bias, as the
// unsplit kernel's epilogue computes it.
__global__ void __launch_bounds__(256)
    sgemm_splitk_reduce(const float* __restrict__ partial, int splits, long long stride, int M, int N, float alpha,
                        float beta, float* __restrict__ C, int ldc, const float* __restrict__ bias, bool relu) {
    const int64_t e = blockIdx.x * int64_t(256) + threadIdx.x;
    if (e >= int64_t(M) * N) return;
    const int m = int(e / N), n = int(e - int64_t(m) * N);
    float sum = 0.0f;
    for (int z = 0; z < splits; ++z) sum += partial[z * stride + e];
    float* c = C + int64_t(m) * ldc + n;
    float v = alpha * sum;
    if (beta != 0.0f) v += beta * *c;
    if (bias) v += bias[n];
    *c = relu && v < 0.0f ? 0.0f : v;
}

namespace {

constexpr int kBK = kTileBK, kBM = 128;

template <bool TRANS_A, bool TRANS_B, bool VEC>
void launch_sgemm(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float beta,
                  float* C, int ldc, const float* bias, bool relu, cudaStream_t stream) {
    const unsigned grid_x = ceil_div(N, kTileN), grid_y = ceil_div(M, kBM);
    SplitK split = choose_split_k((long long)grid_x * grid_y, 1, K, kBK, sm_count());
    split.stride = split.count > 1 ? (long long)M * N : 0;
    Scratch workspace(size_t(split.count > 1 ? split.count : 0) * size_t(split.stride) * sizeof(float), stream);
    const dim3 grid(grid_x, grid_y, unsigned(split.count));
    PA_LAUNCH((sgemm_kernel<TRANS_A, TRANS_B, VEC>), grid, kTileThreads, 0, stream, M, N, K, split, alpha, A, lda,
              B, ldb, beta, C, ldc, bias, relu, workspace.floats());
    if (split.count > 1)
        PA_LAUNCH(sgemm_splitk_reduce, ceil_div((long long)M * N, 256), 256, 0, stream, workspace.floats(), split.count,
                  split.stride, M, N, alpha, beta, C, ldc, bias, relu);
}

template <bool TRANS_A, bool TRANS_B>
void launch_sgemm(bool vec, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
                  float beta, float* C, int ldc, const float* bias, bool relu, cudaStream_t stream) {
    if (vec) launch_sgemm<TRANS_A, TRANS_B, true>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, relu, stream);
    else launch_sgemm<TRANS_A, TRANS_B, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, relu, stream);
}

}  // namespace

std::array<int, 2> split_k_plan(long long tiles, int layers, int K, int bk, int sms) {
    const SplitK split = choose_split_k(tiles, layers, K, bk, sms);
    return {split.count, split.count > 1 ? split.chunk : K};
}

void sgemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
           int ldb, float beta, float* C, int ldc, const float* bias, Stream stream, bool relu) {
    if (M <= 0 || N <= 0) return;
    if (ceil_div(M, kBM) > 65535u)
        throw KernelError("sgemm: M = " + std::to_string(M) + " exceeds the grid's y limit (65535 tiles of 128 rows)");
    const bool vec = aligned16(A) && aligned16(B) && lda % 4 == 0 && ldb % 4 == 0;
    const cudaStream_t s = as_stream(stream);
    if (!trans_a && !trans_b)
        launch_sgemm<false, false>(vec, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, relu, s);
    else if (!trans_a && trans_b)
        launch_sgemm<false, true>(vec, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, relu, s);
    else if (trans_a && !trans_b)
        launch_sgemm<true, false>(vec, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, relu, s);
    else
        launch_sgemm<true, true>(vec, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, relu, s);
}

}  // namespace pa
