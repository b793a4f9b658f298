// Single-precision GEMM with a fused epilogue: the engine under the fully-connected layers.
//
//   C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C + bias[n]
//
// Layouts (all row-major): op(A) is A stored (M, K) with row stride lda, or (K, M) when TRANS_A;
// op(B) is B stored (K, N) with row stride ldb, or (N, K) when TRANS_B. The four combinations cover
// y = x w^T (NT), dx = dy w (NN) and dw = dy^T x (TN) without any transpose kernel.
// beta == 0 never reads C (it may hold garbage, NaN included); bias may be null. C is overwritten.
//
// Thread mapping: the 64 x 64 tile engine of tile.cuh (256 threads, 4 x 4 per thread, 16-deep K slices
// double-buffered in shared memory); this file supplies what a thread fetches for each slice.
// Loads are float4 when VEC (every row start 16-byte aligned) and the four elements are in bounds; tiles
// that hang over the matrix edge are zero-filled, so any M, N, K works.
#include "common.cuh"
#include "kernels.h"
#include "tile.cuh"

namespace pa {

template <int BK, bool TRANS_A, bool TRANS_B, bool VEC>
__global__ void __launch_bounds__(kTileThreads)
    sgemm_kernel(int M, int N, int K, float alpha, const float* __restrict__ A, int lda, const float* __restrict__ B,
                 int ldb, float beta, float* __restrict__ C, int ldc, const float* __restrict__ bias) {
    constexpr int BM = kTileM, BN = kTileN, TM = 4, TN = 4;
    static_assert(BM * BK == 4 * kTileThreads && BN * BK == 4 * kTileThreads,
                  "each thread stages one float4 of A and of B");
    __shared__ __align__(16) TileBuffers<BK> tiles;

    const int tid = threadIdx.x;
    const int ty = tid / 16, tx = tid % 16;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

    // Which four elements this thread stages: (row, col) of the stored matrix, four consecutive along col.
    const int a_row = TRANS_A ? tid / (BM / 4) : tid / (BK / 4);
    const int a_col = TRANS_A ? tid % (BM / 4) * 4 : tid % (BK / 4) * 4;
    const int b_row = TRANS_B ? tid / (BK / 4) : tid / (BN / 4);
    const int b_col = TRANS_B ? tid % (BK / 4) * 4 : tid % (BN / 4) * 4;

    // Fetch four consecutive elements of a row-major matrix, zero outside [rows, cols).
    auto fetch4 = [](const float* P, int ld, int rows, int cols, int r, int c, float v[4]) {
        if (VEC && r < rows && c + 3 < cols) {
            const float4 q = *reinterpret_cast<const float4*>(P + int64_t(r) * ld + c);
            v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
        } else {
            for (int j = 0; j < 4; ++j) v[j] = (r < rows && c + j < cols) ? P[int64_t(r) * ld + c + j] : 0.0f;
        }
    };
    float a_stage[4], b_stage[4];
    auto fetch_slice = [&](int k0) {
        if (TRANS_A) fetch4(A, lda, K, M, k0 + a_row, m0 + a_col, a_stage);
        else fetch4(A, lda, M, K, m0 + a_row, k0 + a_col, a_stage);
        if (TRANS_B) fetch4(B, ldb, N, K, n0 + b_row, k0 + b_col, b_stage);
        else fetch4(B, ldb, K, N, k0 + b_row, n0 + b_col, b_stage);
    };
    auto store_slice = [&](int buf) {
        for (int j = 0; j < 4; ++j) {
            if (TRANS_A) tiles.a[buf][a_row][a_col + j] = a_stage[j];
            else tiles.a[buf][a_col + j][a_row] = a_stage[j];
            if (TRANS_B) tiles.b[buf][b_col + j][b_row] = b_stage[j];
            else tiles.b[buf][b_row][b_col + j] = b_stage[j];
        }
    };

    float acc[TM][TN] = {};
    tile_k_loop(K, tiles, fetch_slice, store_slice, acc);

    for (int i = 0; i < TM; ++i) {
        const int m = m0 + ty * TM + i;
        if (m >= M) break;
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + tx * TN + j;
            if (n >= N) break;
            float* c = C + int64_t(m) * ldc + n;
            float v = alpha * acc[i][j];
            if (beta != 0.0f) v += beta * *c;
            if (bias) v += bias[n];
            *c = v;
        }
    }
}

namespace {

constexpr int kBK = 16;

template <bool TRANS_A, bool TRANS_B, bool VEC>
void launch_sgemm(int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb, float beta,
                  float* C, int ldc, const float* bias, cudaStream_t stream) {
    const dim3 grid(ceil_div(N, kTileN), ceil_div(M, kTileM));
    PA_LAUNCH((sgemm_kernel<kBK, TRANS_A, TRANS_B, VEC>), grid, kTileThreads, 0, stream, M, N, K, alpha, A, lda, B,
              ldb, beta, C, ldc, bias);
}

template <bool TRANS_A, bool TRANS_B>
void launch_sgemm(bool vec, int M, int N, int K, float alpha, const float* A, int lda, const float* B, int ldb,
                  float beta, float* C, int ldc, const float* bias, cudaStream_t stream) {
    if (vec) launch_sgemm<TRANS_A, TRANS_B, true>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, stream);
    else launch_sgemm<TRANS_A, TRANS_B, false>(M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, stream);
}

}  // namespace

void sgemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
           int ldb, float beta, float* C, int ldc, const float* bias, Stream stream) {
    if (M <= 0 || N <= 0) return;
    if (ceil_div(M, kTileM) > 65535u)
        throw KernelError("sgemm: M = " + std::to_string(M) + " exceeds the grid's y limit (65535 tiles of 64 rows)");
    const bool vec = aligned16(A) && aligned16(B) && lda % 4 == 0 && ldb % 4 == 0;
    const cudaStream_t s = as_stream(stream);
    if (!trans_a && !trans_b) launch_sgemm<false, false>(vec, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, s);
    else if (!trans_a && trans_b) launch_sgemm<false, true>(vec, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, s);
    else if (trans_a && !trans_b) launch_sgemm<true, false>(vec, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, s);
    else launch_sgemm<true, true>(vec, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, s);
}

}  // namespace pa
