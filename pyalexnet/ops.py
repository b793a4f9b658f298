"""The functional API: one function per operation, each a thin, checked call into our kernels.

Layouts follow PyTorch: activations NCHW float32, FC weights (out, in). Functions never modify their inputs
(only ``sgd_update`` works in place) and return arrays of the active backend (NumPy on ``emu``, CuPy on
``cuda``). Every argument is checked first; see ``_checks``.
"""

from __future__ import annotations

import numpy as np

from . import _backend
from . import _checks as check

# Tests set this to fill every output with NaN before the kernel runs, so an element the kernel fails to
# write shows up instead of passing with whatever the allocator left there.
poison_outputs = False


def _empty(shape, dtype=np.float32):
    xp = _backend.active.xp
    if poison_outputs:
        return xp.full(shape, np.nan, dtype=dtype)
    return xp.empty(shape, dtype=dtype)


def _call(name, *args):
    be = _backend.active
    getattr(be.module, name)(*args, stream=be.stream())


def relu_forward(x):
    """y = max(x, 0) elementwise, any shape; NaN stays NaN."""
    x = check.array(x, "x")
    y = _empty(x.shape)
    _call("relu_forward", x, y)
    return y


def relu_backward(dy, y):
    """dx = dy where y > 0, else 0; ``y`` is relu_forward's output."""
    dy = check.array(dy, "dy")
    y = check.array(y, "y")
    check.same_shape(y, "y", dy.shape)
    dx = _empty(dy.shape)
    _call("relu_backward", dy, y, dx)
    return dx


def _conv_args(x, w, stride, padding, groups):
    """Checks a convolution's arrays and geometry; returns (x, w, stride, padding, groups, output shape)."""
    stride = check.positive_int(stride, "stride")
    padding = check.nonnegative_int(padding, "padding")
    groups = check.positive_int(groups, "groups")
    x = check.array(x, "x", ndim=4)
    w = check.array(w, "w", ndim=4)
    n, c, h, wd = x.shape
    k, cg, r, s = w.shape
    if c % groups or k % groups:
        raise ValueError(f"groups: {c} input and {k} output channels must both divide into {groups} groups")
    if cg != c // groups:
        raise ValueError(
            f"w: expected {c // groups} input channels per filter ({c} / groups {groups}), got shape {tuple(w.shape)}"
        )
    if r < 1 or s < 1:
        raise ValueError(f"w: empty kernel {tuple(w.shape)}")
    if h + 2 * padding < r or wd + 2 * padding < s:
        raise ValueError(f"w: a {r}x{s} kernel is larger than the {h + 2 * padding}x{wd + 2 * padding} padded input")
    out = (n, k, (h + 2 * padding - r) // stride + 1, (wd + 2 * padding - s) // stride + 1)
    check.index32(x.shape, "x")
    check.index32(w.shape, "w")
    check.index32(out, "the output")
    check.index32((h + 2 * padding,), "the padded height")
    check.index32((wd + 2 * padding,), "the padded width")
    return x, w, stride, padding, groups, out


def conv2d_forward(x, w, b=None, stride=1, padding=0, groups=1):
    """y = conv2d(x, w) + b: cross-correlation, zero padding, groups (PyTorch's conv2d).

    x (N, C, H, W), w (K, C / groups, R, S), b (K,) or None; y (N, K, P, Q), P = (H + 2 padding - R) // stride + 1.
    """
    x, w, stride, padding, groups, out = _conv_args(x, w, stride, padding, groups)
    if b is not None:
        b = check.array(b, "b", ndim=1)
        check.same_shape(b, "b", (w.shape[0],))
    y = _empty(out)
    _call("conv_forward", x, w, b, y, stride, padding, groups)
    return y


def conv2d_backward(dy, x, w, stride=1, padding=0, groups=1):
    """Gradients of conv2d_forward: returns (dx, dw, db). Deterministic: the same inputs give the same bits."""
    x, w, stride, padding, groups, out = _conv_args(x, w, stride, padding, groups)
    dy = check.array(dy, "dy", ndim=4)
    check.same_shape(dy, "dy", out)
    dx = _empty(x.shape)
    dw = _empty(w.shape)
    db = _empty((w.shape[0],))
    _call("conv_backward", dy, x, w, dx, dw, db, stride, padding, groups)
    return dx, dw, db


def _linear_shapes(x, w, b=None):
    x = check.array(x, "x", ndim=2)
    w = check.array(w, "w", ndim=2)
    if w.shape[1] != x.shape[1]:
        raise ValueError(
            f"w: expected shape (out_features, {x.shape[1]}) to match x's {x.shape[1]} input features, "
            f"got {tuple(w.shape)}"
        )
    if b is not None:
        b = check.array(b, "b", ndim=1)
        check.same_shape(b, "b", (w.shape[0],))
    check.index32(x.shape, "x")
    check.index32(w.shape, "w")
    check.index32((x.shape[0], w.shape[0]), "the output")
    return x, w, b


def linear_forward(x, w, b=None):
    """y = x w^T + b for x (batch, in), w (out, in), b (out,) or None; y is (batch, out)."""
    x, w, b = _linear_shapes(x, w, b)
    y = _empty((x.shape[0], w.shape[0]))
    _call("linear_forward", x, w, b, y)
    return y


def linear_backward(dy, x, w):
    """Gradients of y = x w^T + b: returns (dx = dy w, dw = dy^T x, db = sum of dy over the batch)."""
    x, w, _ = _linear_shapes(x, w)
    dy = check.array(dy, "dy", ndim=2)
    check.same_shape(dy, "dy", (x.shape[0], w.shape[0]))
    dx = _empty(x.shape)
    dw = _empty(w.shape)
    db = _empty((w.shape[0],))
    _call("linear_backward", dy, x, w, dx, dw, db)
    return dx, dw, db


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of softmax(logits) against integer labels, and its gradient.

    logits: (batch, classes) float32; labels: (batch,) int32 or int64 in [0, classes).
    Returns (loss as a Python float, dlogits of shape (batch, classes)).
    """
    logits = check.array(logits, "logits", ndim=2)
    labels = check.array(labels, "labels", dtype=(np.int32, np.int64), ndim=1)
    batch, classes = logits.shape
    if batch < 1 or classes < 1:
        raise ValueError(f"logits: expected shape (batch >= 1, classes >= 1), got {tuple(logits.shape)}")
    check.same_shape(labels, "labels", (batch,))
    check.index32(logits.shape, "logits")
    dlogits = _empty(logits.shape)
    row_loss = _empty((batch,))
    result = _empty((2,))
    _call("softmax_xent", logits, labels, dlogits, row_loss, result)
    host = to_host(result)  # one small copy: the loss and the label check
    loss, bad = float(host[0]), int(host[1])
    if bad:
        raise ValueError(f"labels: {bad} value(s) outside [0, {classes})")
    return loss, dlogits


def sgd_update(w, dw, v, lr, momentum=0.9, weight_decay=5e-4):
    """The paper's update, in place: v = momentum v - weight_decay lr w - lr dw; w += v. Returns None."""
    lr = check.positive_finite(lr, "lr")
    momentum = check.unit_interval(momentum, "momentum")
    weight_decay = check.nonnegative_finite(weight_decay, "weight_decay")
    w = check.array(w, "w")
    dw = check.array(dw, "dw")
    v = check.array(v, "v")
    check.same_shape(dw, "dw", w.shape)
    check.same_shape(v, "v", w.shape)
    check.writable(w, "w")
    check.writable(v, "v")
    _call("sgd_update", w, dw, v, lr, momentum, weight_decay)


def _lrn_args(size, alpha, beta, k):
    size = check.positive_int(size, "size")
    if size % 2 == 0:
        raise ValueError(f"size: expected an odd window, got {size}")
    return size, check.nonnegative_finite(alpha, "alpha"), check.nonnegative_finite(beta, "beta"), \
        check.positive_finite(k, "k")


def lrn_forward(x, size=5, alpha=1e-4, beta=0.75, k=2.0):
    """Local response normalisation across channels, the paper's formula (NCHW):
    y[c] = x[c] / (k + alpha * sum_{|c' - c| <= size // 2} x[c']^2)^beta. alpha is NOT divided by size (PyTorch's
    local_response_norm divides it: pass alpha * size there to compare)."""
    size, alpha, beta, k = _lrn_args(size, alpha, beta, k)
    x = check.array(x, "x", ndim=4)
    y = _empty(x.shape)
    _call("lrn_forward", x, y, size, alpha, beta, k)
    return y


def lrn_backward(dy, x, y, size=5, alpha=1e-4, beta=0.75, k=2.0):
    """dx of lrn_forward, given its input x and output y (the denominator is recomputed, not stored)."""
    size, alpha, beta, k = _lrn_args(size, alpha, beta, k)
    x = check.array(x, "x", ndim=4)
    dy = check.array(dy, "dy", ndim=4)
    y = check.array(y, "y", ndim=4)
    check.same_shape(dy, "dy", x.shape)
    check.same_shape(y, "y", x.shape)
    dx = _empty(x.shape)
    _call("lrn_backward", dy, x, y, dx, size, alpha, beta, k)
    return dx


def _pool_shape(x, size, stride):
    size = check.positive_int(size, "size")
    stride = check.positive_int(stride, "stride")
    n, c, h, w = x.shape
    if h < size or w < size:
        raise ValueError(f"x: a {size}x{size} pooling window does not fit an input of {h}x{w} (H x W)")
    return size, stride, (n, c, (h - size) // stride + 1, (w - size) // stride + 1)


def maxpool_forward(x, size=3, stride=2):
    """Max over size x size windows every `stride` pixels (NCHW), floor mode, no padding. NaN propagates."""
    x = check.array(x, "x", ndim=4)
    size, stride, pooled = _pool_shape(x, size, stride)
    y = _empty(pooled)
    _call("maxpool_forward", x, y, size, stride)
    return y


def maxpool_backward(dy, x, y, size=3, stride=2):
    """dx of maxpool_forward: each dy goes to its window's first maximum (row-major). Deterministic."""
    x = check.array(x, "x", ndim=4)
    size, stride, pooled = _pool_shape(x, size, stride)
    dy = check.array(dy, "dy", ndim=4)
    y = check.array(y, "y", ndim=4)
    check.same_shape(dy, "dy", pooled)
    check.same_shape(y, "y", pooled)
    dx = _empty(x.shape)
    _call("maxpool_backward", dy, x, y, dx, size, stride)
    return dx


def dropout_forward(x, p=0.5, seed=0):
    """Inverted dropout: each element is kept with probability 1 - p and scaled by 1 / (1 - p), or zeroed.

    The decision for element i (row-major) is a pure function of (seed, i) through Philox4x32-10, the same on
    every backend. Returns (y, mask): mask is uint32 with one bit per element (bit b of word w: element 32 w + b).
    """
    p = check.unit_interval(p, "p")
    seed = check.seed(seed)
    x = check.array(x, "x")
    y = _empty(x.shape)
    mask = _backend.active.xp.empty(((x.size + 31) // 32,), dtype=np.uint32)
    _call("dropout_forward", x, y, mask, p, seed)
    return y, mask


def dropout_backward(dy, mask, p=0.5):
    """dx = dy / (1 - p) where the mask kept the element, else 0."""
    p = check.unit_interval(p, "p")
    dy = check.array(dy, "dy")
    mask = check.array(mask, "mask", dtype=np.uint32, ndim=1)
    check.same_shape(mask, "mask", ((dy.size + 31) // 32,))
    dx = _empty(dy.shape)
    _call("dropout_backward", dy, mask, dx, p)
    return dx


def dropout_keep(mask, shape) -> np.ndarray:
    """The bit mask of dropout_forward as a host boolean array of `shape` (True = kept)."""
    n = int(np.prod(shape))
    words = np.asarray(to_host(mask), dtype="<u4")
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:n].astype(bool).reshape(shape)


def augment_batch(images, mean, params, shift, crop, scale=1.0):
    """The network's input from stored images, in one kernel (kernels/augment.cu): for each image b,
    out[b, c, y, x] = scale * (images[b, oy + y, ox + x', c] - mean[oy + y, ox + x', c] + shift[b, c]),
    x' = crop - 1 - x when flipped. images (B, S, S, 3) uint8; mean (S, S, 3) float32; params (B, 3) int
    {oy, ox, flip} and shift (B, 3) float, host or backend arrays (params are checked on the host first);
    returns (B, 3, crop, crop) float32. pyalexnet.data draws params and shift (train_draws, eval_draws)."""
    crop = check.positive_int(crop, "crop")
    scale = check.real(scale, "scale")
    if not np.isfinite(scale):
        raise ValueError(f"scale: expected a finite value, got {scale}")
    images = check.array(images, "images", dtype=np.uint8, ndim=4)
    b, size = images.shape[0], images.shape[1]
    if images.shape[1:] != (size, size, 3):
        raise ValueError(f"images: expected (batch, size, size, 3), got shape {tuple(images.shape)}")
    if crop > size:
        raise ValueError(f"crop: {crop} does not fit images of {size} x {size}")
    mean = check.array(mean, "mean", ndim=3)
    check.same_shape(mean, "mean", (size, size, 3))
    host_params = np.asarray(to_host(params) if not isinstance(params, np.ndarray) else params)
    if host_params.shape != (b, 3) or not np.issubdtype(host_params.dtype, np.integer):
        raise ValueError(f"params: expected ({b}, 3) integers, got {host_params.dtype} {host_params.shape}")
    if b and (host_params[:, :2].min() < 0 or host_params[:, :2].max() > size - crop
              or not np.isin(host_params[:, 2], (0, 1)).all()):
        raise ValueError(f"params: offsets must lie in [0, {size - crop}] and flips be 0 or 1")
    host_shift = np.asarray(to_host(shift) if not isinstance(shift, np.ndarray) else shift, dtype=np.float32)
    if host_shift.shape != (b, 3):
        raise ValueError(f"shift: expected shape ({b}, 3), got {host_shift.shape}")
    xp = _backend.active.xp
    out = _empty((b, 3, crop, crop))
    _call("augment_batch", images, mean, xp.asarray(host_params.astype(np.int32)), xp.asarray(host_shift), out,
          float(scale))
    return out


def to_host(a) -> np.ndarray:
    return a.get() if _backend.active.name == "cuda" and not isinstance(a, np.ndarray) else np.asarray(a)
