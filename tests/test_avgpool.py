"""Adaptive average pooling (PyTorch's AdaptiveAvgPool2d) on the active backend.

Against the float64 reference (random inputs, awkward sizes including inputs smaller than the output, poisoned
outputs), against PyTorch forward and backward, the reference against central differences, and bad arguments.
"""

import numpy as np
import pytest
from conftest import numeric_grad, randn, rel_err

import pyalexnet as pa
from pyalexnet import reference as R

TOL = 1e-5

CASES = [  # (input shape, output size)
    ((2, 3, 13, 13), (6, 6)),  # the torchvision variant below 224 (conv5's 13 x 13)
    ((1, 4, 6, 6), (6, 6)),  # 224 input: the identity
    ((1, 1, 1, 1), (1, 1)),
    ((1, 2, 7, 9), (1, 1)),  # global average
    ((3, 2, 4, 5), (6, 6)),  # smaller than the output: repeated windows
    ((1, 1, 1, 1), (3, 2)),  # one pixel spread everywhere
    ((1, 3, 10, 7), (3, 4)),  # not multiples: overlapping windows
    ((2, 1, 5, 11), (2, 7)),  # non-square both ways
    ((1, 5, 31, 17), (6, 6)),
    ((1, 2, 2, 13), (5, 3)),  # H < OH and W > OW at once
]


@pytest.mark.parametrize("shape,out", CASES)
def test_adaptive_avgpool_vs_reference(rng, shape, out):
    x = randn(rng, *shape)
    y = pa.ops.adaptive_avgpool_forward(x, out)
    assert y.shape == shape[:2] + out
    assert rel_err(y, R.adaptive_avgpool_forward(pa.to_numpy(x), out)) < TOL
    dy = randn(rng, *y.shape)
    dx = pa.ops.adaptive_avgpool_backward(dy, x)
    assert dx.shape == shape
    assert rel_err(dx, R.adaptive_avgpool_backward(pa.to_numpy(dy), pa.to_numpy(x))) < TOL


def test_identity_when_sizes_match(rng):
    x = randn(rng, 2, 3, 6, 6)
    np.testing.assert_array_equal(pa.to_numpy(pa.ops.adaptive_avgpool_forward(x, 6)), pa.to_numpy(x))
    np.testing.assert_array_equal(pa.to_numpy(pa.ops.adaptive_avgpool_backward(x, x)), pa.to_numpy(x))


def test_int_output_size_and_default(rng):
    x = randn(rng, 1, 2, 9, 8)
    np.testing.assert_array_equal(pa.to_numpy(pa.ops.adaptive_avgpool_forward(x, 4)),
                                  pa.to_numpy(pa.ops.adaptive_avgpool_forward(x, (4, 4))))
    assert pa.ops.adaptive_avgpool_forward(x).shape == (1, 2, 6, 6)


def test_backward_is_deterministic(rng):
    x, dy = randn(rng, 2, 3, 11, 7), randn(rng, 2, 3, 6, 6)
    first = pa.to_numpy(pa.ops.adaptive_avgpool_backward(dy, x))
    np.testing.assert_array_equal(first, pa.to_numpy(pa.ops.adaptive_avgpool_backward(dy, x)))


def test_small_integers_are_exact():
    # Windows of 1, 2 or 4 elements holding small integers: every sum and division is exact in float32.
    x = np.arange(2 * 3 * 4 * 6, dtype=np.float32).reshape(2, 3, 4, 6)
    y = pa.ops.adaptive_avgpool_forward(pa.asarray(x), (2, 3))
    np.testing.assert_array_equal(pa.to_numpy(y), R.adaptive_avgpool_forward(x, (2, 3)).astype(np.float32))


@pytest.mark.parametrize("shape,out", [((2, 3, 13, 13), (6, 6)), ((1, 2, 4, 5), (6, 6)), ((2, 2, 10, 7), (3, 4)),
                                       ((1, 1, 1, 3), (2, 5))])
def test_adaptive_avgpool_matches_torch(torch, rng, shape, out):
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape[:2] + out).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.adaptive_avg_pool2d(tx, out)
    ty.backward(torch.tensor(dy))
    assert rel_err(pa.ops.adaptive_avgpool_forward(pa.asarray(x), out), ty.detach().numpy()) < TOL
    assert rel_err(pa.ops.adaptive_avgpool_backward(pa.asarray(dy), pa.asarray(x)), tx.grad.numpy()) < TOL


@pytest.mark.parametrize("shape,out", [((1, 2, 5, 4), (3, 3)), ((2, 1, 2, 3), (4, 2))])
def test_reference_backward_vs_finite_differences(rng, shape, out):
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape[:2] + out)
    numeric = numeric_grad(lambda a: R.adaptive_avgpool_forward(a, out), x, dy)
    np.testing.assert_allclose(R.adaptive_avgpool_backward(dy, x), numeric, rtol=1e-6, atol=1e-8)


def test_empty_batch(rng):
    x = pa.asarray(np.zeros((0, 3, 5, 5), np.float32))
    assert pa.ops.adaptive_avgpool_forward(x, 2).shape == (0, 3, 2, 2)
    assert pa.ops.adaptive_avgpool_backward(pa.asarray(np.zeros((0, 3, 2, 2), np.float32)), x).shape == (0, 3, 5, 5)


def test_bad_arguments(rng):
    x = randn(rng, 1, 2, 5, 5)
    f = pa.ops.adaptive_avgpool_forward
    with pytest.raises(ValueError, match="output_size"):
        f(x, 0)
    with pytest.raises(ValueError, match=r"output_size\[1\]"):
        f(x, (3, -1))
    with pytest.raises(ValueError, match="output_size"):
        f(x, (3, 3, 3))
    with pytest.raises(TypeError, match="output_size"):
        f(x, 2.5)
    with pytest.raises(TypeError, match="output_size"):
        f(x, True)
    with pytest.raises(TypeError, match="x: expected dtype float32"):
        f(pa.asarray(np.zeros((1, 2, 5, 5), np.float64)), 2)
    with pytest.raises(ValueError, match="x: expected 4 dimensions"):
        f(randn(rng, 2, 5, 5), 2)
    with pytest.raises(ValueError, match="x: must be C-contiguous"):
        f(pa.asarray(np.zeros((1, 2, 5, 10), np.float32))[..., ::2], 2)
    with pytest.raises(ValueError, match="x: expected height and width >= 1"):
        f(pa.asarray(np.zeros((1, 2, 0, 5), np.float32)), 2)
    b = pa.ops.adaptive_avgpool_backward
    with pytest.raises(ValueError, match="dy: expected shape"):
        b(randn(rng, 1, 3, 2, 2), x)  # channels differ
    with pytest.raises(ValueError, match="dy: expected shape"):
        b(pa.asarray(np.zeros((1, 2, 0, 2), np.float32)), x)
    with pytest.raises(ValueError, match="dy: expected 4 dimensions"):
        b(randn(rng, 2, 2, 2), x)
    with pytest.raises(TypeError, match="dy: expected dtype float32"):
        b(pa.asarray(np.zeros((1, 2, 2, 2), np.int32)), x)


@pytest.mark.emu  # host arrays straight into the module
def test_binding_checks_its_own_arguments(rng):
    # A direct call into the module, past the Python checks, must still refuse what would go out of bounds.
    m = pa._backend.active.module
    x = pa.to_numpy(randn(rng, 1, 2, 5, 5))
    with pytest.raises(ValueError, match="y: expected shape"):
        m.adaptive_avgpool_forward(x, np.empty((2, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="y: expected an output size"):
        m.adaptive_avgpool_forward(x, np.empty((1, 2, 0, 3), np.float32))
    with pytest.raises(ValueError, match="x: expected height and width"):
        m.adaptive_avgpool_forward(np.empty((1, 2, 5, 0), np.float32), np.empty((1, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="y: expected NCHW"):
        m.adaptive_avgpool_forward(x, np.empty((2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="dy: expected shape"):
        m.adaptive_avgpool_backward(np.empty((1, 3, 2, 2), np.float32), np.empty((1, 2, 5, 5), np.float32))
    with pytest.raises(ValueError, match="shares memory"):
        buf = np.zeros(100, np.float32)
        m.adaptive_avgpool_backward(buf[:8].reshape(1, 2, 2, 2), buf[:50].reshape(1, 2, 5, 5))
