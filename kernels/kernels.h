// The launchers: host functions, one per operation, that pick a kernel variant and launch it on `stream`.
// Plain C++ (no CUDA types), so the pybind11 bindings compile against it for either backend. Pointers are
// device pointers on the cuda backend and host pointers on the emu backend; every array is dense row-major
// float32 unless stated. Sizes are validated by the bindings before a launcher is called; a launcher throws
// pa::KernelError if a launch fails.
#pragma once

#include <array>
#include <cstdint>

namespace pa {

using Stream = void*;  // a cudaStream_t; ignored by the emulator, whose launches are synchronous

// relu.cu
void relu_forward(const float* x, float* y, int64_t n, Stream stream);
void relu_backward(const float* dy, const float* y, float* dx, int64_t n, Stream stream);

// gemm.cu: C[M,N] = alpha * op(A) op(B) + beta * C + bias[n]   (bias may be null; beta == 0 never reads C)
// op(A) is A stored (M, K) with row stride lda, or (K, M) if trans_a; op(B) is B stored (K, N), or (N, K) if trans_b.
// relu: C = relu(the whole epilogue) (the FC layers' fused ReLU).
void sgemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda, const float* B,
           int ldb, float beta, float* C, int ldc, const float* bias, Stream stream, bool relu = false);

// gemm.cu: tile.cuh's split-K rule, as the launchers apply it: {ranges, depth of each} for a GEMM of `tiles` CTAs
// per grid layer, `layers` layers, depth K walked in slices of bk, on a card of `sms` SMs ({1, K}: no split).
std::array<int, 2> split_k_plan(long long tiles, int layers, int K, int bk, int sms);

// linear.cu: y = x w^T + b, and its gradients (dw, db overwritten).
void linear_forward(const float* x, const float* w, const float* b, float* y, int batch, int in, int out,
                    Stream stream, bool relu = false);
void linear_backward(const float* dy, const float* x, const float* w, float* dx, float* dw, float* db, int batch,
                     int in, int out, Stream stream);
// db[n] = sum_m dy[m, n], in a fixed order (deterministic).
void bias_backward(const float* dy, float* db, int rows, int cols, Stream stream);

// softmax_xent.cu: per-row loss and dlogits = (softmax - onehot) / batch; result[0] = mean loss,
// result[1] = how many labels fall outside [0, classes) (those rows get NaN loss and gradient).
void softmax_xent(const float* logits, const void* labels, bool labels_int64, float* dlogits, float* row_loss,
                  float* result, int batch, int classes, Stream stream);

// sgd.cu: the paper's rule, in place: v = momentum v - weight_decay lr w - lr dw; w += v.
void sgd_update(float* w, const float* dw, float* v, int64_t n, float lr, float momentum, float weight_decay,
                Stream stream);
// The same rule for `count` tensors in one launch per kSgdTensorsPerLaunch of them (a network's every parameter).
struct SgdTensor {
    float* w;
    const float* dw;
    float* v;
    int64_t n;
};
constexpr int kSgdTensorsPerLaunch = 32;
void sgd_update_many(const SgdTensor* tensors, int count, float lr, float momentum, float weight_decay,
                     Stream stream);

// conv.cu: x (N, C, H, W), w (K, C/groups, R, S), b (K,) or null, y (N, K, P, Q) with
// P = (H + 2 pad - R) / stride + 1; backward overwrites dx (like x), dw (like w), db (K,). Fusions: forward with
// `relu` writes relu(conv + b); backward_data with relu_y (like x: the ReLU output that x is) multiplies dx by
// that ReLU's derivative (0 where relu_y is not > 0).
void conv_forward(const float* x, const float* w, const float* b, float* y, int N, int C, int H, int W, int K, int R,
                  int S, int stride, int pad, int groups, Stream stream, bool relu = false);
void conv_backward(const float* dy, const float* x, const float* w, float* dx, float* dw, float* db, int N, int C,
                   int H, int W, int K, int R, int S, int stride, int pad, int groups, Stream stream);
// The two halves of conv_backward, for timing them apart.
void conv_backward_data(const float* dy, const float* w, float* dx, int N, int C, int H, int W, int K, int R, int S,
                        int stride, int pad, int groups, Stream stream, const float* relu_y = nullptr);
void conv_backward_filter(const float* dy, const float* x, float* dw, float* db, int N, int C, int H, int W, int K,
                          int R, int S, int stride, int pad, int groups, Stream stream);

// lrn.cu: across channels, the paper's formula (alpha NOT divided by size); x, y, dy, dx are
// (batch, C, plane) with plane = H * W; size is odd.
void lrn_forward(const float* x, float* y, int64_t batch, int C, int64_t plane, int size, float alpha, float beta,
                 float k, Stream stream);
void lrn_backward(const float* dy, const float* x, const float* y, float* dx, int64_t batch, int C, int64_t plane,
                  int size, float alpha, float beta, float k, Stream stream);

// pool.cu: max-pooling, floor mode, no padding; x, dx are (planes, H, W) with planes = N * C, H, W >= size;
// y, dy are (planes, P, Q). Backward needs y (forward's output) and overwrites dx; `relu`: x is a ReLU's output,
// and dx is also multiplied by the ReLU's derivative (0 where x is not > 0), so that no relu_backward is needed.
void maxpool_forward(const float* x, float* y, int64_t planes, int H, int W, int size, int stride, Stream stream);
void maxpool_backward(const float* dy, const float* x, const float* y, float* dx, int64_t planes, int H, int W,
                      int size, int stride, Stream stream, bool relu = false);
// Adaptive average pooling (PyTorch's AdaptiveAvgPool2d): x, dx (planes, H, W), y, dy (planes, OH, OW), all sizes
// >= 1; cell (i, j) averages rows [floor(i H / OH), ceil((i + 1) H / OH)), columns likewise. Backward overwrites dx.
void adaptive_avgpool_forward(const float* x, float* y, int64_t planes, int H, int W, int OH, int OW, Stream stream);
void adaptive_avgpool_backward(const float* dy, float* dx, int64_t planes, int H, int W, int OH, int OW,
                               Stream stream);

// dropout.cu: inverted dropout with a Philox bit mask (ceil(n / 32) uint32 words); an element is kept iff its
// 24-bit draw is >= keep_threshold = ceil(p * 2^24); kept elements are scaled by `scale` = 1 / (1 - p).
void dropout_forward(const float* x, float* y, unsigned* mask, int64_t n, unsigned long long seed,
                     unsigned keep_threshold, float scale, Stream stream);
void dropout_backward(const float* dy, const unsigned* mask, float* dx, int64_t n, float scale, Stream stream);

// augment.cu: a batch of stored uint8 HWC images (batch, size, size, 3) to float32 NCHW crops (batch, 3, crop,
// crop): random crop and flip by params (batch, 3) int32 {oy, ox, flip}, minus the per-pixel mean (size, size, 3),
// plus the PCA colour shift (batch, 3), times scale[c] per channel (RGB; host values, finite).
void augment_batch(const unsigned char* images, const float* mean, const int* params, const float* shift, float* out,
                   int batch, int size, int crop, const std::array<float, 3>& scale, Stream stream);

// selftest.cu: small kernels that exercise the emulator (and run on the GPU too, except the planted faults).
void selftest_tiled_gemm(const float* A, const float* B, float* C, int M, int N, int K, Stream stream);
void selftest_shuffle_sum(const float* x, float* out, int n, int variant, Stream stream);
void selftest_dynamic_shared(const float* x, float* y, int n, int shared_floats, Stream stream);
void selftest_atomics(const int* x, int* counters, int n, Stream stream);
void selftest_exited_lanes(const float* x, float* out, Stream stream);  // x, out: 48 floats
void selftest_uninitialised_shared(float* out, Stream stream);         // out: 128 floats
void selftest_intrinsics(unsigned* out, Stream stream);                // out: 48 x 29 (selftest.cu)
// Launches a deliberately faulty kernel (emulator only): "divergent_barrier", "exit_before_barrier",
// "deadlock", "inactive_lane", "too_many_threads", "grid_too_large", "dynamic_shared_over_limit",
// "dynamic_shared_over_optin", "static_shared_over_limit", "mask_mismatch", "reads_exited_lane",
// "stack_overflow".
void selftest_planted(const char* fault, float* scratch, Stream stream);
// The static shared memory of selftest_tiled_gemm's kernel as the backend measures it (ptxas says 2112 B).
long long selftest_static_shared_bytes();
void selftest_index64(const float* x, float* y, int n, Stream stream);  // y = 2 x, indexed from 2^32 + 3
// x: 65536 floats, y: 4096; pattern: coalesced, stride32, bank32, broadcast, predicated, tail6 (selftest.cu).
void selftest_memory_pattern(const char* pattern, const float* x, float* y, Stream stream);

}  // namespace pa
