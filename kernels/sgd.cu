// The paper's SGD update with momentum and weight decay (Krizhevsky et al. 2012, section 5), in place:
//
//   v <- momentum * v - (weight_decay * lr) * w - lr * dw
//   w <- w + v
//
// w, dw, v: n floats each; w and v are updated, dw is read. Thread mapping: a grid-stride loop over
// float4s when all three pointers are 16-byte aligned (the remainder, and unaligned arrays, one float
// at a time).
#include "common.cuh"
#include "kernels.h"

namespace pa {

struct SgdStep {
    float lr, momentum, decay;  // decay = weight_decay * lr, folded once on the host
    __device__ __forceinline__ void operator()(float& w, float dw, float& v) const {
        v = momentum * v - decay * w - lr * dw;
        w = w + v;
    }
};

__global__ void sgd_update_vec4(float4* __restrict__ w, const float4* __restrict__ dw, float4* __restrict__ v,
                                int64_t n4, SgdStep step) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
        float4 wi = w[i], vi = v[i];
        const float4 gi = dw[i];
        step(wi.x, gi.x, vi.x);
        step(wi.y, gi.y, vi.y);
        step(wi.z, gi.z, vi.z);
        step(wi.w, gi.w, vi.w);
        w[i] = wi;
        v[i] = vi;
    }
}

__global__ void sgd_update_scalar(float* __restrict__ w, const float* __restrict__ dw, float* __restrict__ v,
                                  int64_t begin, int64_t n, SgdStep step) {
    for (int64_t i = begin + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        step(w[i], dw[i], v[i]);
}

void sgd_update(float* w, const float* dw, float* v, int64_t n, float lr, float momentum, float weight_decay,
                Stream stream) {
    constexpr int threads = 256;
    constexpr int64_t max_blocks = 4096;
    const SgdStep step{lr, momentum, weight_decay * lr};
    const cudaStream_t s = as_stream(stream);
    int64_t done = 0;
    if (aligned16(w) && aligned16(dw) && aligned16(v) && n >= 4) {
        const int64_t n4 = n / 4;
        PA_LAUNCH(sgd_update_vec4, unsigned(std::min<int64_t>(max_blocks, (n4 + threads - 1) / threads)), threads, 0, s,
                  reinterpret_cast<float4*>(w), reinterpret_cast<const float4*>(dw), reinterpret_cast<float4*>(v), n4,
                  step);
        done = n4 * 4;
    }
    if (done < n)
        PA_LAUNCH(sgd_update_scalar, unsigned(std::min<int64_t>(max_blocks, (n - done + threads - 1) / threads)), threads,
                  0, s, w, dw, v, done, n, step);
}

}  // namespace pa
