// A generic elementwise map, in the manner of cuda-convnet's paired operators: an op family supplies small
// functors (forward, gradient) and this file launches them over n elements.
//
// out[i] = op(a[i], b[i]) for i < n (b may be unused by the op: pass a again).
// Thread mapping: a grid-stride loop; each step handles one float4 when every pointer is 16-byte aligned,
// else one float. No __restrict__: ops may run in place. The grid is capped because a grid-stride loop needs
// no more than enough blocks to fill the device.
#pragma once

#include "common.cuh"

namespace pa {

template <class Op>
__global__ void map2_vec4(const float4* a, const float4* b, float4* out,
                          int64_t n4, Op op) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
        const float4 x = a[i], y = b[i];
        out[i] = make_float4(op(x.x, y.x), op(x.y, y.y), op(x.z, y.z), op(x.w, y.w));
    }
}

template <class Op>
__global__ void map2_scalar(const float* a, const float* b, float* out,
                            int64_t begin, int64_t n, Op op) {
    for (int64_t i = begin + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        out[i] = op(a[i], b[i]);
}

template <class Op>
void map2(const float* a, const float* b, float* out, int64_t n, Op op, cudaStream_t stream) {
    constexpr int threads = 256;
    constexpr int64_t max_blocks = 4096;
    if (n <= 0) return;
    int64_t done = 0;
    if (aligned16(a) && aligned16(b) && aligned16(out)) {
        const int64_t n4 = n / 4;
        if (n4 > 0) {
            const unsigned blocks = unsigned(std::min<int64_t>(max_blocks, (n4 + threads - 1) / threads));
            PA_LAUNCH((map2_vec4<Op>), blocks, threads, 0, stream, reinterpret_cast<const float4*>(a),
                      reinterpret_cast<const float4*>(b), reinterpret_cast<float4*>(out), n4, op);
        }
        done = n4 * 4;
    }
    if (done < n) {
        const unsigned blocks = unsigned(std::min<int64_t>(max_blocks, (n - done + threads - 1) / threads));
        PA_LAUNCH((map2_scalar<Op>), blocks, threads, 0, stream, a, b, out, done, n, op);
    }
}

}  // namespace pa
