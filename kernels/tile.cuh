// The tile engine shared by the SGEMM (gemm.cu) and the implicit-GEMM convolution (conv.cu).
//
// A block of 256 threads computes a 64 x 64 tile of C = A B; thread (ty, tx) = (t / 16, t % 16) owns the 4 x 4
// register tile at rows 4 ty.., columns 4 tx... K is walked in BK-deep slices staged through two shared
// buffers, both operands stored k-major (As[k][m], Bs[k][n]) so each k reads one float4 of A (broadcast across
// the 16 threads of a row of the block) and one float4 of B (16 consecutive float4s: no bank conflicts). The
// next slice is fetched into registers while the current one is multiplied, then stored into the other buffer:
// buffer (s + 1) & 1 is written only after the barrier that ended slice s - 1, its last reader, so one barrier
// per slice suffices. What a thread fetches and where it stores it is the caller's: the two functors.
#pragma once

#include "common.cuh"

namespace pa {

constexpr int kTileM = 64, kTileN = 64, kTileThreads = 256, kTilePad = 4;  // the pad keeps rows 16-byte aligned

template <int BK>
struct TileBuffers {
    float a[2][BK][kTileM + kTilePad];
    float b[2][BK][kTileN + kTilePad];
};

// fetch(k0): load slice [k0, k0 + BK) into the caller's registers; store(buf): write them into buffer `buf`.
template <int BK, class Fetch, class Store>
__device__ __forceinline__ void tile_k_loop(int K, TileBuffers<BK>& s, Fetch&& fetch, Store&& store, float (&acc)[4][4]) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    const int slices = (K + BK - 1) / BK;
    if (slices > 0) {
        fetch(0);
        store(0);
    }
    __syncthreads();
    for (int sl = 0; sl < slices; ++sl) {
        const int cur = sl & 1;
        if (sl + 1 < slices) fetch((sl + 1) * BK);
        for (int k = 0; k < BK; ++k) {
            const float4 a = *reinterpret_cast<const float4*>(&s.a[cur][k][ty * 4]);
            const float4 b = *reinterpret_cast<const float4*>(&s.b[cur][k][tx * 4]);
            const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
        }
        if (sl + 1 < slices) store(cur ^ 1);
        __syncthreads();
    }
}

}  // namespace pa
