// Max-pooling over size x size windows at the given stride (the paper's overlapping 3 x 3 / 2), floor mode,
// no padding: P = (H - size) / stride + 1, Q likewise.
//
//   forward:  y[n,c,p,q] = max of x[n,c, p*stride + i, q*stride + j] over 0 <= i, j < size
//   backward: dx[h,w] = sum of dy[p,q] over the windows whose argmax is (h,w)
// The argmax is the first maximum in row-major window order, and a NaN beats every number (the first NaN
// wins), as in pyalexnet/reference.py. NaN propagates, as in PyTorch.
//
// x, dx: (N, C, H, W); y, dy: (N, C, P, Q); float32, contiguous. Thread mapping: forward has one thread per
// output. Backward has one thread per INPUT element, which gathers from the (at most ceil(size/stride)^2)
// windows that cover it: every dx element is written once, by one thread, in a fixed order, so the result is
// deterministic and needs no atomics and no zero-fill. A thread decides "I am this window's argmax" from y:
// its value matches y[p,q] and no earlier element of the window does; only matching elements scan.
#include "common.cuh"
#include "kernels.h"

namespace pa {

constexpr int kPoolThreads = 256;

// Does v take the window's maximum m? (NaN matches NaN.)
__device__ __forceinline__ bool matches(float v, float m) { return v == m || (v != v && m != m); }

// Is (h, w) the first element of the window at (i0, j0) that matches m, in row-major order? Only the elements
// before it are scanned.
__device__ __forceinline__ bool first_match(const float* xs, int W, int i0, int j0, int size, int h, int w, float m) {
    for (int i = i0; i < h; ++i)
        for (int j = j0; j < j0 + size; ++j)
            if (matches(xs[int64_t(i) * W + j], m)) return false;
    for (int j = j0; j < w; ++j)
        if (matches(xs[int64_t(h) * W + j], m)) return false;
    return true;
}

__global__ void __launch_bounds__(kPoolThreads)
    maxpool_forward_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t outputs, int H, int W, int P,
                           int Q, int size, int stride) {
    const int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (o >= outputs) return;
    const int q = int(o % Q), p = int(o / Q % P);
    const int64_t plane = o / (int64_t(P) * Q);
    const float* window = x + plane * H * W + int64_t(p) * stride * W + int64_t(q) * stride;
    float best = window[0];
    for (int i = 0; i < size; ++i)
        for (int j = 0; j < size; ++j) {
            const float v = window[i * W + j];
            if (v > best || (v != v && best == best)) best = v;
        }
    y[o] = best;
}

__global__ void __launch_bounds__(kPoolThreads)
    maxpool_backward_kernel(const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ y,
                            float* __restrict__ dx, int64_t inputs, int H, int W, int P, int Q, int size, int stride) {
    const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (e >= inputs) return;
    const int w = int(e % W), h = int(e / W % H);
    const int64_t plane = e / (int64_t(H) * W);
    const float* xs = x + plane * H * W;
    const float* ys = y + plane * P * Q;
    const float* dys = dy + plane * P * Q;
    const float v = xs[int64_t(h) * W + w];
    // Windows p with p*stride <= h < p*stride + size.
    const int p_lo = h < size ? 0 : (h - size) / stride + 1, p_hi = min(h / stride, P - 1);
    const int q_lo = w < size ? 0 : (w - size) / stride + 1, q_hi = min(w / stride, Q - 1);
    float grad = 0.0f;
    for (int p = p_lo; p <= p_hi; ++p)
        for (int q = q_lo; q <= q_hi; ++q) {
            const float m = ys[int64_t(p) * Q + q];
            const bool first = matches(v, m) && first_match(xs, W, p * stride, q * stride, size, h, w, m);
            if (first) grad += dys[int64_t(p) * Q + q];
        }
    dx[e] = grad;
}

void maxpool_forward(const float* x, float* y, int64_t planes, int H, int W, int size, int stride, Stream stream) {
    const int P = (H - size) / stride + 1, Q = (W - size) / stride + 1;
    const int64_t outputs = planes * P * Q;
    if (outputs <= 0) return;
    PA_LAUNCH(maxpool_forward_kernel, ceil_div(outputs, kPoolThreads), kPoolThreads, 0, as_stream(stream), x, y,
              outputs, H, W, P, Q, size, stride);
}

void maxpool_backward(const float* dy, const float* x, const float* y, float* dx, int64_t planes, int H, int W,
                      int size, int stride, Stream stream) {
    const int P = (H - size) / stride + 1, Q = (W - size) / stride + 1;
    const int64_t inputs = planes * H * W;
    if (inputs <= 0) return;
    PA_LAUNCH(maxpool_backward_kernel, ceil_div(inputs, kPoolThreads), kPoolThreads, 0, as_stream(stream), dy, x, y,
              dx, inputs, H, W, P, Q, size, stride);
}

}  // namespace pa
