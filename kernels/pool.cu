// Max-pooling over size x size windows at the given stride (the paper's overlapping 3 x 3 / 2), floor mode,
// no padding: P = (H - size) / stride + 1, Q likewise.
//
//   forward:  y[n,c,p,q] = max of x[n,c, p*stride + i, q*stride + j] over 0 <= i, j < size
//   backward: dx[h,w] = sum of dy[p,q] over the windows whose argmax is (h,w); with `relu` also the ReLU's
//             derivative where a ReLU made x (AlexNet's relu -> pool): 0 wherever x is not > 0 (no scan there)
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
                            float* __restrict__ dx, int64_t inputs, int H, int W, int P, int Q, int size, int stride,
                            bool relu) {
    const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (e >= inputs) return;
    const int w = int(e % W), h = int(e / W % H);
    const int64_t plane = e / (int64_t(H) * W);
    const float* xs = x + plane * H * W;
    const float* ys = y + plane * P * Q;
    const float* dys = dy + plane * P * Q;
    const float v = xs[int64_t(h) * W + w];
    if (relu && !(v > 0.0f)) {  // the ReLU's derivative, as relu_backward has it: dy where y > 0, else 0
        dx[e] = 0.0f;
        return;
    }
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

// Adaptive average pooling, PyTorch's AdaptiveAvgPool2d: the output size is given and each output cell averages
// the input rows h0(i) .. h1(i) - 1 with h0(i) = floor(i H / OH), h1(i) = ceil((i + 1) H / OH), columns likewise.
// Windows may overlap (H not a multiple of OH) and repeat (H < OH: several cells average the same rows).
//
//   forward:  y[n,c,i,j] = sum of x[n,c,h,w] over the window / (window rows * window columns)
//   backward: dx[h,w] = sum over the cells (i,j) whose windows contain (h,w) of dy[i,j] / their window size
// The cells whose windows contain row h are exactly i in [floor(h OH / H), ceil((h + 1) OH / H) - 1]: the same
// formula with the roles of H and OH swapped, which is why one helper serves both directions.
//
// x, dx: (N, C, H, W); y, dy: (N, C, OH, OW); float32, contiguous; H, W, OH, OW >= 1. Thread mapping: forward has
// one thread per output cell. Backward has one thread per INPUT element that gathers from the cells covering it,
// in a fixed order: each dx element is written once, so the result is deterministic without atomics or a
// zero-fill. Products such as i * H are formed in 64 bits: both factors may be large.

// [begin, end) of the window of cell i when `from` rows pool into `to` cells.
__device__ __forceinline__ int window_begin(int i, int from, int to) { return int(int64_t(i) * from / to); }
__device__ __forceinline__ int window_end(int i, int from, int to) {
    return int((int64_t(i + 1) * from + to - 1) / to);
}

__global__ void __launch_bounds__(kPoolThreads)
    adaptive_avgpool_forward_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t outputs, int H, int W,
                                    int OH, int OW) {
    const int64_t o = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (o >= outputs) return;
    const int j = int(o % OW), i = int(o / OW % OH);
    const int64_t plane = o / (int64_t(OH) * OW);
    const int h0 = window_begin(i, H, OH), h1 = window_end(i, H, OH);
    const int w0 = window_begin(j, W, OW), w1 = window_end(j, W, OW);
    const float* xs = x + plane * H * W;
    float sum = 0.0f;
    for (int h = h0; h < h1; ++h)
        for (int w = w0; w < w1; ++w) sum += xs[int64_t(h) * W + w];
    // Divide by the count, as PyTorch does, rather than multiply by its reciprocal: 6 -> 6 stays the identity.
    y[o] = sum / float(int64_t(h1 - h0) * (w1 - w0));
}

__global__ void __launch_bounds__(kPoolThreads)
    adaptive_avgpool_backward_kernel(const float* __restrict__ dy, float* __restrict__ dx, int64_t inputs, int H,
                                     int W, int OH, int OW) {
    const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (e >= inputs) return;
    const int w = int(e % W), h = int(e / W % H);
    const int64_t plane = e / (int64_t(H) * W);
    const float* dys = dy + plane * OH * OW;
    const int i0 = window_begin(h, OH, H), i1 = window_end(h, OH, H);
    const int j0 = window_begin(w, OW, W), j1 = window_end(w, OW, W);
    float grad = 0.0f;
    for (int i = i0; i < i1; ++i) {
        const int rows = window_end(i, H, OH) - window_begin(i, H, OH);
        for (int j = j0; j < j1; ++j) {
            const int cols = window_end(j, W, OW) - window_begin(j, W, OW);
            grad += dys[int64_t(i) * OW + j] / float(int64_t(rows) * cols);
        }
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
                      int size, int stride, Stream stream, bool relu) {
    const int P = (H - size) / stride + 1, Q = (W - size) / stride + 1;
    const int64_t inputs = planes * H * W;
    if (inputs <= 0) return;
    PA_LAUNCH(maxpool_backward_kernel, ceil_div(inputs, kPoolThreads), kPoolThreads, 0, as_stream(stream), dy, x, y,
              dx, inputs, H, W, P, Q, size, stride, relu);
}

void adaptive_avgpool_forward(const float* x, float* y, int64_t planes, int H, int W, int OH, int OW, Stream stream) {
    const int64_t outputs = planes * OH * OW;
    if (outputs <= 0) return;
    PA_LAUNCH(adaptive_avgpool_forward_kernel, ceil_div(outputs, kPoolThreads), kPoolThreads, 0, as_stream(stream), x,
              y, outputs, H, W, OH, OW);
}

void adaptive_avgpool_backward(const float* dy, float* dx, int64_t planes, int H, int W, int OH, int OW,
                               Stream stream) {
    const int64_t inputs = planes * H * W;
    if (inputs <= 0) return;
    PA_LAUNCH(adaptive_avgpool_backward_kernel, ceil_div(inputs, kPoolThreads), kPoolThreads, 0, as_stream(stream), dy,
              dx, inputs, H, W, OH, OW);
}

}  // namespace pa
