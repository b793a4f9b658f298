// The paper's SGD update with momentum and weight decay (Krizhevsky et al. 2012, section 5), in place:
//
//   v <- momentum * v - (weight_decay * lr) * w - lr * dw
//   w <- w + v
//
// w, dw, v: n floats each; w and v are updated, dw is read. Thread mapping: a grid-stride loop over
// float4s when all three pointers are 16-byte aligned (the remainder, and unaligned arrays, one float
// at a time).
//
// sgd_update_many updates a whole network in one launch instead of one (or two) per tensor: the tensors'
// chunks of four elements are numbered one after another, and a grid-stride loop over that numbering finds
// each chunk's tensor by walking forward from the previous one (a thread's chunks only increase). A chunk is
// one float4 where the tensor's three arrays are 16-byte aligned and it is whole, else up to four floats.
#include <algorithm>

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

// A launch's tensors; chunk i belongs to tensor t where first[t] <= i < first[t + 1] (first[count]: all chunks).
struct SgdTable {
    SgdTensor tensor[kSgdTensorsPerLaunch];
    int64_t first[kSgdTensorsPerLaunch + 1];
    unsigned aligned;  // bit t: tensor t's three arrays are 16-byte aligned
    int count;
};

__global__ void __launch_bounds__(256) sgd_update_multi(SgdTable table, SgdStep step) {
    const int64_t chunks = table.first[table.count];
    int t = 0;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < chunks; i += int64_t(gridDim.x) * blockDim.x) {
        while (table.first[t + 1] <= i) ++t;
        const SgdTensor& x = table.tensor[t];
        const int64_t e = (i - table.first[t]) * 4;
        if ((table.aligned >> t & 1u) && e + 4 <= x.n) {
            float4* w = reinterpret_cast<float4*>(x.w + e);
            float4* v = reinterpret_cast<float4*>(x.v + e);
            float4 wi = *w, vi = *v;
            const float4 gi = *reinterpret_cast<const float4*>(x.dw + e);
            step(wi.x, gi.x, vi.x);
            step(wi.y, gi.y, vi.y);
            step(wi.z, gi.z, vi.z);
            step(wi.w, gi.w, vi.w);
            *w = wi;
            *v = vi;
        } else {
            for (int64_t j = e; j < e + 4 && j < x.n; ++j) step(x.w[j], x.dw[j], x.v[j]);
        }
    }
}

void sgd_update_many(const SgdTensor* tensors, int count, float lr, float momentum, float weight_decay,
                     Stream stream) {
    constexpr int threads = 256;
    constexpr int64_t max_blocks = 4096;
    const SgdStep step{lr, momentum, weight_decay * lr};
    for (int begin = 0; begin < count; begin += kSgdTensorsPerLaunch) {
        SgdTable table{};
        table.count = std::min(kSgdTensorsPerLaunch, count - begin);
        for (int t = 0; t < table.count; ++t) {
            const SgdTensor& x = tensors[begin + t];
            table.tensor[t] = x;
            table.first[t + 1] = table.first[t] + (x.n + 3) / 4;
            if (aligned16(x.w) && aligned16(x.dw) && aligned16(x.v)) table.aligned |= 1u << t;
        }
        const int64_t chunks = table.first[table.count];
        if (chunks == 0) continue;
        PA_LAUNCH(sgd_update_multi, unsigned(std::min<int64_t>(max_blocks, (chunks + threads - 1) / threads)), threads,
                  0, as_stream(stream), table, step);
    }
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
