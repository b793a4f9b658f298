"""Tier 2: every kernel on the active backend against the float64 reference.

Random inputs, batch 1, odd sizes and sizes that are not multiples of the 64 x 64 GEMM tile, unaligned
arrays (the scalar paths), and outputs poisoned with NaN (conftest). fp32 SIMT: relative error < 1e-5.
"""

import numpy as np
import pytest
from conftest import randn, rel_err

import pyalexnet as pa
from pyalexnet import reference as R

TOL = 1e-5


def _unaligned(rng, *shape):
    """A C-contiguous float32 array whose data is not 16-byte aligned (so kernels take the scalar path)."""
    n = int(np.prod(shape))
    buf = pa.asarray(rng.standard_normal(n + 1).astype(np.float32))
    return buf[1:].reshape(shape)


@pytest.mark.parametrize("shape", [(1,), (7,), (2, 3, 5), (128, 4096), (3, 96, 55, 55), ()])
def test_relu_forward_backward(rng, shape):
    x = randn(rng, *shape)
    y = pa.ops.relu_forward(x)
    assert rel_err(y, R.relu_forward(pa.to_numpy(x))) == 0.0
    dy = randn(rng, *shape)
    dx = pa.ops.relu_backward(dy, y)
    assert rel_err(dx, R.relu_backward(pa.to_numpy(dy), pa.to_numpy(y))) == 0.0


def test_relu_unaligned_and_nan(rng):
    x = _unaligned(rng, 1001)
    x[3] = np.nan
    y = pa.to_numpy(pa.ops.relu_forward(x))
    ref = R.relu_forward(pa.to_numpy(x))
    assert np.isnan(y[3])
    np.testing.assert_array_equal(np.delete(y, 3), np.delete(ref, 3))


def test_relu_does_not_modify_its_input(rng):
    x = randn(rng, 33)
    before = pa.to_numpy(x).copy()
    pa.ops.relu_backward(x, pa.ops.relu_forward(x))
    np.testing.assert_array_equal(pa.to_numpy(x), before)


LINEAR_SHAPES = [  # (batch, in, out)
    (1, 1, 1),
    (1, 9216, 13),
    (2, 37, 65),
    (5, 64, 64),
    (7, 130, 67),
    (128, 256, 100),
    (3, 4096, 1000),
]


@pytest.mark.parametrize("batch,n_in,n_out", LINEAR_SHAPES)
def test_linear_forward_backward(rng, batch, n_in, n_out):
    x, w, b = randn(rng, batch, n_in), randn(rng, n_out, n_in, scale=0.1), randn(rng, n_out)
    y = pa.ops.linear_forward(x, w, b)
    xh, wh, bh = (pa.to_numpy(a) for a in (x, w, b))
    assert rel_err(y, R.linear_forward(xh, wh, bh)) < TOL
    dy = randn(rng, batch, n_out)
    for ours, ref in zip(pa.ops.linear_backward(dy, x, w), R.linear_backward(pa.to_numpy(dy), xh, wh)):
        assert rel_err(ours, ref) < TOL


def test_linear_without_bias_and_unaligned(rng):
    x, w = _unaligned(rng, 3, 21), _unaligned(rng, 10, 21)
    y = pa.ops.linear_forward(x, w, None)
    assert rel_err(y, R.linear_forward(pa.to_numpy(x), pa.to_numpy(w))) < TOL
    dy = _unaligned(rng, 3, 10)
    for ours, ref in zip(pa.ops.linear_backward(dy, x, w), R.linear_backward(*(pa.to_numpy(a) for a in (dy, x, w)))):
        assert rel_err(ours, ref) < TOL


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (65, 63, 17), (64, 128, 32), (3, 5, 300), (68, 132, 36), (4, 8, 1000)])
def test_sgemm_is_bitwise_exact_on_small_integers(rng, trans_a, trans_b, m, n, k):
    # Products and sums of small integers are exact in float32, so the result must equal the reference bit
    # for bit, whatever the summation order: any indexing slip shows.
    a = rng.integers(-3, 4, (k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.integers(-3, 4, (n, k) if trans_b else (k, n)).astype(np.float32)
    bias = rng.integers(-3, 4, n).astype(np.float32)
    c = pa.asarray(np.full((m, n), np.nan, np.float32))
    mod = pa._backend.active.module
    mod.sgemm(pa.asarray(a), pa.asarray(b), c, trans_a, trans_b, 1.0, 0.0, pa.asarray(bias))
    ref = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b) + bias
    np.testing.assert_array_equal(pa.to_numpy(c), ref)


def test_sgemm_alpha_beta_accumulate(rng):
    a, b = randn(rng, 70, 30), randn(rng, 30, 50)
    c0 = rng.standard_normal((70, 50)).astype(np.float32)
    c = pa.asarray(c0.copy())
    pa._backend.active.module.sgemm(a, b, c, False, False, 0.5, 2.0, None)
    ref = 0.5 * pa.to_numpy(a).astype(np.float64) @ pa.to_numpy(b) + 2.0 * c0
    assert rel_err(c, ref) < TOL


@pytest.mark.parametrize("batch,classes", [(1, 1), (1, 10), (3, 1000), (128, 1000), (5, 257)])
@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
def test_softmax_cross_entropy(rng, batch, classes, label_dtype):
    logits = randn(rng, batch, classes, scale=3.0)
    labels = rng.integers(0, classes, batch).astype(label_dtype)
    loss, dlogits = pa.ops.softmax_cross_entropy(logits, pa.asarray(labels))
    ref_loss, ref_d = R.softmax_cross_entropy(pa.to_numpy(logits), labels)
    assert isinstance(loss, float)
    assert loss == pytest.approx(ref_loss, rel=TOL, abs=1e-6)
    assert rel_err(dlogits, ref_d) < TOL


def test_softmax_cross_entropy_huge_logits(rng):
    z = rng.standard_normal((4, 50)).astype(np.float32) * 1e4
    labels = np.array([0, 10, 20, 49], np.int64)
    loss, d = pa.ops.softmax_cross_entropy(pa.asarray(z), pa.asarray(labels))
    ref_loss, ref_d = R.softmax_cross_entropy(z, labels)
    assert np.isfinite(loss) and np.isfinite(pa.to_numpy(d)).all()
    assert loss == pytest.approx(ref_loss, rel=TOL)
    assert rel_err(d, ref_d) < TOL


def test_softmax_cross_entropy_is_deterministic(rng):
    z, labels = randn(rng, 300, 1000), pa.asarray(rng.integers(0, 1000, 300).astype(np.int32))
    first = pa.ops.softmax_cross_entropy(z, labels)
    second = pa.ops.softmax_cross_entropy(z, labels)
    assert first[0] == second[0]
    np.testing.assert_array_equal(pa.to_numpy(first[1]), pa.to_numpy(second[1]))


@pytest.mark.parametrize("n", [1, 3, 4, 1001, 4096 * 9216 // 64])
def test_sgd_update(rng, n):
    w0, dw, v0 = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    w, v = pa.asarray(w0.copy()), pa.asarray(v0.copy())
    pa.ops.sgd_update(w, pa.asarray(dw), v, lr=0.01, momentum=0.9, weight_decay=5e-4)
    ref_w, ref_v = R.sgd_update(w0, dw, v0, 0.01, 0.9, 5e-4)
    assert rel_err(w, ref_w) < TOL
    assert rel_err(v, ref_v) < TOL


def test_sgd_update_unaligned_multidimensional(rng):
    w, dw, v = _unaligned(rng, 3, 7, 5), _unaligned(rng, 3, 7, 5), _unaligned(rng, 3, 7, 5)
    w0, dw0, v0 = (pa.to_numpy(a).copy() for a in (w, dw, v))
    for _ in range(3):
        pa.ops.sgd_update(w, dw, v, lr=0.1)
        w0, v0 = R.sgd_update(w0, dw0, v0, 0.1)
    assert rel_err(w, w0) < TOL
    assert rel_err(v, v0) < TOL


def test_sgd_update_many_in_one_call(rng):
    # 40 tensors: two launches of the kernel's 32-tensor table; sizes around the float4 chunk, and unaligned ones.
    sizes = [1, 3, 4, 5, 7, 8, 1001, 64 * 363, 17] * 4 + [2, 1, 4096, 6]
    mod = pa._backend.active.module
    ws, dws, vs, refs = [], [], [], []
    for i, n in enumerate(sizes):
        make = (lambda: _unaligned(rng, n)) if i % 3 == 2 else (lambda: pa.asarray(rng.standard_normal(n).astype(np.float32)))
        w, dw, v = make(), make(), make()
        refs.append(R.sgd_update(pa.to_numpy(w).copy(), pa.to_numpy(dw).copy(), pa.to_numpy(v).copy(), 0.02, 0.8, 1e-3))
        ws.append(w), dws.append(dw), vs.append(v)
    mod.sgd_update_many(ws, dws, vs, 0.02, 0.8, 1e-3, stream=pa._backend.active.stream())
    for w, v, (ref_w, ref_v) in zip(ws, vs, refs):
        assert rel_err(w, ref_w) < TOL and rel_err(v, ref_v) < TOL


def test_sgd_update_many_equals_one_tensor_at_a_time(rng):
    mod = pa._backend.active.module
    tensors = [[rng.standard_normal(n).astype(np.float32) for _ in range(3)] for n in (9, 4096, 1)]
    many = [[pa.asarray(a.copy()) for a in t] for t in tensors]
    one = [[pa.asarray(a.copy()) for a in t] for t in tensors]
    mod.sgd_update_many([t[0] for t in many], [t[1] for t in many], [t[2] for t in many], 0.01, 0.9, 5e-4)
    for w, dw, v in one:
        pa.ops.sgd_update(w, dw, v, lr=0.01, momentum=0.9, weight_decay=5e-4)
    for a, b in zip(many, one):
        np.testing.assert_array_equal(pa.to_numpy(a[0]), pa.to_numpy(b[0]))
        np.testing.assert_array_equal(pa.to_numpy(a[2]), pa.to_numpy(b[2]))


def test_sgd_update_many_bad_input(rng):
    mod = pa._backend.active.module
    a, b, c, d = (pa.asarray(rng.standard_normal(8).astype(np.float32)) for _ in range(4))
    short = pa.asarray(np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="same length"):
        mod.sgd_update_many([a], [b, c], [d], 0.1, 0.9, 0.0)
    with pytest.raises(ValueError, match=r"dw\[1\]: expected shape"):
        mod.sgd_update_many([a, b], [c, short], [d, pa.asarray(np.zeros(8, np.float32))], 0.1, 0.9, 0.0)
    with pytest.raises(ValueError, match=r"shares memory"):
        mod.sgd_update_many([a, b], [c, c], [d, a], 0.1, 0.9, 0.0)  # tensor 1's v is tensor 0's w
    with pytest.raises(ValueError, match="lr"):
        mod.sgd_update_many([a], [b], [c], 0.0, 0.9, 0.0)
    with pytest.raises(ValueError, match="momentum"):
        mod.sgd_update_many([a], [b], [c], 0.1, 1.0, 0.0)
    with pytest.raises(TypeError, match=r"w\[0\]"):
        mod.sgd_update_many([a.astype(np.float64)], [b], [c], 0.1, 0.9, 0.0)
    mod.sgd_update_many([], [], [], 0.1, 0.9, 0.0)  # nothing to do


def test_sgd_with_torch_matches_five_steps(torch, rng):
    w0 = rng.standard_normal(1000).astype(np.float32)
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(5)]
    tw = torch.tensor(w0.copy(), requires_grad=True)
    opt = torch.optim.SGD([tw], lr=0.01, momentum=0.9, weight_decay=5e-4)
    w, v = pa.asarray(w0.copy()), pa.asarray(np.zeros(1000, np.float32))
    for g in grads:
        tw.grad = torch.tensor(g)
        opt.step()
        pa.ops.sgd_update(w, pa.asarray(g), v, 0.01, 0.9, 5e-4)
    assert rel_err(w, tw.detach().numpy()) < TOL


# ---- augment_batch's per-channel scale ------------------------------------------------------------------------------
def _augment_replay(images, mean, params, shift, crop, scale):
    """kernels/augment.cu in NumPy (float64), with one scale per channel."""
    out = np.empty((len(images), 3, crop, crop))
    for b, (oy, ox, flip) in enumerate(params):
        patch = images[b, oy:oy + crop, ox:ox + crop].astype(np.float64) - mean[oy:oy + crop, ox:ox + crop]
        if flip:
            patch = patch[:, ::-1]
        out[b] = (patch + shift[b]).transpose(2, 0, 1) * np.asarray(scale, np.float64)[:, None, None]
    return out


def _augment_inputs(rng, batch, size, crop):
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    mean = (rng.random((size, size, 3)) * 255).astype(np.float32)
    params = np.stack([rng.integers(0, size - crop + 1, batch), rng.integers(0, size - crop + 1, batch),
                       rng.integers(0, 2, batch)], axis=1).astype(np.int32)
    shift = rng.normal(0, 5, (batch, 3)).astype(np.float32)
    return images, mean, params, shift


@pytest.mark.parametrize("batch,size,crop,scale", [(1, 9, 9, (1.0, 0.5, 2.0)), (3, 20, 13, [0.25, -1.0, 1 / 64]),
                                                   (4, 11, 6, np.array([0.1, 0.2, 0.3]))])
def test_augment_per_channel_scale(rng, batch, size, crop, scale):
    images, mean, params, shift = _augment_inputs(rng, batch, size, crop)
    out = pa.ops.augment_batch(pa.asarray(images), pa.asarray(mean), params, shift, crop, scale)
    assert rel_err(out, _augment_replay(images, mean, params, shift, crop, scale)) < 1e-6


def test_augment_torchvision_normalisation(rng):
    # (x / 255 - m_c) / s_c as (x - 255 m_c) * 1 / (255 s_c), with torchvision's ImageNet constants.
    m, s = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    images, _, params, _ = _augment_inputs(rng, 2, 12, 8)
    mean = np.broadcast_to(255 * m, (12, 12, 3)).astype(np.float32)
    out = pa.ops.augment_batch(pa.asarray(images), pa.asarray(mean), params, np.zeros((2, 3), np.float32), 8,
                               tuple(1 / (255 * s)))
    expected = np.empty((2, 3, 8, 8))
    for b, (oy, ox, flip) in enumerate(params):
        patch = images[b, oy:oy + 8, ox:ox + 8] / 255.0
        if flip:
            patch = patch[:, ::-1]
        expected[b] = ((patch - m) / s).transpose(2, 0, 1)
    assert rel_err(out, expected) < 1e-6


def test_augment_scalar_scale_equals_three_equal_scales(rng):
    images, mean, params, shift = _augment_inputs(rng, 2, 10, 7)
    args = (pa.asarray(images), pa.asarray(mean), params, shift, 7)
    np.testing.assert_array_equal(pa.to_numpy(pa.ops.augment_batch(*args, 0.5)),
                                  pa.to_numpy(pa.ops.augment_batch(*args, (0.5, 0.5, 0.5))))


@pytest.mark.parametrize("scale,error,match", [((1.0, 2.0), ValueError, "3 numbers"), ([1.0] * 4, ValueError, "3 numbers"),
                                               ((1.0, float("nan"), 1.0), ValueError, "finite"),
                                               ((1.0, 1e300, 1.0), ValueError, "finite"), (float("inf"), ValueError, "finite"),
                                               ("abc", TypeError, "scale"), ((1.0, "x", 1.0), TypeError, r"scale\[1\]"),
                                               (None, TypeError, "scale")])
def test_augment_bad_scale(rng, scale, error, match):
    images, mean, params, shift = _augment_inputs(rng, 1, 6, 4)
    with pytest.raises(error, match=match):
        pa.ops.augment_batch(pa.asarray(images), pa.asarray(mean), params, shift, 4, scale)


@pytest.mark.emu  # host arrays straight into the module
@pytest.mark.parametrize("scale,error", [((1.0, 2.0), ValueError), ("abc", TypeError), ((1.0, None, 2.0), TypeError),
                                         (float("nan"), ValueError), ((1.0, 1e300, 1.0), ValueError)])
def test_augment_binding_checks_scale(rng, scale, error):
    images, mean, params, shift = _augment_inputs(rng, 1, 6, 4)
    out = np.empty((1, 3, 4, 4), np.float32)
    with pytest.raises(error, match="scale"):
        pa._backend.active.module.augment_batch(images, mean, params, shift, out, scale)


# ---- __cuda_array_interface__ v3 streams (cuda only) -----------------------------------------------------------------
class _WithStream:
    """An array's CUDA interface with its "stream" entry replaced."""

    def __init__(self, a, stream):
        self.__cuda_array_interface__ = {**a.__cuda_array_interface__, "version": 3, "stream": stream}


def _spin_then_fill():
    """A CuPy kernel that busy-waits on the GPU, then writes x[i] = i + 1: a producer that is surely still
    running when the host launches the consumer."""
    import cupy as cp

    return cp.RawKernel(r"""
    extern "C" __global__ void spin_then_fill(float* x, int n, long long cycles) {
        const long long start = clock64();
        while (clock64() - start < cycles) {}
        for (int i = threadIdx.x; i < n; i += blockDim.x) x[i] = 1.0f + i;
    }""", "spin_then_fill")


@pytest.mark.gpu
@pytest.mark.parametrize("producer_kind", ["stream", "legacy default"])
def test_kernels_wait_for_the_producers_stream(producer_kind):
    import cupy as cp

    n = 4096
    x, y = cp.zeros(n, cp.float32), cp.full(n, -1.0, cp.float32)
    cp.cuda.Device().synchronize()
    producer = cp.cuda.Stream(non_blocking=True) if producer_kind == "stream" else cp.cuda.Stream.null
    consumer = cp.cuda.Stream(non_blocking=True)  # never implicitly ordered after either producer
    with producer:  # x's interface now names the producer's stream (1 for the legacy default one)
        _spin_then_fill()((1,), (256,), (x, cp.int32(n), cp.int64(500_000_000)))  # a few hundred ms
        assert x.__cuda_array_interface__["stream"] == (producer.ptr or 1)
        pa._backend.active.module.relu_forward(x, y, stream=consumer.ptr)
    consumer.synchronize()  # only ours: if our stream had not waited, y would hold relu(0) = 0
    np.testing.assert_array_equal(y.get(), np.arange(1, n + 1, dtype=np.float32))
    producer.synchronize()


@pytest.mark.gpu
def test_same_stream_and_no_stream_need_no_wait():
    import cupy as cp

    x = cp.asarray(np.arange(-3, 5, dtype=np.float32))
    for stream in (None, 1):
        y = cp.empty_like(x)
        pa._backend.active.module.relu_forward(_WithStream(x, stream), y, stream=0)
        cp.cuda.Stream.null.synchronize()
        np.testing.assert_array_equal(y.get(), np.maximum(np.arange(-3, 5), 0))


@pytest.mark.gpu
@pytest.mark.parametrize("stream,error,match", [(0, ValueError, "stream is 0, which the protocol disallows"),
                                                ("1", TypeError, "stream must be an int or None"),
                                                (-5, ValueError, "is not a stream handle")])
def test_bad_interface_streams(stream, error, match):
    import cupy as cp

    x = cp.zeros(8, cp.float32)
    with pytest.raises(error, match=match):
        pa._backend.active.module.relu_forward(_WithStream(x, stream), cp.empty_like(x))
