"""The paper's own layers on the active backend: LRN, overlapping max-pooling, dropout.

Against the float64 reference (random inputs, awkward shapes, poisoned outputs), against PyTorch where it has
the op, and, for dropout, against a pure-NumPy implementation of our generator.
"""

import math

import numpy as np
import pytest
from conftest import randn, rel_err

import pyalexnet as pa
from pyalexnet import reference as R

TOL = 1e-5

LRN_SHAPES = [(1, 96, 55, 55), (2, 7, 3, 5), (1, 2, 4, 4), (3, 1, 2, 3), (1, 256, 13, 13)]


@pytest.mark.parametrize("shape", LRN_SHAPES)
@pytest.mark.parametrize("size", [5, 1, 3, 7])
def test_lrn_paper_parameters(rng, shape, size):
    x = randn(rng, *shape, scale=20.0)  # large enough that the normalisation is far from the identity
    y = pa.ops.lrn_forward(x, size=size)
    xh = pa.to_numpy(x)
    assert rel_err(y, R.lrn_forward(xh, size)) < TOL
    dy = randn(rng, *shape)
    dx = pa.ops.lrn_backward(dy, x, y, size=size)
    assert rel_err(dx, R.lrn_backward(pa.to_numpy(dy), xh, None, size)) < TOL


@pytest.mark.parametrize("alpha,beta,k", [(1e-2, 0.75, 2.0), (0.5, 0.5, 1.0), (1e-3, 1.5, 0.1), (0.0, 0.75, 2.0)])
def test_lrn_other_hyperparameters(rng, alpha, beta, k):
    x, dy = randn(rng, 2, 9, 5, 3, scale=3.0), randn(rng, 2, 9, 5, 3)
    kw = dict(size=5, alpha=alpha, beta=beta, k=k)
    y = pa.ops.lrn_forward(x, **kw)
    assert rel_err(y, R.lrn_forward(pa.to_numpy(x), **kw)) < TOL
    dx = pa.ops.lrn_backward(dy, x, y, **kw)
    assert rel_err(dx, R.lrn_backward(pa.to_numpy(dy), pa.to_numpy(x), None, **kw)) < TOL


def test_lrn_sliding_sums_survive_a_huge_channel(rng):
    # One channel a million times larger than the rest: the window sums that slide past it must not keep its
    # rounding error (or go negative).
    x = rng.standard_normal((1, 40, 3, 3)).astype(np.float32)
    x[:, 5] *= 1e6
    kw = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
    y = pa.ops.lrn_forward(pa.asarray(x), **kw)
    ref = R.lrn_forward(x, **kw)
    far = slice(12, None)  # channels whose windows no longer hold the huge one
    assert rel_err(pa.to_numpy(y)[:, far], ref[:, far]) < TOL
    assert rel_err(y, ref) < TOL


def test_lrn_matches_torch(torch, rng):
    x = rng.standard_normal((2, 16, 6, 5)).astype(np.float32) * 10
    dy = rng.standard_normal(x.shape).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.local_response_norm(tx, 5, alpha=1e-4 * 5, beta=0.75, k=2.0)
    ty.backward(torch.tensor(dy))
    y = pa.ops.lrn_forward(pa.asarray(x))
    assert rel_err(y, ty.detach().numpy()) < TOL
    assert rel_err(pa.ops.lrn_backward(pa.asarray(dy), pa.asarray(x), y), tx.grad.numpy()) < TOL


POOL_CASES = [  # (shape, size, stride)
    ((1, 96, 55, 55), 3, 2),
    ((2, 3, 13, 11), 3, 2),
    ((1, 2, 7, 8), 2, 2),
    ((1, 1, 9, 9), 3, 1),
    ((2, 2, 11, 7), 5, 3),
    ((1, 3, 4, 5), 1, 1),
    ((1, 1, 3, 3), 3, 2),
    ((1, 1, 6, 6), 2, 3),  # stride larger than the window: some inputs are in no window
]


@pytest.mark.parametrize("shape,size,stride", POOL_CASES)
def test_maxpool(rng, shape, size, stride):
    x = randn(rng, *shape)
    y = pa.ops.maxpool_forward(x, size, stride)
    assert rel_err(y, R.maxpool_forward(pa.to_numpy(x), size, stride)) == 0.0
    dy = randn(rng, *y.shape)
    dx = pa.ops.maxpool_backward(dy, x, y, size, stride)
    assert rel_err(dx, R.maxpool_backward(pa.to_numpy(dy), pa.to_numpy(x), None, size, stride)) < TOL


@pytest.mark.parametrize("size,stride", [(3, 2), (2, 1), (3, 1)])
def test_maxpool_ties_resolve_like_the_reference_bit_for_bit(rng, size, stride):
    # Values from {0, 1, 2}: most windows hold ties. Small-integer gradients sum exactly in any order.
    x = rng.integers(0, 3, (2, 3, 9, 10)).astype(np.float32)
    y = pa.ops.maxpool_forward(pa.asarray(x), size, stride)
    dy = rng.integers(-4, 5, y.shape).astype(np.float32)
    dx = pa.ops.maxpool_backward(pa.asarray(dy), pa.asarray(x), y, size, stride)
    np.testing.assert_array_equal(pa.to_numpy(dx), R.maxpool_backward(dy, x, None, size, stride))


def test_maxpool_nan_propagates_and_takes_the_gradient(rng):
    x = rng.standard_normal((1, 1, 5, 5)).astype(np.float32)
    x[0, 0, 1, 1] = np.nan
    x[0, 0, 2, 2] = np.nan
    y = pa.ops.maxpool_forward(pa.asarray(x))
    ref = R.maxpool_forward(x)
    np.testing.assert_array_equal(np.isnan(pa.to_numpy(y)), np.isnan(ref))
    dy = np.ones(y.shape, np.float32)
    dx = pa.ops.maxpool_backward(pa.asarray(dy), pa.asarray(x), y)
    np.testing.assert_array_equal(pa.to_numpy(dx), R.maxpool_backward(dy, x))


def test_maxpool_matches_torch(torch, rng):
    x = rng.standard_normal((2, 4, 27, 27)).astype(np.float32)
    dy = rng.standard_normal((2, 4, 13, 13)).astype(np.float32)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, 3, 2)
    ty.backward(torch.tensor(dy))
    y = pa.ops.maxpool_forward(pa.asarray(x))
    np.testing.assert_array_equal(pa.to_numpy(y), ty.detach().numpy())
    dx = pa.ops.maxpool_backward(pa.asarray(dy), pa.asarray(x), y)
    assert rel_err(dx, tx.grad.numpy()) < TOL


def test_maxpool_window_larger_than_input(rng):
    with pytest.raises(ValueError, match=r"x: a 3x3 pooling window does not fit an input of 2x5"):
        pa.ops.maxpool_forward(randn(rng, 1, 1, 2, 5))


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(size=0), ValueError, r"size: expected an integer >= 1"),
    (dict(stride=0), ValueError, r"stride: expected an integer >= 1"),
    (dict(size=2.5), TypeError, r"size: expected an integer"),
])
def test_maxpool_bad_hyperparameters(rng, kwargs, err, match):
    with pytest.raises(err, match=match):
        pa.ops.maxpool_forward(randn(rng, 1, 1, 6, 6), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(size=4), r"size: expected an odd window"),
    (dict(alpha=-1.0), r"alpha: expected a finite value >= 0"),
    (dict(beta=float("nan")), r"beta: expected a finite value >= 0"),
    (dict(k=0.0), r"k: expected a finite value > 0"),
])
def test_lrn_bad_hyperparameters(rng, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pa.ops.lrn_forward(randn(rng, 1, 3, 2, 2), **kwargs)


def test_lrn_needs_nchw(rng):
    with pytest.raises(ValueError, match=r"x: expected 4 dimensions"):
        pa.ops.lrn_forward(randn(rng, 3, 2, 2))


# ---- dropout ------------------------------------------------------------------------------------------------------------
def test_philox_known_answers():
    # Random123's kat_vectors, the three philox4x32 10 lines: (counter, key) -> output.
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expect in kat:
        assert tuple(int(v) for v in R.philox4x32_10(np.array(counter, np.uint32), key)) == expect


@pytest.mark.parametrize("shape", [(1,), (31,), (33,), (128,), (129,), (4, 4096), (3, 5, 7, 11)])
@pytest.mark.parametrize("p", [0.5, 0.1, 0.0])
def test_dropout_mask_is_our_generator(rng, shape, p):
    seed = 0x0123456789ABCDEF
    x = randn(rng, *shape)
    y, mask = pa.ops.dropout_forward(x, p=p, seed=seed)
    keep = pa.ops.dropout_keep(mask, shape)
    np.testing.assert_array_equal(keep, R.dropout_mask(shape, p, seed))
    n = int(np.prod(shape))
    tail = np.unpackbits(pa.ops.to_host(mask).view(np.uint8), bitorder="little")[n:]
    assert not tail.any(), "bits past the last element must be 0"
    assert rel_err(y, R.dropout_forward(pa.to_numpy(x), keep, p)) < TOL
    dy = randn(rng, *shape)
    assert rel_err(pa.ops.dropout_backward(dy, mask, p), R.dropout_backward(pa.to_numpy(dy), keep, p)) < TOL


def test_dropout_statistics_and_exact_scale(rng):
    n, p = 1_000_000, 0.5
    x = rng.uniform(1.0, 2.0, n).astype(np.float32)  # never 0, so y == 0 exactly where dropped
    y, mask = pa.ops.dropout_forward(pa.asarray(x), p=p, seed=7)
    y = pa.to_numpy(y)
    keep = pa.ops.dropout_keep(mask, (n,))
    kept = keep.mean()
    assert abs(kept - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    np.testing.assert_array_equal(y[keep], x[keep] * np.float32(1.0 / (1.0 - p)))
    assert not y[~keep].any()


def test_dropout_is_reproducible_and_seeded(rng):
    x = randn(rng, 5000)
    _, first = pa.ops.dropout_forward(x, seed=1)
    _, again = pa.ops.dropout_forward(x, seed=1)
    _, other = pa.ops.dropout_forward(x, seed=2)
    np.testing.assert_array_equal(pa.ops.to_host(first), pa.ops.to_host(again))
    assert (pa.ops.to_host(first) != pa.ops.to_host(other)).mean() > 0.9


def test_dropout_p_zero_is_the_identity(rng):
    x = randn(rng, 1000)
    y, mask = pa.ops.dropout_forward(x, p=0.0, seed=3)
    np.testing.assert_array_equal(pa.to_numpy(y), pa.to_numpy(x))


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan")])
def test_dropout_p_out_of_range(rng, p):
    with pytest.raises(ValueError, match=r"p: expected a value in \[0, 1\)"):
        pa.ops.dropout_forward(randn(rng, 10), p=p)


def test_dropout_bad_seed_and_mask(rng):
    with pytest.raises(ValueError, match=r"seed: expected an integer in \[0, 18446744073709551616\)"):
        pa.ops.dropout_forward(randn(rng, 10), seed=-1)
    with pytest.raises(TypeError, match=r"seed: expected an integer"):
        pa.ops.dropout_forward(randn(rng, 10), seed=1.5)
    _, mask = pa.ops.dropout_forward(randn(rng, 40))
    with pytest.raises(ValueError, match=r"mask: expected shape \(1,\), got \(2,\)"):
        pa.ops.dropout_backward(randn(rng, 20), mask)
    with pytest.raises(TypeError, match=r"mask: expected dtype uint32"):
        pa.ops.dropout_backward(randn(rng, 40), randn(rng, 2))
