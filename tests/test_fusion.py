"""The fused epilogues (kernels/conv.cu, gemm.cu, pool.cu) against the float64 reference of the two ops they
stand for, and which ReLU layers the network runs inside its neighbours (model.fused_relus)."""

import numpy as np
import pytest
from conftest import rel_err

import pyalexnet as pa
from pyalexnet import reference as R
from pyalexnet.model import fused_relus, layer_specs

mod = pa._backend.active.module
TOL = 1e-5


def _stream():
    return pa._backend.active.stream()


def _poisoned(shape):
    return pa.asarray(np.full(shape, np.nan, np.float32))


@pytest.mark.parametrize("case", [(2, 3, 35, 33, 16, 11, 4, 2), (1, 64, 13, 13, 192, 3, 1, 1), (3, 5, 9, 7, 70, 3, 1, 0)])
def test_conv_forward_with_relu(rng, case):
    n, c, h, w, k, r, stride, pad = case
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = (rng.standard_normal((k, c, r, r)) / np.sqrt(c * r * r)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    ref = R.relu_forward(R.conv2d_forward(x, wt, b, stride, pad, 1))
    y = _poisoned(ref.shape)
    mod.conv_forward(pa.asarray(x), pa.asarray(wt), pa.asarray(b), y, stride, pad, 1, stream=_stream(), relu=True)
    assert rel_err(y, ref) < TOL
    assert (pa.to_numpy(y) >= 0).all()


@pytest.mark.parametrize("batch,n_in,n_out", [(3, 2000, 50), (128, 300, 257), (1, 17, 1)])
def test_linear_forward_with_relu_split_or_not(rng, batch, n_in, n_out):
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    w = (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    x[0, 0] = np.nan  # NaN stays NaN through the ReLU, as relu_forward keeps it
    y = _poisoned((batch, n_out))
    mod.linear_forward(pa.asarray(x), pa.asarray(w), pa.asarray(b), y, stream=_stream(), relu=True)
    got = pa.to_numpy(y)
    assert np.isnan(got[0]).all() and not np.isnan(got[1:]).any()
    ref = R.relu_forward(R.linear_forward(x[1:], w, b))
    assert rel_err(got[1:], ref) < TOL


@pytest.mark.parametrize("case", [(2, 16, 13, 13, 24, 3, 1, 1), (1, 32, 27, 27, 64, 5, 1, 2), (2, 3, 19, 19, 8, 5, 2, 1)])
def test_conv_backward_data_times_the_relu_derivative(rng, case):
    # x is a ReLU's output (zeros where it cut), so dx is also zero there: the GEMM path and the direct one.
    n, c, h, w, k, r, stride, pad = case
    x = np.maximum(rng.standard_normal((n, c, h, w)), 0).astype(np.float32)
    wt = (rng.standard_normal((k, c, r, r)) / np.sqrt(c * r * r)).astype(np.float32)
    p = (h + 2 * pad - r) // stride + 1
    dy = rng.standard_normal((n, k, p, p)).astype(np.float32)
    ref_dx = R.relu_backward(R.conv2d_backward(dy, x, wt, stride, pad, 1)[0], x)
    dx = _poisoned(x.shape)
    mod.conv_backward_data(pa.asarray(dy), pa.asarray(wt), dx, stride, pad, 1, stream=_stream(),
                           relu_y=pa.asarray(x))
    assert rel_err(dx, ref_dx) < TOL
    assert (pa.to_numpy(dx)[x <= 0] == 0).all()


def test_conv_backward_data_relu_y_is_checked(rng):
    dy, wt = pa.asarray(np.zeros((1, 4, 5, 5), np.float32)), pa.asarray(np.zeros((4, 3, 3, 3), np.float32))
    dx = pa.asarray(np.zeros((1, 3, 7, 7), np.float32))
    with pytest.raises(ValueError, match="relu_y: expected shape"):
        mod.conv_backward_data(dy, wt, dx, 1, 0, 1, relu_y=pa.asarray(np.zeros((1, 3, 7, 6), np.float32)))
    with pytest.raises(ValueError, match="shares memory"):
        mod.conv_backward_data(dy, wt, dx, 1, 0, 1, relu_y=dx)


@pytest.mark.parametrize("shape", [(2, 64, 55, 55), (1, 3, 7, 8), (4, 5, 13, 13)])
def test_maxpool_backward_times_the_relu_derivative(rng, shape):
    x = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    x[0, 0, :3, :3] = 0.0  # a window of zeros: its argmax is a zero, whose ReLU derivative is 0
    y = R.maxpool_forward(x, 3, 2).astype(np.float32)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    ref = R.relu_backward(R.maxpool_backward(dy, x, y, 3, 2), x)
    dx = _poisoned(shape)
    mod.maxpool_backward(pa.asarray(dy), pa.asarray(x), pa.asarray(y), dx, 3, 2, stream=_stream(), relu=True)
    assert rel_err(dx, ref) < TOL
    assert pa.to_numpy(dx)[0, 0, 0, 0] == 0.0


def test_which_relus_run_inside_their_neighbours():
    tv, paper = layer_specs("torchvision", 1000, 1.0), layer_specs("paper", 1000, 1.0)
    for specs in (tv, paper):
        fused = fused_relus(specs)
        relus = {i for i, s in enumerate(specs) if s[0] == "relu"}
        assert fused["forward"] == relus  # every ReLU in AlexNet follows a conv or an FC layer
        for i in fused["backward"]:
            assert specs[i + 1][0] in ("pool", "conv")
    # torchvision: relu1, relu2, relu5 before a pool; relu3, relu4 before a conv; the FC ReLUs before dropout or fc8
    assert len(fused_relus(tv)["backward"]) == 5
    # paper: relu1 and relu2 before LRN stay separate
    assert len(fused_relus(paper)["backward"]) == 3
