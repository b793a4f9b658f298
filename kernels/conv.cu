// 2-D convolution (cross-correlation, as in PyTorch) with stride, zero padding and groups: forward, backward
// with respect to the data, backward with respect to the filters, and the bias gradient.
//
//   x (N, C, H, W), w (K, C/G, R, S), b (K,), y (N, K, P, Q), P = (H + 2 pad - R) / stride + 1, Q likewise.
//   y[n,k,p,q] = b[k] + sum_{c,r,s} x[n, g*Cg + c, p*stride - pad + r, q*stride - pad + s] * w[k,c,r,s]
//   with g = k / Kg the group of filter k, Cg = C / G, Kg = K / G; taps outside the image read 0.
//
// Each pass is an implicit GEMM, one grid layer (blockIdx.z) per group; the GEMM's operands are gathered from
// the tensors as the tiles are loaded (no im2col buffer is ever built):
//
//   pass             GEMM  M     N            K            A[m, kk]                 B[kk, n]                  C[m, n]
//   forward          Kg          N*P*Q        Cg*R*S       w[k, (c,r,s)]            x at (n,p,q) + (c,r,s)    y[n, k, p, q]
//   backward_data    Cg          N*H*W        Kg*R*S       w[k, c, r, s]            dy at (n,h,w) - (r,s)     dx[n, c, h, w]
//   backward_filter  Kg          Cg*R*S       N*P*Q        dy[n, k, (p,q)]          x at (n,p,q) + (c,r,s)    dw[k, (c,r,s)]
//
// backward_data reads dy[n,k,p,q] where h = p*stride - pad + r, i.e. p = (h + pad - r) / stride when that
// divides exactly and lands in [0, P) (else the tap contributes 0). Every output element is computed by one
// thread from a full K-loop: results overwrite their tensor and are deterministic (no atomics, no split-K).
//
// Thread mapping: the 64 x 64 tile engine of tile.cuh (shared with the SGEMM), fed by gathers. For staging, thread t fetches A at row t/4, four consecutive kk; and B at kk row t/16, four consecutive columns
// n. What is fixed for a thread across slices (its A row, its four B columns) is decoded once, outside the
// K-loop; per slice only the kk index is decoded.
//
// backward_data with fewer than 16 channels per group (conv1) uses a direct kernel instead, see below.
// Known limits of this first version: the activation gathers are scalar loads (only the forward pass's filter
// rows are read 16 bytes at a time), and the GEMM form of
// backward_data multiplies the zero taps of a strided layer (only conv1 is strided in AlexNet, and it takes
// the direct kernel).
#include "common.cuh"
#include "kernels.h"
#include "reduce.cuh"
#include "tile.cuh"

namespace pa {

enum class ConvPass { Forward, BackwardData, BackwardFilter };

struct ConvShape {
    int N, C, H, W, K, R, S, P, Q, stride, pad, groups;
    __host__ __device__ int Cg() const { return C / groups; }
    __host__ __device__ int Kg() const { return K / groups; }
};

constexpr int kConvBK = 16;

// Every tensor has fewer than 2^31 elements (the binding checks), so every GEMM size and every offset fits an
// int: 32-bit index arithmetic throughout, which keeps the gathers' divisions cheap.
template <ConvPass PASS>
__host__ __device__ inline void conv_gemm_dims(const ConvShape& s, int& M, int& N, int& K) {
    const int rs = s.R * s.S, pq = s.P * s.Q, hw = s.H * s.W;
    if (PASS == ConvPass::Forward) M = s.Kg(), N = s.N * pq, K = s.Cg() * rs;
    if (PASS == ConvPass::BackwardData) M = s.Cg(), N = s.N * hw, K = s.Kg() * rs;
    if (PASS == ConvPass::BackwardFilter) M = s.Kg(), N = s.Cg() * rs, K = s.N * pq;
}

// Operands by pass:  forward: a = w, b = x, out = y (+ bias);  backward_data: a = w, b = dy, out = dx;
// backward_filter: a = dy, b = x, out = dw.
// VEC_A (forward only): a thread's four A elements are four consecutive floats of one filter row, fetched as
// one 16-byte load when rows are 16-byte aligned (w aligned and Cg*R*S a multiple of 4; conv2-5 of AlexNet).
template <ConvPass PASS, bool VEC_A>
__global__ void __launch_bounds__(kTileThreads)
    conv_implicit_gemm(ConvShape s, const float* __restrict__ a, const float* __restrict__ b,
                       const float* __restrict__ bias, float* __restrict__ out) {
    constexpr int BM = kTileM, BN = kTileN, BK = kConvBK;
    __shared__ __align__(16) TileBuffers<BK> tiles;

    int M, N, K;
    conv_gemm_dims<PASS>(s, M, N, K);
    const int g = blockIdx.z, Cg = s.Cg(), Kg = s.Kg();
    const int HW = s.H * s.W, PQ = s.P * s.Q, RS = s.R * s.S;
    const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

    // ---- what is fixed for this thread: its A row, its four B columns ----
    const int a_row = tid / 4, a_col = tid % 4 * 4;  // A stage: row m0 + a_row, kk = k0 + a_col + j
    const int b_row = tid / 16, b_col = tid % 16 * 4;  // B stage: kk = k0 + b_row, column n0 + b_col + j
    const int am = m0 + a_row;
    const bool a_ok = am < M;
    // B columns: forward and backward_filter gather x; backward_data gathers dy.
    int col_base[4];  // offset of the column's image (forward: x image; data: dy image; filter: x channel)
    int col_y[4], col_x[4];  // forward: p*stride - pad, q*stride - pad; data: h + pad, w + pad; filter: r, s
    bool col_ok[4];
    for (int j = 0; j < 4; ++j) {
        const int n = n0 + b_col + j;
        col_ok[j] = n < N;
        const int nn = col_ok[j] ? n : 0;
        if (PASS == ConvPass::Forward) {
            const int img = nn / PQ, pq = nn - img * PQ;
            col_base[j] = (img * s.C + g * Cg) * HW;
            col_y[j] = pq / s.Q * s.stride - s.pad;
            col_x[j] = pq % s.Q * s.stride - s.pad;
        } else if (PASS == ConvPass::BackwardData) {
            const int img = nn / HW, hw = nn - img * HW;
            col_base[j] = (img * s.K + g * Kg) * PQ;
            col_y[j] = hw / s.W + s.pad;
            col_x[j] = hw % s.W + s.pad;
        } else {
            const int c = nn / RS, rs = nn - c * RS;
            col_base[j] = (g * Cg + c) * HW;
            col_y[j] = rs / s.S;
            col_x[j] = rs % s.S;
        }
    }

    // ---- the gathers ----
    auto fetch_a = [&](int kk) -> float {
        if (!a_ok || kk >= K) return 0.0f;
        if (PASS == ConvPass::Forward) return a[(g * Kg + am) * K + kk];  // a w row is contiguous in kk
        if (PASS == ConvPass::BackwardData) {
            const int k = kk / RS, rs = kk - k * RS;
            return a[((g * Kg + k) * Cg + am) * RS + rs];
        }
        const int img = kk / PQ, pq = kk - img * PQ;
        return a[(img * s.K + g * Kg + am) * PQ + pq];
    };
    float a_stage[4], b_stage[4];
    auto fetch_slice = [&](int k0) {
        if (VEC_A && a_ok && k0 + a_col + 3 < K) {
            const float4 v = *reinterpret_cast<const float4*>(a + (g * Kg + am) * K + k0 + a_col);
            a_stage[0] = v.x, a_stage[1] = v.y, a_stage[2] = v.z, a_stage[3] = v.w;
        } else {
            for (int j = 0; j < 4; ++j) a_stage[j] = fetch_a(k0 + a_col + j);
        }
        const int kk = k0 + b_row;
        if (kk >= K) {
            for (int j = 0; j < 4; ++j) b_stage[j] = 0.0f;
            return;
        }
        if (PASS == ConvPass::Forward) {
            const int c = kk / RS, rs = kk - c * RS, r = rs / s.S, q = rs - r * s.S;
            for (int j = 0; j < 4; ++j) {
                const int h = col_y[j] + r, w = col_x[j] + q;
                const bool in = col_ok[j] && h >= 0 && h < s.H && w >= 0 && w < s.W;
                b_stage[j] = in ? b[col_base[j] + c * HW + h * s.W + w] : 0.0f;
            }
        } else if (PASS == ConvPass::BackwardData) {
            const int k = kk / RS, rs = kk - k * RS, r = rs / s.S, q = rs - r * s.S;
            for (int j = 0; j < 4; ++j) {
                const int hy = col_y[j] - r, wx = col_x[j] - q;  // = p * stride, q * stride when the tap exists
                const int p = hy / s.stride, qq = wx / s.stride;
                const bool in = col_ok[j] && hy >= 0 && wx >= 0 && hy % s.stride == 0 && wx % s.stride == 0 &&
                                p < s.P && qq < s.Q;
                b_stage[j] = in ? b[col_base[j] + k * PQ + p * s.Q + qq] : 0.0f;
            }
        } else {
            const int img = kk / PQ, pq = kk - img * PQ, p = pq / s.Q;
            const int h0 = p * s.stride - s.pad, w0 = (pq - p * s.Q) * s.stride - s.pad;
            const int image = img * s.C * HW;
            for (int j = 0; j < 4; ++j) {
                const int h = h0 + col_y[j], w = w0 + col_x[j];
                const bool in = col_ok[j] && h >= 0 && h < s.H && w >= 0 && w < s.W;
                b_stage[j] = in ? b[image + col_base[j] + h * s.W + w] : 0.0f;
            }
        }
    };
    auto store_slice = [&](int buf) {
        for (int j = 0; j < 4; ++j) {
            tiles.a[buf][a_col + j][a_row] = a_stage[j];
            tiles.b[buf][b_row][b_col + j] = b_stage[j];
        }
    };

    float acc[4][4] = {};
    tile_k_loop(K, tiles, fetch_slice, store_slice, acc);

    // ---- the epilogue: scatter C into the output tensor ----
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty * 4 + i;
        if (m >= M) break;
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tx * 4 + j;
            if (n >= N) break;
            if (PASS == ConvPass::Forward) {
                const int k = g * Kg + m, img = n / PQ, pq = n - img * PQ;
                out[(img * s.K + k) * PQ + pq] = acc[i][j] + (bias ? bias[k] : 0.0f);
            } else if (PASS == ConvPass::BackwardData) {
                const int img = n / HW, hw = n - img * HW;
                out[(img * s.C + g * Cg + m) * HW + hw] = acc[i][j];
            } else {
                out[(g * Kg + m) * N + n] = acc[i][j];
            }
        }
    }
}

// backward_data for layers with few input channels per group (conv1: 3), where the implicit GEMM's M = Cg
// would fill 3 of a tile's 64 rows. One thread per dx element sums over the filters of its group and over
// only the taps that exist: r = (h + pad) mod stride, then every stride-th, so a strided layer skips the
// (stride^2 - 1) / stride^2 of taps that the GEMM formulation multiplies by zero.
__global__ void __launch_bounds__(256) conv_backward_data_direct(ConvShape s, const float* __restrict__ w,
                                                                 const float* __restrict__ dy, float* __restrict__ dx) {
    const int e = blockIdx.x * 256 + threadIdx.x;
    const int HW = s.H * s.W, CHW = s.C * HW;
    if (e >= s.N * CHW) return;
    const int img = e / CHW, ch = e / HW % s.C, h = e / s.W % s.H, x = e % s.W;
    const int Cg = s.Cg(), Kg = s.Kg(), g = ch / Cg, c = ch % Cg, PQ = s.P * s.Q;
    const float* dy_g = dy + (img * s.K + g * Kg) * PQ;
    const float* w_g = w + (g * Kg * Cg + c) * s.R * s.S;
    float acc = 0.0f;
    for (int r = (h + s.pad) % s.stride; r < s.R; r += s.stride) {
        const int p = (h + s.pad - r) / s.stride;
        if (p >= s.P) continue;
        if (p < 0) break;
        for (int t = (x + s.pad) % s.stride; t < s.S; t += s.stride) {
            const int q = (x + s.pad - t) / s.stride;
            if (q >= s.Q) continue;
            if (q < 0) break;
            for (int k = 0; k < Kg; ++k) acc += dy_g[k * PQ + p * s.Q + q] * w_g[(k * Cg * s.R + r) * s.S + t];
        }
    }
    dx[e] = acc;
}

// db[k] = sum over images and pixels of dy[n, k, p, q]: one block per filter, a fixed-order tree (deterministic).
__global__ void __launch_bounds__(256) conv_bias_backward(const float* __restrict__ dy, float* __restrict__ db, int N,
                                                          int K, int PQ) {
    __shared__ float scratch[256 / 32];
    const int k = blockIdx.x;
    float sum = 0.0f;
    for (int n = 0; n < N; ++n)
        for (int i = threadIdx.x; i < PQ; i += 256) sum += dy[(n * K + k) * PQ + i];
    sum = block_reduce<256>(sum, SumOp{}, 0.0f, scratch);
    if (threadIdx.x == 0) db[k] = sum;
}

namespace {

template <ConvPass PASS>
void launch_conv(const ConvShape& s, const float* a, const float* b, const float* bias, float* out,
                 cudaStream_t stream) {
    int M, N, K;
    conv_gemm_dims<PASS>(s, M, N, K);
    if (M <= 0 || N <= 0) return;
    const int grid_x = (N + kTileN - 1) / kTileN, grid_y = (M + kTileM - 1) / kTileM;
    if (grid_y > 65535 || s.groups > 65535)
        throw KernelError("conv: the problem is too large for one launch's grid");
    const dim3 grid(unsigned(grid_x), unsigned(grid_y), unsigned(s.groups));
    const bool vec_a = PASS == ConvPass::Forward && aligned16(a) && K % 4 == 0;
    if (vec_a) PA_LAUNCH((conv_implicit_gemm<PASS, true>), grid, kTileThreads, 0, stream, s, a, b, bias, out);
    else PA_LAUNCH((conv_implicit_gemm<PASS, false>), grid, kTileThreads, 0, stream, s, a, b, bias, out);
}

ConvShape make_shape(int N, int C, int H, int W, int K, int R, int S, int stride, int pad, int groups) {
    return ConvShape{N, C, H, W, K, R, S, (H + 2 * pad - R) / stride + 1, (W + 2 * pad - S) / stride + 1,
                     stride, pad, groups};
}

}  // namespace

void conv_forward(const float* x, const float* w, const float* b, float* y, int N, int C, int H, int W, int K, int R,
                  int S, int stride, int pad, int groups, Stream stream) {
    const ConvShape s = make_shape(N, C, H, W, K, R, S, stride, pad, groups);
    launch_conv<ConvPass::Forward>(s, w, x, b, y, as_stream(stream));
}

void conv_backward_data(const float* dy, const float* w, float* dx, int N, int C, int H, int W, int K, int R, int S,
                        int stride, int pad, int groups, Stream stream) {
    const ConvShape s = make_shape(N, C, H, W, K, R, S, stride, pad, groups);
    const cudaStream_t st = as_stream(stream);
    // Below 16 channels per group the GEMM tile would be mostly padding: the direct kernel is cheaper.
    if (s.Cg() < 16) {
        const int64_t elements = int64_t(N) * C * H * W;
        if (elements > 0)
            PA_LAUNCH(conv_backward_data_direct, ceil_div(elements, 256), 256, 0, st, s, w, dy, dx);
    } else {
        launch_conv<ConvPass::BackwardData>(s, w, dy, nullptr, dx, st);
    }
}

void conv_backward_filter(const float* dy, const float* x, float* dw, float* db, int N, int C, int H, int W, int K,
                          int R, int S, int stride, int pad, int groups, Stream stream) {
    const ConvShape s = make_shape(N, C, H, W, K, R, S, stride, pad, groups);
    const cudaStream_t st = as_stream(stream);
    launch_conv<ConvPass::BackwardFilter>(s, dy, x, nullptr, dw, st);
    if (K > 0) PA_LAUNCH(conv_bias_backward, unsigned(K), 256, 0, st, dy, db, N, K, s.P * s.Q);
}

void conv_backward(const float* dy, const float* x, const float* w, float* dx, float* dw, float* db, int N, int C,
                   int H, int W, int K, int R, int S, int stride, int pad, int groups, Stream stream) {
    conv_backward_data(dy, w, dx, N, C, H, W, K, R, S, stride, pad, groups, stream);
    conv_backward_filter(dy, x, dw, db, N, C, H, W, K, R, S, stride, pad, groups, stream);
}

}  // namespace pa
