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
// divides exactly and lands in [0, P) (else the tap contributes 0); at stride 1 (conv2-5) simply p = h + pad - r.
// Its A operand is w with each group's (k, c) transposed first (conv_filter_rows, into a workspace), so that a
// row is contiguous in kk as the forward pass's rows of w are. Both passes read their A rows 16 bytes at a time:
// rows padded with zeros to a multiple of 4 floats (conv_filter_rows again where w's own rows are not: conv1's
// 3 x 11 x 11 = 363).
//
// Forward and backward_data compute each output element in one thread from a full K-loop. backward_filter's C is
// only the filter bank (conv1: 64 x 363, 6 tiles) while its K runs over every pixel of the batch (conv1:
// 387,200), so its K is split (tile.cuh, SplitK) until the grid fills the card; the partial filter banks are
// added in range order by conv_filter_reduce. The bias gradient rides along: db[k] = sum over kk of A[k, kk] is
// the product of A with a column of ones, so B gets one column of ones past dw's last and C's column there is db
// (free where dw's columns leave the last tile room: conv1-3; one more column of tiles otherwise), written beside
// the partial filters and reduced with them. Every result overwrites its tensor and is deterministic (fixed
// summation order, no atomics).
//
// Thread mapping: the 64 x 64 tile engine of tile.cuh (shared with the SGEMM), fed by gathers; how each pass
// stages its slices is described above the kernel. What is fixed for a thread across slices (its rows and
// columns) is decoded once, outside the K loop; the digits of its kk (KDigits) are carried from slice to slice
// by additions with a carry, so the K loop has no integer division at stride 1.
//
// backward_data with fewer than 16 channels per group (conv1) uses a direct kernel instead, see below. Known
// limit: the GEMM form of backward_data at stride > 1 divides by the stride per element and multiplies the zero
// taps (only conv1 is strided in AlexNet, and it takes the direct kernel).
#include "common.cuh"
#include "kernels.h"
#include "tile.cuh"

namespace pa {

enum class ConvPass { Forward, BackwardData, BackwardFilter };

struct ConvShape {
    int N, C, H, W, K, R, S, P, Q, stride, pad, groups;
    __host__ __device__ int Cg() const { return C / groups; }
    __host__ __device__ int Kg() const { return K / groups; }
};


// Every tensor has fewer than 2^31 elements (the binding checks), so every GEMM size and every offset fits an
// int: 32-bit index arithmetic throughout, which keeps the gathers' divisions cheap.
template <ConvPass PASS>
__host__ __device__ inline void conv_gemm_dims(const ConvShape& s, int& M, int& N, int& K) {
    const int rs = s.R * s.S, pq = s.P * s.Q, hw = s.H * s.W;
    if (PASS == ConvPass::Forward) M = s.Kg(), N = s.N * pq, K = s.Cg() * rs;
    if (PASS == ConvPass::BackwardData) M = s.Cg(), N = s.N * hw, K = s.Kg() * rs;
    if (PASS == ConvPass::BackwardFilter) M = s.Kg(), N = s.Cg() * rs, K = s.N * pq;
}

// A K index kk = (hi * mid_n + mid) * lo_n + lo as its three digits, carried along as kk advances by one slice
// per step: the step's own digits are added with at most one carry each, so the K loop never divides.
//   forward and backward_data: kk = (c or k, r, s), radices (R, S);  backward_filter: kk = (image, p, q), (P, Q).
// The radices and the step's digits are the same for every thread: a kernel parameter (KStep, made on the host),
// which costs no registers.
struct KStep {
    int mid_n, lo_n, hi, mid, lo;
};

inline KStep make_k_step(int step, int mid_n, int lo_n) {
    const int block = mid_n * lo_n, hi = step / block, mid = (step - hi * block) / lo_n;
    return KStep{mid_n, lo_n, hi, mid, step - hi * block - mid * lo_n};
}

struct KDigits {
    int hi, mid, lo;
    __device__ __forceinline__ KDigits(int kk, const KStep& st) {
        const int block = st.mid_n * st.lo_n;
        hi = kk / block, mid = (kk - hi * block) / st.lo_n, lo = kk - hi * block - mid * st.lo_n;
    }
    __device__ __forceinline__ void advance(const KStep& st) {
        lo += st.lo, mid += st.mid, hi += st.hi;
        if (lo >= st.lo_n) lo -= st.lo_n, ++mid;
        if (mid >= st.mid_n) mid -= st.mid_n, ++hi;
    }
};

// Operands by pass:  forward: a = w, b = x, out = y (+ bias);  backward_data: a = w transposed per group to
// (G, Cg, Kg, R, S) (conv_filter_rows), b = dy, out = dx;  backward_filter: a = dy, b = x, out = dw.
// Forward and backward_data thus both read A as rows contiguous in kk, lda floats apart: a 16-byte aligned, lda a
// multiple of 4, and the floats of a row from K to lda zero, so a thread's four A elements are always one 16-byte
// load (a range of a split K ends on a slice, a multiple of 4; the last range ends at K, where the zeros are).
// UNIT_STRIDE (backward_data): stride 1, where the tap of dy that a (h, w, r, s) reads needs no division.
// BM: the rows of C per block (tile.cuh: 128, or 64 for a C of at most 64 rows).
// Grid layer z is group z / split.count and K range z % split.count. backward_filter: out and bias_grad are dw
// and db (no split), or partial number z % split.count of both, split.stride floats apart. Fused epilogues:
// forward with `relu` writes relu(y + b); backward_data with relu_y (laid out as dx) writes dx where relu_y > 0,
// else 0 (the derivative of the ReLU whose output this layer's input is).
//
// Staging. forward and backward_data: A (rows contiguous in kk) tile.cuh's kk-contiguous layout; B by rows of
// kk like its row-contiguous layout, kk = t / 32 and t / 32 + 8, but at columns t % 32 + 32 e: each load
// instruction of a warp reads 32 consecutive pixels (coalesced at stride 1; at conv1's stride 4 every other
// sector) and each store writes 32 consecutive floats of a row of the tile (no bank conflicts). backward_filter, whose kk is a pixel of both operands:
// thread t stages kk = t % 16 of A rows t / 16 * BM / 16 + e and of B columns t / 16 * 8 + e, so a half-warp
// reads 16 consecutive pixels of each row (coalesced) and stores its rows of the k-major tile as 16-byte stores;
// its B columns' (c, r, s) come from a table in shared memory made once per block.
template <ConvPass PASS, int BM, bool UNIT_STRIDE>
__global__ void __launch_bounds__(kTileThreads, kTileBlocksPerSm)
    conv_implicit_gemm(ConvShape s, SplitK split, KStep step, int lda, const float* __restrict__ a,
                       const float* __restrict__ b, const float* __restrict__ bias, float* __restrict__ out,
                       float* __restrict__ bias_grad, bool relu, const float* __restrict__ relu_y) {
    constexpr int BN = kTileN, TM = BM / 16, TN = BN / 16;
    constexpr bool PIXEL_K = PASS == ConvPass::BackwardFilter;
    constexpr int PIXEL_ROWS = BM / 16, PIXEL_COLS = BN / 16;  // backward_filter: A rows, B columns per thread
    using AStage = KContiguousStage<BM>;
    using BStage = RowContiguousStage<BN>;
    __shared__ __align__(16) TileBuffers<BM> tiles;
    // backward_filter: per B column {offset, r - pad, s - pad, kind}; kind 0: past the end, 1: a tap of x,
    // 2: the column of ones one past dw's last (C's column there is the bias gradient).
    __shared__ __align__(16) int4 col_table[BN];

    int M, N, K;
    conv_gemm_dims<PASS>(s, M, N, K);
    const int g = blockIdx.z / split.count, part = blockIdx.z % split.count, Cg = s.Cg(), Kg = s.Kg();
    const int k_begin = split.begin(part), k_end = split.end(part, K);
    const int HW = s.H * s.W, PQ = s.P * s.Q, RS = s.R * s.S;
    const int tid = threadIdx.x;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

    // ---- what is fixed for this thread: its A rows, its B columns, the kk offsets it stages ----
    // forward and backward_data: B columns n0 + b_lane + 32 j (j < 4), the same for both of its kk rows. A tap
    // (ck, r, q) of column j is at col_off[j] + the tap's own offset, and exists where (unsigned) (col_y[j] + r) <
    // H and (unsigned) (col_x[j] + q) < W (backward_data at stride 1: col_y[j] - r < P, col_x[j] - q < Q); a
    // column past N gets a col_y no r brings into range.
    const int b_lane = tid % 32;
    int col_off[4], col_y[4], col_x[4];
    if constexpr (!PIXEL_K) {
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + b_lane + 32 * j, nn = n < N ? n : 0;
            if (PASS == ConvPass::Forward) {
                const int img = nn / PQ, pq = nn - img * PQ;
                col_y[j] = pq / s.Q * s.stride - s.pad;
                col_x[j] = pq % s.Q * s.stride - s.pad;
                col_off[j] = (img * s.C + g * Cg) * HW + col_y[j] * s.W + col_x[j];
            } else {
                const int img = nn / HW, hw = nn - img * HW;
                col_y[j] = hw / s.W + s.pad;
                col_x[j] = hw % s.W + s.pad;
                col_off[j] = (img * s.K + g * Kg) * PQ + col_y[j] * s.Q + col_x[j];  // at stride 1
            }
            if (n >= N) col_y[j] = PASS == ConvPass::Forward ? -(1 << 30) : (1 << 30);
        }
    } else {
        for (int c = tid; c < BN; c += kTileThreads) {
            const int n = n0 + c, nn = n < N ? n : 0;
            const int ch = nn / RS, rs = nn - ch * RS, r = rs / s.S, q = rs - r * s.S;
            col_table[c] = make_int4((g * Cg + ch) * HW + (r - s.pad) * s.W + (q - s.pad), r - s.pad, q - s.pad,
                                     n < N ? 1 : n == N ? 2 : 0);
        }
        __syncthreads();  // the table is read from the first fetch on
    }
    // backward_filter: A rows pixel_row0 + j (j < PIXEL_ROWS) at kk = k0 + tid % 16.
    const int pixel_kk = tid % 16, pixel_row0 = tid / 16 * PIXEL_ROWS, pixel_col0 = tid / 16 * PIXEL_COLS;
    const int row_base0 = (g * Kg + m0 + pixel_row0) * PQ;  // dy offset of the first row in image 0
    const int rows_left = M - (m0 + pixel_row0);  // rows j < rows_left exist
    KDigits digits0(k_begin + (PIXEL_K ? pixel_kk : BStage::kk(0)), step);
    KDigits digits1(k_begin + BStage::kk(1), step);  // forward and backward_data: the second kk row

    // ---- the gathers ----
    float a_stage[BM / 64][4], b_stage[BN / 64][4];  // a slice's BM x 16 and 16 x BN over 256 threads, by fours
    auto gather_b = [&](const KDigits& d, int kk, float (&v)[4]) {  // forward and backward_data
        const int ck = d.hi, r = d.mid, q = d.lo;
        if (kk >= k_end) {
            for (int j = 0; j < 4; ++j) v[j] = 0.0f;
            return;
        }
        // (32-bit offsets, one wide multiply-add per address: a pointer plus an int costs a 64-bit add chain)
        if (PASS == ConvPass::Forward) {
            const int tap = ck * HW + r * s.W + q;
            for (int j = 0; j < 4; ++j) {
                const bool in = unsigned(col_y[j] + r) < unsigned(s.H) && unsigned(col_x[j] + q) < unsigned(s.W);
                v[j] = in ? b[tap + col_off[j]] : 0.0f;
            }
        } else if (UNIT_STRIDE) {  // the output pixel whose tap (r, q) is (h, w): (h + pad - r, w + pad - q)
            const int tap = ck * PQ - r * s.Q - q;
            for (int j = 0; j < 4; ++j) {
                const bool in = unsigned(col_y[j] - r) < unsigned(s.P) && unsigned(col_x[j] - q) < unsigned(s.Q);
                v[j] = in ? b[tap + col_off[j]] : 0.0f;
            }
        } else {
            for (int j = 0; j < 4; ++j) {
                const int hy = col_y[j] - r, wx = col_x[j] - q;  // = p * stride, q * stride when the tap exists
                const int p = hy / s.stride, qq = wx / s.stride;
                const bool in = hy >= 0 && wx >= 0 && hy % s.stride == 0 && wx % s.stride == 0 && p < s.P &&
                                qq < s.Q;
                v[j] = in ? b[col_off[j] - col_y[j] * s.Q - col_x[j] + ck * PQ + p * s.Q + qq] : 0.0f;
            }
        }
    };
    auto fetch_slice = [&](int k0) {
        if constexpr (PIXEL_K) {
            const int kk = k0 + pixel_kk;
            const bool k_ok = kk < k_end;
            const int img = digits0.hi, p = digits0.mid, q = digits0.lo;
            const int pixel = img * s.K * PQ + p * s.Q + q;
            const float* dy_at = a + (row_base0 + pixel);  // (as a pointer: fewer registers than offsets here)
            for (int j = 0; j < PIXEL_ROWS; ++j) a_stage[j / 4][j % 4] = k_ok && j < rows_left ? dy_at[j * PQ] : 0.0f;
            const int h0 = p * s.stride, w0 = q * s.stride, at = img * s.C * HW + h0 * s.W + w0;
            for (int j = 0; j < PIXEL_COLS; ++j) {
                const int4 c = col_table[pixel_col0 + j];
                const int h = h0 + c.y, w = w0 + c.z;
                const bool in = k_ok && c.w == 1 && h >= 0 && h < s.H && w >= 0 && w < s.W;
                b_stage[j / 4][j % 4] = in ? b[at + c.x] : (k_ok && c.w == 2 ? 1.0f : 0.0f);
            }
            digits0.advance(step);
        } else {
            for (int gr = 0; gr < AStage::groups; ++gr) {
                const int am = m0 + AStage::row(gr), kk = k0 + AStage::kk();
                // forward: a row of w; backward_data: a row of the transposed w
                const float4* row = reinterpret_cast<const float4*>(a) + ((g * M + am) * lda + kk) / 4;
                const float4 v = am < M && kk < k_end ? *row : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                a_stage[gr][0] = v.x, a_stage[gr][1] = v.y, a_stage[gr][2] = v.z, a_stage[gr][3] = v.w;
            }
            gather_b(digits0, k0 + BStage::kk(0), b_stage[0]);
            gather_b(digits1, k0 + BStage::kk(1), b_stage[1]);
            digits0.advance(step);
            digits1.advance(step);
        }
    };
    auto store_slice = [&](int buf) {
        if constexpr (PIXEL_K) {
            for (int q = 0; q < PIXEL_ROWS / 4; ++q)
                *reinterpret_cast<float4*>(&tiles.a[buf][pixel_kk][pixel_row0 + 4 * q]) =
                    make_float4(a_stage[q][0], a_stage[q][1], a_stage[q][2], a_stage[q][3]);
            for (int q = 0; q < PIXEL_COLS / 4; ++q)
                *reinterpret_cast<float4*>(&tiles.b[buf][pixel_kk][pixel_col0 + 4 * q]) =
                    make_float4(b_stage[q][0], b_stage[q][1], b_stage[q][2], b_stage[q][3]);
        } else {
            for (int gr = 0; gr < AStage::groups; ++gr)
                for (int j = 0; j < 4; ++j) tiles.a[buf][AStage::kk() + j][AStage::row(gr)] = a_stage[gr][j];
            for (int gr = 0; gr < BStage::groups; ++gr)
                for (int j = 0; j < 4; ++j) tiles.b[buf][BStage::kk(gr)][b_lane + 32 * j] = b_stage[gr][j];
        }
    };

    float acc[TM][TN] = {};
    tile_k_loop(k_begin, k_end, tiles, fetch_slice, store_slice, acc);

    if (PIXEL_K) {
        out += part * split.stride;
        bias_grad += part * split.stride;
    }

    // ---- the epilogue: scatter C into the output tensor, a column's offset decoded once ----
    for (int j = 0; j < TN; ++j) {
        const int n = n0 + tile_col(j);
        if (PIXEL_K && n == N) {  // the column of ones: db
            for (int i = 0; i < TM; ++i) {
                const int m = m0 + tile_row(i);
                if (m < M) bias_grad[g * Kg + m] = acc[i][j];
            }
        }
        if (n >= N) continue;
        int at;  // the output offset of (row 0 of the group, column n); rows are `row_stride` apart
        int row_stride;
        if (PASS == ConvPass::Forward) {
            const int img = n / PQ, pq = n - img * PQ;
            at = (img * s.K + g * Kg) * PQ + pq, row_stride = PQ;
        } else if (PASS == ConvPass::BackwardData) {
            const int img = n / HW, hw = n - img * HW;
            at = (img * s.C + g * Cg) * HW + hw, row_stride = HW;
        } else {
            at = g * Kg * N + n, row_stride = N;
        }
        for (int i = 0; i < TM; ++i) {
            const int m = m0 + tile_row(i);
            if (m >= M) continue;
            const int o = at + m * row_stride;
            float v = acc[i][j];
            if (PASS == ConvPass::Forward && bias) v += bias[g * Kg + m];
            if (PASS == ConvPass::Forward && relu && v < 0.0f) v = 0.0f;  // as relu_forward: NaN stays
            if (PASS == ConvPass::BackwardData && relu_y && !(relu_y[o] > 0.0f)) v = 0.0f;  // as relu_backward
            out[o] = v;
        }
    }
}

// The A operand of forward (TRANSPOSE false: w's rows as they are) or of backward_data (TRANSPOSE: w (G, Kg, Cg,
// R, S) to (G, Cg, Kg, R, S), so that row c of a group is contiguous over kk = (k, r, s)), each row padded with
// zeros to `ld` floats. One thread per element of the result.
template <bool TRANSPOSE>
__global__ void __launch_bounds__(256) conv_filter_rows(ConvShape s, const float* __restrict__ w, int ld,
                                                        float* __restrict__ rows) {
    const int RS = s.R * s.S, Cg = s.Cg(), Kg = s.Kg(), K = TRANSPOSE ? Kg * RS : Cg * RS;
    const int e = blockIdx.x * 256 + threadIdx.x, row = e / ld, kk = e - row * ld;
    if (row >= (TRANSPOSE ? s.groups * Cg : s.K)) return;
    float v = 0.0f;
    if (kk < K && TRANSPOSE) {
        const int g = row / Cg, c = row - g * Cg, k = kk / RS, rs = kk - k * RS;
        v = w[((g * Kg + k) * Cg + c) * RS + rs];
    } else if (kk < K) {
        v = w[row * K + kk];
    }
    rows[e] = v;
}

// backward_data for layers with few input channels per group (conv1: 3), where the implicit GEMM's M = Cg
// would fill 3 of a tile's 64 rows. One thread per dx element sums over the filters of its group and over
// only the taps that exist: r = (h + pad) mod stride, then every stride-th, so a strided layer skips the
// (stride^2 - 1) / stride^2 of taps that the GEMM formulation multiplies by zero. relu_y: as the GEMM's.
__global__ void __launch_bounds__(256) conv_backward_data_direct(ConvShape s, const float* __restrict__ w,
                                                                 const float* __restrict__ dy, float* __restrict__ dx,
                                                                 const float* __restrict__ relu_y) {
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
    dx[e] = relu_y && !(relu_y[e] > 0.0f) ? 0.0f : acc;
}

// The split filter gradient's second half: dw and db are the sums of the partials, in range order. The partials of
// range z are dw's (K, Cg R S) floats followed by db's K, `stride` floats after range z - 1's.
__global__ void __launch_bounds__(256) conv_filter_reduce(const float* __restrict__ partial, int splits,
                                                          long long stride, float* __restrict__ dw, int dw_size,
                                                          float* __restrict__ db, int K) {
    const int e = blockIdx.x * 256 + threadIdx.x;
    if (e >= dw_size + K) return;
    float sum = 0.0f;
    for (int z = 0; z < splits; ++z) sum += partial[z * stride + e];
    if (e < dw_size) dw[e] = sum;
    else db[e - dw_size] = sum;
}

namespace {

template <ConvPass PASS, int BM, bool UNIT_STRIDE>
void launch_conv_variant(const ConvShape& s, const SplitK& split, int lda, const float* a, const float* b,
                         const float* bias, float* out, float* bias_grad, bool relu, const float* relu_y,
                         cudaStream_t stream) {
    int M, N, K;
    conv_gemm_dims<PASS>(s, M, N, K);
    const int columns = PASS == ConvPass::BackwardFilter ? N + 1 : N;  // backward_filter: and the column of ones
    const dim3 grid(ceil_div(columns, kTileN), ceil_div(M, BM), unsigned(s.groups * split.count));
    const KStep step = PASS == ConvPass::BackwardFilter ? make_k_step(kTileBK, s.P, s.Q) : make_k_step(kTileBK, s.R, s.S);
    PA_LAUNCH((conv_implicit_gemm<PASS, BM, UNIT_STRIDE>), grid, kTileThreads, 0, stream, s, split, step, lda, a, b,
              bias, out, bias_grad, relu, relu_y);
}

template <ConvPass PASS, bool UNIT_STRIDE>
void launch_conv_rows(const ConvShape& s, int M, const SplitK& split, int lda, const float* a, const float* b,
                      const float* bias, float* out, float* bias_grad, bool relu, const float* relu_y,
                      cudaStream_t stream) {
    if (tile_rows_for(M) == 64)
        launch_conv_variant<PASS, 64, UNIT_STRIDE>(s, split, lda, a, b, bias, out, bias_grad, relu, relu_y, stream);
    else
        launch_conv_variant<PASS, 128, UNIT_STRIDE>(s, split, lda, a, b, bias, out, bias_grad, relu, relu_y, stream);
}

// forward (a = w) and backward_data (a = w, to be transposed): one launch, results in place, A's rows first made
// ready for 16-byte loads (conv_filter_rows) unless w's own rows are. backward_filter (bias_grad = db): the split
// the grid needs, through a workspace and conv_filter_reduce.
template <ConvPass PASS>
void launch_conv(const ConvShape& s, const float* a, const float* b, const float* bias, float* out, float* bias_grad,
                 bool relu, const float* relu_y, cudaStream_t stream) {
    int M, N, K;
    conv_gemm_dims<PASS>(s, M, N, K);
    if (M <= 0 || N <= 0) return;
    const long long columns = PASS == ConvPass::BackwardFilter ? N + 1 : N;  // backward_filter: and the ones
    const long long grid_x = (columns + kTileN - 1) / kTileN, grid_y = (M + tile_rows_for(M) - 1) / tile_rows_for(M);
    if (grid_y > 65535 || s.groups > 65535)
        throw KernelError("conv: the problem is too large for one launch's grid");
    SplitK split;
    if (PASS == ConvPass::BackwardFilter) split = choose_split_k(grid_x * grid_y, s.groups, K, kTileBK, sm_count());
    const long long dw_size = (long long)s.K * N;  // backward_filter: dw's floats (N = Cg R S)
    split.stride = split.count > 1 ? dw_size + s.K : 0;
    Scratch workspace(split.count > 1 ? size_t(split.count) * size_t(split.stride) * sizeof(float) : 0, stream);
    float* dst = split.count > 1 ? workspace.floats() : out;
    float* bias_dst = split.count > 1 ? workspace.floats() + dw_size : bias_grad;
    constexpr bool TRANSPOSE = PASS == ConvPass::BackwardData;
    const bool copy_rows = PASS != ConvPass::BackwardFilter && (TRANSPOSE || !aligned16(a) || K % 4 != 0);
    const int lda = copy_rows ? (K + 3) / 4 * 4 : K;
    const long long row_floats = (long long)s.groups * M * lda;
    Scratch rows(copy_rows ? size_t(row_floats) * sizeof(float) : 0, stream);
    if constexpr (PASS != ConvPass::BackwardFilter) {
        if (copy_rows) {
            PA_LAUNCH(conv_filter_rows<TRANSPOSE>, ceil_div(row_floats, 256), 256, 0, stream, s, a, lda, rows.floats());
            a = rows.floats();
        }
    }
    bool unit_stride_done = false;
    if constexpr (PASS == ConvPass::BackwardData) {
        if (s.stride == 1)
            launch_conv_rows<PASS, true>(s, M, split, lda, a, b, bias, dst, bias_dst, relu, relu_y, stream);
        unit_stride_done = s.stride == 1;
    }
    if (!unit_stride_done)
        launch_conv_rows<PASS, false>(s, M, split, lda, a, b, bias, dst, bias_dst, relu, relu_y, stream);
    if (split.count > 1)
        PA_LAUNCH(conv_filter_reduce, ceil_div(dw_size + s.K, 256), 256, 0, stream, workspace.floats(), split.count,
                  split.stride, out, int(dw_size), bias_grad, s.K);
}

ConvShape make_shape(int N, int C, int H, int W, int K, int R, int S, int stride, int pad, int groups) {
    return ConvShape{N, C, H, W, K, R, S, (H + 2 * pad - R) / stride + 1, (W + 2 * pad - S) / stride + 1,
                     stride, pad, groups};
}

}  // namespace

void conv_forward(const float* x, const float* w, const float* b, float* y, int N, int C, int H, int W, int K, int R,
                  int S, int stride, int pad, int groups, Stream stream, bool relu) {
    const ConvShape s = make_shape(N, C, H, W, K, R, S, stride, pad, groups);
    launch_conv<ConvPass::Forward>(s, w, x, b, y, nullptr, relu, nullptr, as_stream(stream));
}

void conv_backward_data(const float* dy, const float* w, float* dx, int N, int C, int H, int W, int K, int R, int S,
                        int stride, int pad, int groups, Stream stream, const float* relu_y) {
    const ConvShape s = make_shape(N, C, H, W, K, R, S, stride, pad, groups);
    const cudaStream_t st = as_stream(stream);
    // Below 16 channels per group the GEMM tile would be mostly padding: the direct kernel is cheaper.
    if (s.Cg() < 16) {
        const int64_t elements = int64_t(N) * C * H * W;
        if (elements > 0)
            PA_LAUNCH(conv_backward_data_direct, ceil_div(elements, 256), 256, 0, st, s, w, dy, dx, relu_y);
    } else {
        launch_conv<ConvPass::BackwardData>(s, w, dy, nullptr, dx, nullptr, false, relu_y, st);
    }
}

void conv_backward_filter(const float* dy, const float* x, float* dw, float* db, int N, int C, int H, int W, int K,
                          int R, int S, int stride, int pad, int groups, Stream stream) {
    const ConvShape s = make_shape(N, C, H, W, K, R, S, stride, pad, groups);
    const cudaStream_t st = as_stream(stream);
    launch_conv<ConvPass::BackwardFilter>(s, dy, x, nullptr, dw, db, false, nullptr, st);
}

void conv_backward(const float* dy, const float* x, const float* w, float* dx, float* dw, float* db, int N, int C,
                   int H, int W, int K, int R, int S, int stride, int pad, int groups, Stream stream) {
    conv_backward_data(dy, w, dx, N, C, H, W, K, R, S, stride, pad, groups, stream);
    conv_backward_filter(dy, x, dw, db, N, C, H, W, K, R, S, stride, pad, groups, stream);
}

}  // namespace pa
