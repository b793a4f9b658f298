// Fully-connected layer, forward and backward, on our SGEMM (gemm.cu) plus a bias-gradient kernel.
//
//   x (batch, in), w (out, in) as PyTorch stores it, b (out,), y (batch, out)
//   forward:   y  = x w^T + b            GEMM NT, bias (and, when asked, the next layer's ReLU) in the epilogue
//   backward:  dx = dy w                 GEMM NN
//              dw = dy^T x               GEMM TN
//              db = column sums of dy    bias_backward below
// dx, dw and db are overwritten (no accumulation).
#include "common.cuh"
#include "kernels.h"

namespace pa {

// db[c] = sum over rows r of dy[r, c]. One thread per column walks the rows in order: coalesced across
// the warp, deterministic, and no atomics.
__global__ void __launch_bounds__(256) bias_backward_kernel(const float* __restrict__ dy, float* __restrict__ db,
                                                            int rows, int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += dy[int64_t(r) * cols + c];
    db[c] = s;
}

void bias_backward(const float* dy, float* db, int rows, int cols, Stream stream) {
    if (cols <= 0) return;
    PA_LAUNCH(bias_backward_kernel, ceil_div(cols, 256), 256, 0, as_stream(stream), dy, db, rows, cols);
}

void linear_forward(const float* x, const float* w, const float* b, float* y, int batch, int in, int out,
                    Stream stream, bool relu) {
    sgemm(false, true, batch, out, in, 1.0f, x, in, w, in, 0.0f, y, out, b, stream, relu);
}

void linear_backward(const float* dy, const float* x, const float* w, float* dx, float* dw, float* db, int batch,
                     int in, int out, Stream stream) {
    sgemm(false, false, batch, in, out, 1.0f, dy, out, w, in, 0.0f, dx, in, nullptr, stream);
    sgemm(true, false, out, in, batch, 1.0f, dy, out, x, in, 0.0f, dw, in, nullptr, stream);
    bias_backward(dy, db, batch, out, stream);
}

}  // namespace pa
