// Block-wide reductions built from warp shuffles, in a fixed order, so results are deterministic.
#pragma once

#include "common.cuh"

namespace pa {

// Constants by bit pattern: std::numeric_limits is host-only under nvcc.
__device__ __forceinline__ float negative_infinity() { return __int_as_float(int(0xff800000u)); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// max that lets NaN through (fmaxf would drop it and hide a broken input).
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

struct SumOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxOp {
    __device__ __forceinline__ float operator()(float a, float b) const { return nan_max(a, b); }
};

template <class Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Every thread of the block must call it; every thread gets the result. THREADS is a multiple of 32.
// `scratch` holds at least THREADS / 32 floats of shared memory; it is free again when this returns.
template <int THREADS, class Op>
__device__ float block_reduce(float v, Op op, float identity, float* scratch) {
    static_assert(THREADS % 32 == 0 && THREADS <= 1024, "whole warps only");
    constexpr int WARPS = THREADS / 32;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_reduce(v, op);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < WARPS ? scratch[lane] : identity;
        v = warp_reduce(v, op);
        if (lane == 0) scratch[0] = v;
    }
    __syncthreads();
    v = scratch[0];
    __syncthreads();
    return v;
}

}  // namespace pa
