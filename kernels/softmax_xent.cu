// Softmax + cross-entropy over the classes of each row, loss and gradient in one pass.
//
//   logits (batch, classes), labels (batch,) int32 or int64
//   row_loss[r] = log(sum_c exp(x[r,c] - m)) - (x[r,label] - m),   m = max_c x[r,c]   (stable for |x| ~ 1e4)
//   dlogits[r,c] = (softmax(x[r])[c] - [c == label]) / batch        (the gradient of the batch MEAN loss)
//   result[0] = mean of row_loss; result[1] = number of labels outside [0, classes), as a float
// A row whose label is out of range gets NaN loss and NaN gradient: the caller checks result[1] and raises.
// Thread mapping: softmax_xent_rows has one 256-thread block per row, threads striding over the classes;
// xent_mean is a single block that reduces the row losses in a fixed order (deterministic, no atomics).
#include "common.cuh"
#include "kernels.h"
#include "reduce.cuh"

namespace pa {

constexpr int kXentThreads = 256;

template <class Label>
__global__ void __launch_bounds__(kXentThreads)
    softmax_xent_rows(const float* __restrict__ logits, const Label* __restrict__ labels, float* __restrict__ dlogits,
                      float* __restrict__ row_loss, int classes, float inv_batch) {
    __shared__ float scratch[kXentThreads / 32];
    const int64_t row = blockIdx.x;
    const float* x = logits + row * classes;
    float* dx = dlogits + row * classes;
    const float nan = quiet_nan();

    float m = negative_infinity();
    for (int c = threadIdx.x; c < classes; c += kXentThreads) m = nan_max(m, x[c]);
    m = block_reduce<kXentThreads>(m, MaxOp{}, negative_infinity(), scratch);

    float s = 0.0f;
    for (int c = threadIdx.x; c < classes; c += kXentThreads) s += expf(x[c] - m);
    s = block_reduce<kXentThreads>(s, SumOp{}, 0.0f, scratch);

    const Label label = labels[row];
    const bool valid = label >= 0 && label < classes;
    const float log_s = logf(s);
    for (int c = threadIdx.x; c < classes; c += kXentThreads) {
        const float p = expf(x[c] - m - log_s);
        dx[c] = valid ? (p - (c == label ? 1.0f : 0.0f)) * inv_batch : nan;
    }
    if (threadIdx.x == 0) row_loss[row] = valid ? log_s - (x[label] - m) : nan;
}

template <class Label>
__global__ void __launch_bounds__(kXentThreads)
    xent_mean(const float* __restrict__ row_loss, const Label* __restrict__ labels, float* __restrict__ result,
              int batch, int classes) {
    __shared__ float scratch[kXentThreads / 32];
    float sum = 0.0f, bad = 0.0f;
    for (int r = threadIdx.x; r < batch; r += kXentThreads) {
        sum += row_loss[r];
        bad += (labels[r] < 0 || labels[r] >= classes) ? 1.0f : 0.0f;
    }
    sum = block_reduce<kXentThreads>(sum, SumOp{}, 0.0f, scratch);
    bad = block_reduce<kXentThreads>(bad, SumOp{}, 0.0f, scratch);
    if (threadIdx.x == 0) {
        result[0] = sum / float(batch);
        result[1] = bad;
    }
}

template <class Label>
void launch_softmax_xent(const float* logits, const Label* labels, float* dlogits, float* row_loss, float* result,
                         int batch, int classes, cudaStream_t stream) {
    PA_LAUNCH((softmax_xent_rows<Label>), unsigned(batch), kXentThreads, 0, stream, logits, labels, dlogits, row_loss,
              classes, 1.0f / float(batch));
    PA_LAUNCH((xent_mean<Label>), 1, kXentThreads, 0, stream, row_loss, labels, result, batch, classes);
}

void softmax_xent(const float* logits, const void* labels, bool labels_int64, float* dlogits, float* row_loss,
                  float* result, int batch, int classes, Stream stream) {
    if (batch <= 0 || classes <= 0) throw KernelError("softmax_xent: batch and classes must be positive");
    if (labels_int64)
        launch_softmax_xent(logits, static_cast<const int64_t*>(labels), dlogits, row_loss, result, batch, classes,
                            as_stream(stream));
    else
        launch_softmax_xent(logits, static_cast<const int32_t*>(labels), dlogits, row_loss, result, batch, classes,
                            as_stream(stream));
}

}  // namespace pa
