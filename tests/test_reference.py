"""Tier 1: the float64 reference against central finite differences and against PyTorch CPU."""

import numpy as np
import pytest
from conftest import numeric_grad

from pyalexnet import reference as R

CONV_CASES = [
    # (n, c, h, w, k, r, s, stride, padding, groups)
    (1, 1, 5, 5, 1, 3, 3, 1, 0, 1),
    (2, 3, 7, 6, 4, 3, 2, 2, 1, 1),
    (1, 4, 6, 5, 6, 2, 3, 1, 2, 2),
    (2, 4, 9, 9, 4, 5, 5, 3, 1, 4),
]


def _close(a, b, tol=1e-6):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) <= tol * max(np.linalg.norm(b), 1e-12)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_backward_matches_finite_differences(rng, case):
    n, c, h, w, k, r, s, stride, padding, groups = case
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((k, c // groups, r, s))
    b = rng.standard_normal(k)
    y = R.conv2d_forward(x, wt, b, stride, padding, groups)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = R.conv2d_backward(dy, x, wt, stride, padding, groups)
    assert _close(dx, numeric_grad(lambda v: R.conv2d_forward(v, wt, b, stride, padding, groups), x, dy))
    assert _close(dw, numeric_grad(lambda v: R.conv2d_forward(x, v, b, stride, padding, groups), wt, dy))
    assert _close(db, numeric_grad(lambda v: R.conv2d_forward(x, wt, v, stride, padding, groups), b, dy))


def test_relu_backward_matches_finite_differences(rng):
    x = rng.standard_normal((3, 7))
    x[np.abs(x) < 1e-3] = 0.5  # keep clear of the kink
    dy = rng.standard_normal(x.shape)
    assert _close(R.relu_backward(dy, R.relu_forward(x)), numeric_grad(R.relu_forward, x, dy))


@pytest.mark.parametrize("size,c", [(5, 7), (3, 2), (5, 3), (1, 4)])
def test_lrn_backward_matches_finite_differences(rng, size, c):
    # Large activations and alpha so that the normalisation is far from the identity.
    x = rng.standard_normal((2, c, 3, 2)) * 10
    kw = dict(size=size, alpha=1e-2, beta=0.75, k=2.0)
    dy = rng.standard_normal(x.shape)
    dx = R.lrn_backward(dy, x, R.lrn_forward(x, **kw), **kw)
    assert _close(dx, numeric_grad(lambda v: R.lrn_forward(v, **kw), x, dy))


def test_lrn_is_the_papers_formula():
    # One pixel, three channels, n = 5 covers them all: b = a / (k + alpha * sum a^2)^beta, alpha NOT divided by n.
    a = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1)
    expect = a / (2.0 + 1e-4 * 14.0) ** 0.75
    assert np.allclose(R.lrn_forward(a), expect, rtol=1e-15)


@pytest.mark.parametrize("size,stride", [(3, 2), (2, 2), (3, 1), (2, 3)])
def test_maxpool_backward_matches_finite_differences(rng, size, stride):
    x = rng.standard_normal((2, 2, 7, 8))
    dy = rng.standard_normal(R.maxpool_forward(x, size, stride).shape)
    dx = R.maxpool_backward(dy, x, None, size, stride)
    assert _close(dx, numeric_grad(lambda v: R.maxpool_forward(v, size, stride), x, dy))


def test_maxpool_ties_go_to_the_first_maximum():
    x = np.zeros((1, 1, 3, 3))
    dx = R.maxpool_backward(np.ones((1, 1, 1, 1)), x, None, 3, 2)
    assert dx[0, 0, 0, 0] == 1.0 and dx.sum() == 1.0


def test_maxpool_propagates_nan():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 2] = np.nan
    assert np.isnan(R.maxpool_forward(x, 3, 2)).all()


def test_maxpool_rejects_a_window_larger_than_the_input():
    with pytest.raises(ValueError):
        R.maxpool_forward(np.zeros((1, 1, 2, 5)), 3, 2)


def test_linear_backward_matches_finite_differences(rng):
    x, w, b = rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    dy = rng.standard_normal((3, 4))
    dx, dw, db = R.linear_backward(dy, x, w)
    assert _close(dx, numeric_grad(lambda v: R.linear_forward(v, w, b), x, dy))
    assert _close(dw, numeric_grad(lambda v: R.linear_forward(x, v, b), w, dy))
    assert _close(db, numeric_grad(lambda v: R.linear_forward(x, w, v), b, dy))


def test_dropout_backward_matches_finite_differences(rng):
    x = rng.standard_normal((4, 6))
    mask = rng.random(x.shape) > 0.3
    dy = rng.standard_normal(x.shape)
    dx = R.dropout_backward(dy, mask, 0.3)
    assert _close(dx, numeric_grad(lambda v: R.dropout_forward(v, mask, 0.3), x, dy))
    assert np.allclose(R.dropout_forward(x, mask, 0.3)[mask], x[mask] / 0.7)


def test_softmax_cross_entropy_gradient_matches_finite_differences(rng):
    z = rng.standard_normal((3, 5))
    labels = np.array([4, 0, 2])
    _, dz = R.softmax_cross_entropy(z, labels)
    numeric = numeric_grad(lambda v: np.array(R.softmax_cross_entropy(v, labels)[0]), z, np.array(1.0))
    assert _close(dz, numeric)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    z = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]])
    loss, dz = R.softmax_cross_entropy(z, np.array([1, 2]))
    assert np.isfinite(loss) and np.isfinite(dz).all()
    assert loss == pytest.approx(1e4)  # row 0 costs 2e4, row 1 costs 0


def test_sgd_is_the_papers_rule():
    w, dw, v = np.array([1.0]), np.array([0.5]), np.array([0.2])
    w1, v1 = R.sgd_update(w, dw, v, lr=0.1, momentum=0.9, weight_decay=0.01)
    assert v1[0] == pytest.approx(0.9 * 0.2 - 0.01 * 0.1 * 1.0 - 0.1 * 0.5)
    assert w1[0] == pytest.approx(1.0 + v1[0])


# ---- against PyTorch CPU (optional) ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CONV_CASES + [(2, 3, 31, 29, 8, 11, 11, 4, 2, 1)])
def test_conv_matches_torch(torch, rng, case):
    n, c, h, w, k, r, s, stride, padding, groups = case
    F = torch.nn.functional
    x = rng.standard_normal((n, c, h, w))
    wt = rng.standard_normal((k, c // groups, r, s))
    b = rng.standard_normal(k)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, wt, b))
    ty = F.conv2d(tx, tw, tb, stride=stride, padding=padding, groups=groups)
    dy = rng.standard_normal(ty.shape)
    ty.backward(torch.tensor(dy))
    assert _close(R.conv2d_forward(x, wt, b, stride, padding, groups), ty.detach().numpy(), 1e-12)
    for ours, theirs in zip(R.conv2d_backward(dy, x, wt, stride, padding, groups), (tx, tw, tb)):
        assert _close(ours, theirs.grad.numpy(), 1e-12)


@pytest.mark.parametrize("size,c", [(5, 8), (5, 3), (3, 6)])
def test_lrn_matches_torch_with_alpha_times_n(torch, rng, size, c):
    x = rng.standard_normal((2, c, 4, 3)) * 10
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.local_response_norm(tx, size, alpha=1e-2 * size, beta=0.75, k=2.0)
    dy = rng.standard_normal(x.shape)
    ty.backward(torch.tensor(dy))
    kw = dict(size=size, alpha=1e-2, beta=0.75, k=2.0)
    assert _close(R.lrn_forward(x, **kw), ty.detach().numpy(), 1e-12)
    assert _close(R.lrn_backward(dy, x, None, **kw), tx.grad.numpy(), 1e-12)


def test_maxpool_matches_torch(torch, rng):
    x = rng.standard_normal((2, 3, 13, 11))
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, 3, 2)
    dy = rng.standard_normal(ty.shape)
    ty.backward(torch.tensor(dy))
    assert _close(R.maxpool_forward(x, 3, 2), ty.detach().numpy(), 1e-15)
    assert _close(R.maxpool_backward(dy, x, None, 3, 2), tx.grad.numpy(), 1e-15)


def test_linear_and_cross_entropy_match_torch(torch, rng):
    F = torch.nn.functional
    x, w, b = rng.standard_normal((4, 6)), rng.standard_normal((5, 6)), rng.standard_normal(5)
    labels = np.array([0, 4, 2, 2])
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    tz = F.linear(tx, tw, tb)
    tz.retain_grad()
    tloss = F.cross_entropy(tz, torch.tensor(labels))
    tloss.backward()
    z = R.linear_forward(x, w, b)
    loss, dz = R.softmax_cross_entropy(z, labels)
    assert _close(z, tz.detach().numpy(), 1e-12)
    assert loss == pytest.approx(tloss.item(), rel=1e-12)
    assert _close(dz, tz.grad.numpy(), 1e-12)
    for ours, theirs in zip(R.linear_backward(dz, x, w), (tx, tw, tb)):
        assert _close(ours, theirs.grad.numpy(), 1e-12)


def test_sgd_matches_torch_at_constant_lr(torch, rng):
    # The paper's v = -lr * torch's momentum buffer when lr is constant, so the weights agree step by step.
    w0 = rng.standard_normal(10)
    grads = [rng.standard_normal(10) for _ in range(5)]
    tw = torch.tensor(w0, requires_grad=True)
    opt = torch.optim.SGD([tw], lr=0.01, momentum=0.9, weight_decay=5e-4)
    w, v = w0, np.zeros(10)
    for g in grads:
        tw.grad = torch.tensor(g)
        opt.step()
        w, v = R.sgd_update(w, g, v, 0.01, 0.9, 5e-4)
        assert _close(w, tw.detach().numpy(), 1e-12)
