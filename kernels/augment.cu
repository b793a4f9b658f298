// The input pipeline's last step on the GPU (Krizhevsky et al. 2012, section 4.1): from a batch of stored
// 256x256 RGB uint8 images to the network's float32 NCHW input, in one launch per batch.
//
//   out[b, c, y, x] = scale[c] * (img[b, oy + y, ox + x', c] - mean[oy + y, ox + x', c] + shift[b, c])
//   x' = flip[b] ? crop - 1 - x : x        (oy, ox, flip) = params[b]
//
// images (B, S, S, 3) uint8, HWC as the shards store them; mean (S, S, 3) float32, the per-pixel training mean
// (subtracted where the crop took the pixel from, so a flipped crop subtracts the flipped mean); params (B, 3)
// int32; shift (B, 3) float32, the image's PCA colour term (pyalexnet.data.train_draws: sum_i alpha_i
// sqrt(lambda_i) p_i; zero to evaluate);
// scale: one factor per channel (RGB), so torchvision's normalisation (x / 255 - mean_c) / std_c is this formula
// with mean = 255 mean_c everywhere and scale[c] = 1 / (255 std_c); the paper's pipeline uses one factor for all.
// out (B, 3, crop, crop) float32. Every random draw is made on the host: the kernel is a pure function of its
// inputs, so a test can replay it in NumPy. Evaluation uses the same kernel with fixed crops (centre, corners).
// An image whose params are out of range gets NaN everywhere (the caller checks them first; this keeps a bad
// one from reading outside the batch).
//
// Thread mapping: one thread per output pixel (b, y, x), x fastest: each thread reads its pixel's 3 bytes
// (neighbouring threads read neighbouring pixels) and writes one float to each of the 3 channel planes.
#include "common.cuh"
#include "kernels.h"

namespace pa {

constexpr int kAugmentThreads = 256;

__global__ void __launch_bounds__(kAugmentThreads)
    augment_kernel(const unsigned char* __restrict__ images, const float* __restrict__ mean,
                   const int* __restrict__ params, const float* __restrict__ shift, float* __restrict__ out,
                   int64_t pixels, int size, int crop, float scale_r, float scale_g, float scale_b) {
    const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    if (t >= pixels) return;
    const int64_t plane = int64_t(crop) * crop;
    const int64_t b = t / plane;
    const int y = int(t % plane) / crop, x = int(t % plane) % crop;
    const int oy = params[3 * b], ox = params[3 * b + 1], flip = params[3 * b + 2];
    float* o = out + b * 3 * plane + int64_t(y) * crop + x;
    if (oy < 0 || ox < 0 || oy > size - crop || ox > size - crop || (flip != 0 && flip != 1)) {
        const float nan = __int_as_float(0x7fc00000);
        o[0] = o[plane] = o[2 * plane] = nan;
        return;
    }
    const int sy = oy + y, sx = ox + (flip ? crop - 1 - x : x);
    const int64_t pixel = (int64_t(sy) * size + sx) * 3;
    const unsigned char* src = images + b * int64_t(size) * size * 3 + pixel;
    // Three scalars rather than an array parameter: they stay in registers (kernel parameters are constant memory).
    const float scale[3] = {scale_r, scale_g, scale_b};
    for (int c = 0; c < 3; ++c) o[c * plane] = scale[c] * (float(src[c]) - mean[pixel + c] + shift[3 * b + c]);
}

void augment_batch(const unsigned char* images, const float* mean, const int* params, const float* shift, float* out,
                   int batch, int size, int crop, const std::array<float, 3>& scale, Stream stream) {
    const int64_t pixels = int64_t(batch) * crop * crop;
    if (pixels <= 0) return;
    PA_LAUNCH(augment_kernel, unsigned((pixels + kAugmentThreads - 1) / kAugmentThreads), kAugmentThreads, 0,
              as_stream(stream), images, mean, params, shift, out, pixels, size, crop, scale[0], scale[1], scale[2]);
}

}  // namespace pa
