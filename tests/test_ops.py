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
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (65, 63, 17), (64, 128, 32), (3, 5, 300)])
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
