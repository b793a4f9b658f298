// ReLU, forward and backward, as a pair of elementwise functors over any number of elements.
//
//   forward:  y = max(x, 0), except that NaN stays NaN (fmaxf would turn it into 0 and hide it).
//   backward: dx = dy where y > 0, else 0. It reads y, the forward output, rather than x: the network keeps
//             activations after ReLU anyway, and y > 0 exactly where x > 0.
// Both overwrite their output and may run in place (out == an input).
#include "elementwise.cuh"
#include "kernels.h"

namespace pa {

struct ReluForward {
    __device__ __forceinline__ float operator()(float x, float) const { return x < 0.0f ? 0.0f : x; }
};

struct ReluBackward {
    __device__ __forceinline__ float operator()(float dy, float y) const { return y > 0.0f ? dy : 0.0f; }
};

void relu_forward(const float* x, float* y, int64_t n, Stream stream) {
    map2(x, x, y, n, ReluForward{}, as_stream(stream));
}

void relu_backward(const float* dy, const float* y, float* dx, int64_t n, Stream stream) {
    map2(dy, y, dx, n, ReluBackward{}, as_stream(stream));
}

}  // namespace pa
