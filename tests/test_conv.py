"""Convolution on the active backend: every AlexNet conv layer, a randomised sweep of geometries, finite
differences, determinism and bad input. fp32: relative error < 1e-5 against the float64 reference."""

import numpy as np
import pytest
from conftest import rel_err

import pyalexnet as pa
from pyalexnet import reference as R
from pyalexnet.architecture import named_conv_layers

TOL = 1e-5

ALEXNET_LAYERS = named_conv_layers()


def _case(rng, n, c, h, w, k, r, s, groups, scale=None):
    scale = scale or 1.0 / np.sqrt(c // groups * r * s)  # keeps outputs O(1) whatever the fan-in
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    wt = (rng.standard_normal((k, c // groups, r, s)) * scale).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    return x, wt, b


def _check_against_reference(rng, x, wt, b, stride, padding, groups, tol=TOL):
    y = pa.ops.conv2d_forward(pa.asarray(x), pa.asarray(wt), pa.asarray(b), stride, padding, groups)
    assert rel_err(y, R.conv2d_forward(x, wt, b, stride, padding, groups)) < tol
    dy = rng.standard_normal(y.shape).astype(np.float32)
    ours = pa.ops.conv2d_backward(pa.asarray(dy), pa.asarray(x), pa.asarray(wt), stride, padding, groups)
    for name, got, ref in zip(("dx", "dw", "db"), ours, R.conv2d_backward(dy, x, wt, stride, padding, groups)):
        assert rel_err(got, ref) < tol, name
    return y, dy, ours


@pytest.mark.parametrize("layer", ALEXNET_LAYERS, ids=[layer[0] for layer in ALEXNET_LAYERS])
def test_alexnet_layers_against_reference_and_torch(rng, layer, request):
    name, c, h, w, k, r, stride, padding, groups = layer
    x, wt, b = _case(rng, 2, c, h, w, k, r, r, groups)
    y, dy, (dx, dw, db) = _check_against_reference(rng, x, wt, b, stride, padding, groups)
    try:
        import torch
    except ImportError:
        return  # the reference comparison above stands; the PyTorch one needs the optional extra
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, wt, b))
    ty = torch.nn.functional.conv2d(tx, tw, tb, stride=stride, padding=padding, groups=groups)
    ty.backward(torch.tensor(dy))
    assert rel_err(y, ty.detach().numpy().astype(np.float64)) < TOL
    for got, t in zip((dx, dw, db), (tx, tw, tb)):
        assert rel_err(got, t.grad.numpy().astype(np.float64)) < TOL


def _random_geometries(count, seed, channels_per_group):
    rng = np.random.default_rng(seed)
    cases = []
    while len(cases) < count:
        groups = int(rng.choice([1, 2, 4]))
        c, k = groups * int(rng.integers(*channels_per_group)), groups * int(rng.integers(1, 5))
        r, s = int(rng.integers(1, 8)), int(rng.integers(1, 8))
        stride, padding = int(rng.integers(1, 5)), int(rng.integers(0, 4))
        h, w = int(rng.integers(1, 20)), int(rng.integers(1, 20))
        if h + 2 * padding < r or w + 2 * padding < s:
            continue
        cases.append((int(rng.integers(1, 4)), c, h, w, k, r, s, stride, padding, groups))
    return cases


# Few channels per group take the direct backward_data kernel; 16 or more take the implicit GEMM.
@pytest.mark.parametrize("case", _random_geometries(40, 7, (1, 5)) + _random_geometries(25, 8, (16, 21)))
def test_random_geometries(rng, case):
    n, c, h, w, k, r, s, stride, padding, groups = case
    x, wt, b = _case(rng, n, c, h, w, k, r, s, groups)
    _check_against_reference(rng, x, wt, b, stride, padding, groups)


@pytest.mark.parametrize("case", [(1, 2, 5, 4, 2, 3, 2, 2, 1, 2), (2, 1, 4, 4, 3, 2, 2, 1, 0, 1)])
def test_backward_matches_finite_differences_of_the_kernel(rng, case):
    # conv is linear in x and in w, so a central difference of sum(y * dy) is exact up to float32 rounding.
    n, c, h, w, k, r, s, stride, padding, groups = case
    x, wt, b = _case(rng, n, c, h, w, k, r, s, groups, scale=1.0)
    dy = rng.standard_normal(R.conv2d_forward(x, wt, b, stride, padding, groups).shape)

    def loss(xv, wv, bv):
        y = pa.ops.conv2d_forward(pa.asarray(xv), pa.asarray(wv), pa.asarray(bv), stride, padding, groups)
        return float(np.sum(pa.to_numpy(y).astype(np.float64) * dy))

    dx, dw, db = (pa.to_numpy(a) for a in pa.ops.conv2d_backward(
        pa.asarray(dy.astype(np.float32)), pa.asarray(x), pa.asarray(wt), stride, padding, groups))
    for arr, grad, slot in ((x, dx, 0), (wt, dw, 1), (b, db, 2)):
        numeric = np.zeros(arr.shape)
        for i in np.ndindex(*arr.shape):
            args = [x, wt, b]
            plus, minus = arr.copy(), arr.copy()
            plus[i] += 0.5
            minus[i] -= 0.5
            args[slot] = plus
            f_plus = loss(*args)
            args[slot] = minus
            numeric[i] = f_plus - loss(*args)
        assert rel_err(grad, numeric) < 1e-4


def test_backward_is_deterministic(rng):
    x, wt, _ = _case(rng, 3, 8, 13, 13, 16, 3, 3, 2)
    dy = pa.asarray(rng.standard_normal((3, 16, 13, 13)).astype(np.float32))
    first = pa.ops.conv2d_backward(dy, pa.asarray(x), pa.asarray(wt), 1, 1, 2)
    second = pa.ops.conv2d_backward(dy, pa.asarray(x), pa.asarray(wt), 1, 1, 2)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(pa.to_numpy(a), pa.to_numpy(b))


def test_without_bias(rng):
    x, wt, _ = _case(rng, 1, 3, 9, 9, 4, 3, 3, 1)
    y = pa.ops.conv2d_forward(pa.asarray(x), pa.asarray(wt), None, 2, 1)
    assert rel_err(y, R.conv2d_forward(x, wt, None, 2, 1)) < TOL


@pytest.mark.parametrize("xs,ws,kwargs,err,match", [
    ((1, 6, 8, 8), (4, 2, 3, 3), dict(groups=4), ValueError, r"groups: 6 input and 4 output channels must both divide"),
    ((1, 4, 8, 8), (4, 3, 3, 3), dict(groups=1), ValueError, r"w: expected 4 input channels per filter"),
    ((1, 4, 8, 8), (4, 4, 3, 3), dict(groups=2), ValueError, r"w: expected 2 input channels per filter"),
    ((1, 3, 4, 4), (2, 3, 7, 7), dict(padding=1), ValueError, r"w: a 7x7 kernel is larger than the 6x6 padded input"),
    ((1, 3, 4, 4), (2, 3, 3, 3), dict(stride=0), ValueError, r"stride: expected an integer >= 1"),
    ((1, 3, 4, 4), (2, 3, 3, 3), dict(padding=-1), ValueError, r"padding: expected an integer >= 0"),
    ((1, 3, 4, 4), (2, 3, 3, 3), dict(groups=0), ValueError, r"groups: expected an integer >= 1"),
    ((3, 4, 4), (2, 3, 3, 3), dict(), ValueError, r"x: expected 4 dimensions"),
])
def test_bad_geometry(xs, ws, kwargs, err, match):
    x, w = pa.asarray(np.ones(xs, np.float32)), pa.asarray(np.ones(ws, np.float32))
    with pytest.raises(err, match=match):
        pa.ops.conv2d_forward(x, w, None, **kwargs)


def test_padding_beyond_32_bit_indexing_is_refused():
    x, w = pa.asarray(np.ones((1, 1, 1, 3), np.float32)), pa.asarray(np.ones((1, 1, 1, 1), np.float32))
    with pytest.raises(ValueError, match=r"the padded height = \d+ exceeds"):
        pa._backend.active.module.conv_forward(x, w, None, pa.asarray(np.ones((1, 1, 1, 1), np.float32)),
                                               2**30 - 1, 2**30 - 1, 1)


def test_mixed_dtypes_are_a_value_error_and_a_type_error():
    x = pa.asarray(np.ones((1, 3, 5, 5), np.float32))
    w = pa.asarray(np.ones((2, 3, 3, 3), np.float64))
    with pytest.raises(ValueError, match=r"w: expected dtype float32, got float64"):
        pa.ops.conv2d_forward(x, w)
    with pytest.raises(TypeError, match=r"w: expected dtype float32, got float64"):
        pa.ops.conv2d_forward(x, w)


def test_backward_dy_shape_mismatch(rng):
    x, wt, _ = _case(rng, 1, 3, 9, 9, 4, 3, 3, 1)
    with pytest.raises(ValueError, match=r"dy: expected shape \(1, 4, 7, 7\), got \(1, 4, 9, 9\)"):
        pa.ops.conv2d_backward(pa.asarray(np.ones((1, 4, 9, 9), np.float32)), pa.asarray(x), pa.asarray(wt))
