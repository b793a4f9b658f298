// Local response normalisation across channels, the paper's formula (Krizhevsky et al. 2012, section 3.3):
//
//   d[c] = k + alpha * sum_{c' = c - n/2 .. c + n/2, 0 <= c' < C} x[c']^2          (n odd)
//   forward:  y[c] = x[c] * d[c]^-beta
//   backward: dx[c] = dy[c] d[c]^-beta - 2 alpha beta x[c] sum_{j = c - n/2 .. c + n/2} dy[j] y[j] / d[j]
//             (dy[j] x[j] d[j]^(-beta-1) written as dy[j] y[j] / d[j]: one division instead of a power)
// alpha is NOT divided by n: PyTorch, Caffe and cuda-convnet's config parser divide it, so
// torch.nn.functional.local_response_norm(x, n, alpha * n, beta, k) is this function.
//
// x, y, dy, dx: NCHW float32. Thread mapping: one thread per (image, pixel) walks the C channels; a warp's
// threads are consecutive pixels, so each channel step is one coalesced row. Window sums slide: each step
// adds the square entering the window and subtracts the one leaving it, instead of summing n squares.
// Backward keeps nothing from the forward pass but y: it recomputes d with sliding sums, running three
// windows in step (d at c for dx[c], at c + n/2 for the term entering the dy*y/d window, at c - n/2 - 1 for
// the term leaving it). When the square leaving a window dominated it, that window is summed afresh, so a
// huge activation does not leave its rounding error in the channels after it.
#include "common.cuh"
#include "kernels.h"

namespace pa {

constexpr int kLrnThreads = 256;

// The running sum of x^2 over [c - half, c + half] as c advances one channel per step() call.
struct SquareWindow {
    const float* x;  // this pixel's channel 0; channels are `plane` floats apart
    int64_t plane;
    int C, half, c;
    float sum;

    __device__ float sq(int ch) const {
        if (ch < 0 || ch >= C) return 0.0f;
        const float v = x[ch * plane];
        return v * v;
    }
    // Starts at channel `start` (which may lie outside [0, C)).
    __device__ SquareWindow(const float* x_, int64_t plane_, int C_, int half_, int start)
        : x(x_), plane(plane_), C(C_), half(half_), c(start), sum(0.0f) {
        sum = direct();
    }
    __device__ float direct() const {
        float s = 0.0f;
        for (int ch = c - half; ch <= c + half; ++ch) s += sq(ch);
        return s;
    }
    __device__ void step() {
        ++c;
        const float leaving = sq(c - half - 1);
        const float slid = sum + sq(c + half) - leaving;
        // Subtracting a square that dominated the window leaves its rounding error behind (even a negative
        // sum): then, and only then, sum the window afresh. Below this ratio the error stays under ~16 ulp.
        // Written so that NaN fails the test too: an inf or NaN leaving the window (inf - inf is NaN, and NaN
        // never subtracts out) must not poison the channels after it.
        sum = leaving <= 16.0f * slid ? slid : direct();
    }
};

__global__ void __launch_bounds__(kLrnThreads)
    lrn_forward_kernel(const float* __restrict__ x, float* __restrict__ y, int64_t pixels, int C, int64_t plane,
                       int half, float alpha, float beta, float k) {
    const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (t >= pixels) return;
    const int64_t base = (t / plane) * C * plane + t % plane;  // (image, pixel) -> channel 0
    SquareWindow win(x + base, plane, C, half, 0);
    for (int c = 0; c < C; ++c, win.step()) {
        const int64_t i = base + c * plane;
        y[i] = x[i] * powf(k + alpha * win.sum, -beta);
    }
}

__global__ void __launch_bounds__(kLrnThreads)
    lrn_backward_kernel(const float* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ y,
                        float* __restrict__ dx, int64_t pixels, int C, int64_t plane, int half, float alpha, float beta,
                        float k) {
    const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (t >= pixels) return;
    const int64_t base = (t / plane) * C * plane + t % plane;
    // dy[j] y[j] / d[j], zero outside the channels.
    auto term = [&](int j, float window_sum) {
        if (j < 0 || j >= C) return 0.0f;
        const int64_t i = base + j * plane;
        return dy[i] * y[i] / (k + alpha * window_sum);
    };
    SquareWindow here(x + base, plane, C, half, 0);               // d at c
    SquareWindow entering(x + base, plane, C, half, half);        // d at c + half
    SquareWindow leaving(x + base, plane, C, half, -half - 1);    // d at c - half - 1
    // The sum of term(j) over j in [c - half, c + half], summed directly (each d[j] from scratch): for a window
    // that an inf or a NaN has left, which sliding cannot undo.
    auto spread_direct = [&](int c) {
        float s = 0.0f;
        for (int j = c - half; j <= c + half; ++j) s += term(j, SquareWindow(x + base, plane, C, half, j).sum);
        return s;
    };
    float spread = 0.0f;
    {
        SquareWindow w(x + base, plane, C, half, -half);
        for (int j = -half; j < half; ++j, w.step()) spread += term(j, w.sum);
    }
    for (int c = 0; c < C; ++c, here.step(), entering.step(), leaving.step()) {
        const float out = term(c - half - 1, leaving.sum);
        spread += term(c + half, entering.sum) - out;
        if (!(fabsf(out) <= 3.402823466e38f) || spread != spread) spread = spread_direct(c);  // non-finite left
        const int64_t i = base + c * plane;
        dx[i] = dy[i] * powf(k + alpha * here.sum, -beta) - 2.0f * alpha * beta * x[i] * spread;
    }
}

void lrn_forward(const float* x, float* y, int64_t batch, int C, int64_t plane, int size, float alpha, float beta,
                 float k, Stream stream) {
    const int64_t pixels = batch * plane;
    if (pixels <= 0 || C <= 0) return;
    PA_LAUNCH(lrn_forward_kernel, ceil_div(pixels, kLrnThreads), kLrnThreads, 0, as_stream(stream), x, y, pixels, C,
              plane, size / 2, alpha, beta, k);
}

void lrn_backward(const float* dy, const float* x, const float* y, float* dx, int64_t batch, int C, int64_t plane,
                  int size, float alpha, float beta, float k, Stream stream) {
    const int64_t pixels = batch * plane;
    if (pixels <= 0 || C <= 0) return;
    PA_LAUNCH(lrn_backward_kernel, ceil_div(pixels, kLrnThreads), kLrnThreads, 0, as_stream(stream), dy, x, y, dx,
              pixels, C, plane, size / 2, alpha, beta, k);
}

}  // namespace pa
