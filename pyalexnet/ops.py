"""The functional API: one function per operation, each a thin, checked call into our kernels.

Layouts follow PyTorch: activations NCHW float32, FC weights (out, in). Functions never modify their inputs
(only ``sgd_update`` works in place) and return arrays of the active backend (NumPy on ``emu``, CuPy on
``cuda``). Every argument is checked first; see ``_checks``.
"""

# No `from __future__ import annotations`: it would leave a name `annotations` in this module's namespace, and
# dir(pyalexnet.ops) is the API (__all__). Hence also the private aliases of everything imported.
from typing import Any as _Any
from typing import Optional as _Optional
from typing import Sequence as _Sequence
from typing import Tuple as _Tuple
from typing import Union as _Union

import numpy as _np

from . import _backend
from . import _checks as _check

__all__ = [
    "adaptive_avgpool_backward", "adaptive_avgpool_forward", "augment_batch", "conv2d_backward", "conv2d_forward",
    "dropout_backward", "dropout_forward", "dropout_keep", "linear_backward", "linear_forward", "lrn_backward",
    "lrn_forward", "maxpool_backward", "maxpool_forward", "relu_backward", "relu_forward", "sgd_update",
    "softmax_cross_entropy", "to_host",
]

# An array of the active backend: a NumPy array on emu, a CuPy array on cuda (inputs may also be anything the
# backend wraps without a copy: __cuda_array_interface__, DLPack). Typed loosely, since CuPy is optional.
_Array = _Any

# Tests set this to fill every output with NaN before the kernel runs, so an element the kernel fails to
# write shows up instead of passing with whatever the allocator left there.
_poison_outputs = False
# The tests' poison (tests/conftest.py turns it on): every output starts as the signalling NaN 0x7FA0DEAD, which no
# arithmetic produces (an operation on a signalling NaN returns a quiet one). After the kernel call _call counts
# the elements of each poisoned output that still hold it: unwritten ones, caught even where a NaN would not show
# (a consumer's fmaxf(NaN, x) is x).
_POISON = 0x7FA0DEAD
_poisoned: list = []


def _empty(shape, dtype=_np.float32) -> _Array:
    xp = _backend.active.xp
    if _poison_outputs and _np.dtype(dtype).itemsize == 4:
        a = xp.empty(shape, dtype=dtype)
        a.view(xp.uint32)[...] = _POISON
        _poisoned.append(a)
        return a
    return xp.empty(shape, dtype=dtype)


def _call(name, *args):
    be = _backend.active
    getattr(be.module, name)(*args, stream=be.stream())
    if _poisoned:
        _check_written(name, args)


def _check_written(name, args) -> None:
    """Raises KernelError when an output of this call (allocated by _empty while poisoning) kept poison. Every
    op makes one call, so outputs left pending belong to an op that failed before it: forgotten."""
    outputs = [a for a in _poisoned if any(a is b for b in args)]
    _poisoned.clear()
    for a in outputs:
        left = a.view(_backend.active.xp.uint32).ravel() == _POISON
        count = int(left.sum())
        if count:
            first = int(to_host(left.nonzero()[0][:1])[0])
            raise _backend.active.module.KernelError(
                f"{name}: {count} of {a.size} elements of its {tuple(a.shape)} output were never written (the "
                f"first at flat index {first})")


def relu_forward(x: _Array) -> _Array:
    """y = max(x, 0) elementwise, any shape; NaN stays NaN."""
    x = _check.array(x, "x")
    y = _empty(x.shape)
    _call("relu_forward", x, y)
    return y


def relu_backward(dy: _Array, y: _Array) -> _Array:
    """dx = dy where y > 0, else 0; ``y`` is relu_forward's output."""
    dy = _check.array(dy, "dy")
    y = _check.array(y, "y")
    _check.same_shape(y, "y", dy.shape)
    dx = _empty(dy.shape)
    _call("relu_backward", dy, y, dx)
    return dx


def _conv_args(x, w, stride, padding, groups):
    """Checks a convolution's arrays and geometry; returns (x, w, stride, padding, groups, output shape)."""
    stride = _check.positive_int(stride, "stride")
    padding = _check.nonnegative_int(padding, "padding")
    groups = _check.positive_int(groups, "groups")
    x = _check.array(x, "x", ndim=4)
    w = _check.array(w, "w", ndim=4)
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
    _check.index32(x.shape, "x")
    _check.index32(w.shape, "w")
    _check.index32(out, "the output")
    _check.index32((h + 2 * padding,), "the padded height")
    _check.index32((wd + 2 * padding,), "the padded width")
    return x, w, stride, padding, groups, out


def conv2d_forward(x: _Array, w: _Array, b: _Optional[_Array] = None, stride: int = 1, padding: int = 0,
                   groups: int = 1) -> _Array:
    """y = conv2d(x, w) + b: cross-correlation, zero padding, groups (PyTorch's conv2d).

    x (N, C, H, W), w (K, C / groups, R, S), b (K,) or None; y (N, K, P, Q), P = (H + 2 padding - R) // stride + 1.
    """
    x, w, stride, padding, groups, out = _conv_args(x, w, stride, padding, groups)
    if b is not None:
        b = _check.array(b, "b", ndim=1)
        _check.same_shape(b, "b", (w.shape[0],))
    y = _empty(out)
    _call("conv_forward", x, w, b, y, stride, padding, groups)
    return y


def conv2d_backward(dy: _Array, x: _Array, w: _Array, stride: int = 1, padding: int = 0,
                    groups: int = 1) -> _Tuple[_Array, _Array, _Array]:
    """Gradients of conv2d_forward: returns (dx, dw, db). Deterministic: the same inputs give the same bits."""
    x, w, stride, padding, groups, out = _conv_args(x, w, stride, padding, groups)
    dy = _check.array(dy, "dy", ndim=4)
    _check.same_shape(dy, "dy", out)
    dx = _empty(x.shape)
    dw = _empty(w.shape)
    db = _empty((w.shape[0],))
    _call("conv_backward", dy, x, w, dx, dw, db, stride, padding, groups)
    return dx, dw, db


def _linear_shapes(x, w, b=None):
    x = _check.array(x, "x", ndim=2)
    w = _check.array(w, "w", ndim=2)
    if w.shape[1] != x.shape[1]:
        raise ValueError(
            f"w: expected shape (out_features, {x.shape[1]}) to match x's {x.shape[1]} input features, "
            f"got {tuple(w.shape)}"
        )
    if b is not None:
        b = _check.array(b, "b", ndim=1)
        _check.same_shape(b, "b", (w.shape[0],))
    _check.index32(x.shape, "x")
    _check.index32(w.shape, "w")
    _check.index32((x.shape[0], w.shape[0]), "the output")
    return x, w, b


def linear_forward(x: _Array, w: _Array, b: _Optional[_Array] = None) -> _Array:
    """y = x w^T + b for x (batch, in), w (out, in), b (out,) or None; y is (batch, out)."""
    x, w, b = _linear_shapes(x, w, b)
    y = _empty((x.shape[0], w.shape[0]))
    _call("linear_forward", x, w, b, y)
    return y


def linear_backward(dy: _Array, x: _Array, w: _Array) -> _Tuple[_Array, _Array, _Array]:
    """Gradients of y = x w^T + b: returns (dx = dy w, dw = dy^T x, db = sum of dy over the batch)."""
    x, w, _ = _linear_shapes(x, w)
    dy = _check.array(dy, "dy", ndim=2)
    _check.same_shape(dy, "dy", (x.shape[0], w.shape[0]))
    dx = _empty(x.shape)
    dw = _empty(w.shape)
    db = _empty((w.shape[0],))
    _call("linear_backward", dy, x, w, dx, dw, db)
    return dx, dw, db


def softmax_cross_entropy(logits: _Array, labels: _Array) -> _Tuple[float, _Array]:
    """Mean cross-entropy of softmax(logits) against integer labels, and its gradient.

    logits: (batch, classes) float32; labels: (batch,) int32 or int64 in [0, classes).
    Returns (loss as a Python float, dlogits of shape (batch, classes)).
    """
    logits = _check.array(logits, "logits", ndim=2)
    labels = _check.array(labels, "labels", dtype=(_np.int32, _np.int64), ndim=1)
    batch, classes = logits.shape
    if batch < 1 or classes < 1:
        raise ValueError(f"logits: expected shape (batch >= 1, classes >= 1), got {tuple(logits.shape)}")
    _check.same_shape(labels, "labels", (batch,))
    _check.index32(logits.shape, "logits")
    dlogits = _empty(logits.shape)
    row_loss = _empty((batch,))
    result = _empty((2,))
    _call("softmax_xent", logits, labels, dlogits, row_loss, result)
    host = to_host(result)  # one small copy: the loss and the label check
    loss, bad = float(host[0]), int(host[1])
    if bad:
        raise ValueError(f"labels: {bad} value(s) outside [0, {classes})")
    return loss, dlogits


def sgd_update(w: _Array, dw: _Array, v: _Array, lr: float, momentum: float = 0.9, weight_decay: float = 5e-4) -> None:
    """The paper's update, in place: v = momentum v - weight_decay lr w - lr dw; w += v. Returns None."""
    lr = _check.positive_finite(lr, "lr")
    momentum = _check.unit_interval(momentum, "momentum")
    weight_decay = _check.nonnegative_finite(weight_decay, "weight_decay")
    w = _check.array(w, "w")
    dw = _check.array(dw, "dw")
    v = _check.array(v, "v")
    _check.same_shape(dw, "dw", w.shape)
    _check.same_shape(v, "v", w.shape)
    _check.writable(w, "w")
    _check.writable(v, "v")
    _call("sgd_update", w, dw, v, lr, momentum, weight_decay)


def _lrn_args(size, alpha, beta, k):
    size = _check.positive_int(size, "size")
    if size % 2 == 0:
        raise ValueError(f"size: expected an odd window, got {size}")
    return size, _check.nonnegative_finite(alpha, "alpha"), _check.nonnegative_finite(beta, "beta"), \
        _check.positive_finite(k, "k")


def lrn_forward(x: _Array, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0) -> _Array:
    """Local response normalisation across channels, the paper's formula (NCHW):
    y[c] = x[c] / (k + alpha * sum_{|c' - c| <= size // 2} x[c']^2)^beta. alpha is NOT divided by size (PyTorch's
    local_response_norm divides it: pass alpha * size there to compare)."""
    size, alpha, beta, k = _lrn_args(size, alpha, beta, k)
    x = _check.array(x, "x", ndim=4)
    y = _empty(x.shape)
    _call("lrn_forward", x, y, size, alpha, beta, k)
    return y


def lrn_backward(dy: _Array, x: _Array, y: _Array, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                 k: float = 2.0) -> _Array:
    """dx of lrn_forward, given its input x and output y (the denominator is recomputed, not stored)."""
    size, alpha, beta, k = _lrn_args(size, alpha, beta, k)
    x = _check.array(x, "x", ndim=4)
    dy = _check.array(dy, "dy", ndim=4)
    y = _check.array(y, "y", ndim=4)
    _check.same_shape(dy, "dy", x.shape)
    _check.same_shape(y, "y", x.shape)
    dx = _empty(x.shape)
    _call("lrn_backward", dy, x, y, dx, size, alpha, beta, k)
    return dx


def _pool_shape(x, size, stride):
    size = _check.positive_int(size, "size")
    stride = _check.positive_int(stride, "stride")
    n, c, h, w = x.shape
    if h < size or w < size:
        raise ValueError(f"x: a {size}x{size} pooling window does not fit an input of {h}x{w} (H x W)")
    return size, stride, (n, c, (h - size) // stride + 1, (w - size) // stride + 1)


def maxpool_forward(x: _Array, size: int = 3, stride: int = 2) -> _Array:
    """Max over size x size windows every `stride` pixels (NCHW), floor mode, no padding. NaN propagates."""
    x = _check.array(x, "x", ndim=4)
    size, stride, pooled = _pool_shape(x, size, stride)
    y = _empty(pooled)
    _call("maxpool_forward", x, y, size, stride)
    return y


def maxpool_backward(dy: _Array, x: _Array, y: _Array, size: int = 3, stride: int = 2) -> _Array:
    """dx of maxpool_forward: each dy goes to its window's first maximum (row-major). Deterministic."""
    x = _check.array(x, "x", ndim=4)
    size, stride, pooled = _pool_shape(x, size, stride)
    dy = _check.array(dy, "dy", ndim=4)
    y = _check.array(y, "y", ndim=4)
    _check.same_shape(dy, "dy", pooled)
    _check.same_shape(y, "y", pooled)
    dx = _empty(x.shape)
    _call("maxpool_backward", dy, x, y, dx, size, stride)
    return dx


def _adaptive_output_size(output_size):
    """An int or a pair of ints, each >= 1, as (out_h, out_w)."""
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != 2:
            raise ValueError(f"output_size: expected an int or a pair (out_h, out_w), got {output_size!r}")
        return _check.positive_int(output_size[0], "output_size[0]"), _check.positive_int(output_size[1], "output_size[1]")
    size = _check.positive_int(output_size, "output_size")
    return size, size


def _adaptive_input(x, name):
    x = _check.array(x, name, ndim=4)
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{name}: expected height and width >= 1, got shape {tuple(x.shape)}")
    return x


def adaptive_avgpool_forward(x: _Array, output_size: _Union[int, _Tuple[int, int]] = (6, 6)) -> _Array:
    """PyTorch's AdaptiveAvgPool2d (NCHW): output cell (i, j) averages input rows floor(i H / OH) ..
    ceil((i + 1) H / OH) - 1 and the columns alike; the windows may overlap, and repeat when H < OH.
    ``output_size`` is an int or a pair (OH, OW); returns (N, C, OH, OW)."""
    oh, ow = _adaptive_output_size(output_size)
    x = _adaptive_input(x, "x")
    y = _empty((x.shape[0], x.shape[1], oh, ow))
    _call("adaptive_avgpool_forward", x, y)
    return y


def adaptive_avgpool_backward(dy: _Array, x: _Array) -> _Array:
    """dx of adaptive_avgpool_forward: each dy[i, j] spread evenly over its window. Only x's shape is used.
    Deterministic (no atomics)."""
    x = _adaptive_input(x, "x")
    dy = _check.array(dy, "dy", ndim=4)
    if dy.shape[0] != x.shape[0] or dy.shape[1] != x.shape[1] or dy.shape[2] < 1 or dy.shape[3] < 1:
        raise ValueError(
            f"dy: expected shape ({x.shape[0]}, {x.shape[1]}, OH >= 1, OW >= 1) to match x's {tuple(x.shape)}, "
            f"got {tuple(dy.shape)}"
        )
    dx = _empty(x.shape)
    _call("adaptive_avgpool_backward", dy, dx)
    return dx


def dropout_forward(x: _Array, p: float = 0.5, seed: int = 0) -> _Tuple[_Array, _Array]:
    """Inverted dropout: each element is kept with probability 1 - p and scaled by 1 / (1 - p), or zeroed.

    The decision for element i (row-major) is a pure function of (seed, i) through Philox4x32-10, the same on
    every backend. Returns (y, mask): mask is uint32 with one bit per element (bit b of word w: element 32 w + b).
    """
    p = _check.unit_interval(p, "p")
    seed = _check.seed(seed)
    x = _check.array(x, "x")
    y = _empty(x.shape)
    mask = _backend.active.xp.empty(((x.size + 31) // 32,), dtype=_np.uint32)
    _call("dropout_forward", x, y, mask, p, seed)
    return y, mask


def dropout_backward(dy: _Array, mask: _Array, p: float = 0.5) -> _Array:
    """dx = dy / (1 - p) where the mask kept the element, else 0."""
    p = _check.unit_interval(p, "p")
    dy = _check.array(dy, "dy")
    mask = _check.array(mask, "mask", dtype=_np.uint32, ndim=1)
    _check.same_shape(mask, "mask", ((dy.size + 31) // 32,))
    dx = _empty(dy.shape)
    _call("dropout_backward", dy, mask, dx, p)
    return dx


def dropout_keep(mask: _Array, shape: _Sequence[int]) -> _np.ndarray:
    """The bit mask of dropout_forward as a host boolean array of `shape` (True = kept)."""
    n = int(_np.prod(shape))
    words = _np.asarray(to_host(mask), dtype="<u4")
    return _np.unpackbits(words.view(_np.uint8), bitorder="little")[:n].astype(bool).reshape(shape)


def _channel_scale(scale):
    """augment_batch's scale as three finite float32-representable floats (one per RGB channel)."""
    if isinstance(scale, (str, bytes)) or not hasattr(scale, "__len__"):
        values = (_check.real(scale, "scale"),) * 3
    else:
        if len(scale) != 3:
            raise ValueError(f"scale: expected a number or 3 numbers (one per RGB channel), got {len(scale)}")
        values = tuple(_check.real(v, f"scale[{c}]") for c, v in enumerate(scale))
    largest = float(_np.finfo(_np.float32).max)  # beyond it the kernel's float32 would be infinite
    if not all(abs(v) <= largest for v in values):  # NaN fails the comparison too
        raise ValueError(f"scale: expected finite values (as float32), got {scale!r}")
    return values


def augment_batch(images: _Array, mean: _Array, params: _Any, shift: _Any, crop: int,
                  scale: _Union[float, _Sequence[float]] = 1.0) -> _Array:
    """The network's input from stored images, in one kernel (kernels/augment.cu): for each image b,
    out[b, c, y, x] = scale[c] * (images[b, oy + y, ox + x', c] - mean[oy + y, ox + x', c] + shift[b, c]),
    x' = crop - 1 - x when flipped. images (B, S, S, 3) uint8; mean (S, S, 3) float32; params (B, 3) int
    {oy, ox, flip} and shift (B, 3) float, host or backend arrays (params are checked on the host first);
    scale is one number for all channels or three (RGB): torchvision's (x / 255 - m_c) / s_c is
    mean = 255 m_c and scale = [1 / (255 s_c) for each c]. Returns (B, 3, crop, crop) float32.
    pyalexnet.data draws params and shift (train_draws, eval_draws)."""
    crop = _check.positive_int(crop, "crop")
    scale = _channel_scale(scale)
    images = _check.array(images, "images", dtype=_np.uint8, ndim=4)
    b, size = images.shape[0], images.shape[1]
    if images.shape[1:] != (size, size, 3):
        raise ValueError(f"images: expected (batch, size, size, 3), got shape {tuple(images.shape)}")
    if crop > size:
        raise ValueError(f"crop: {crop} does not fit images of {size} x {size}")
    mean = _check.array(mean, "mean", ndim=3)
    _check.same_shape(mean, "mean", (size, size, 3))
    host_params = _np.asarray(to_host(params) if not isinstance(params, _np.ndarray) else params)
    if host_params.shape != (b, 3) or not _np.issubdtype(host_params.dtype, _np.integer):
        raise ValueError(f"params: expected ({b}, 3) integers, got {host_params.dtype} {host_params.shape}")
    if b and (host_params[:, :2].min() < 0 or host_params[:, :2].max() > size - crop
              or not _np.isin(host_params[:, 2], (0, 1)).all()):
        raise ValueError(f"params: offsets must lie in [0, {size - crop}] and flips be 0 or 1")
    host_shift = _np.asarray(to_host(shift) if not isinstance(shift, _np.ndarray) else shift, dtype=_np.float32)
    if host_shift.shape != (b, 3):
        raise ValueError(f"shift: expected shape ({b}, 3), got {host_shift.shape}")
    xp = _backend.active.xp
    out = _empty((b, 3, crop, crop))
    _call("augment_batch", images, mean, xp.asarray(host_params.astype(_np.int32)), xp.asarray(host_shift), out,
          list(scale))
    return out


def to_host(a: _Array) -> _np.ndarray:
    """``a`` as a NumPy array (a backend array copied back from the GPU; a NumPy array as it is)."""
    return a.get() if _backend.active.name == "cuda" and not isinstance(a, _np.ndarray) else _np.asarray(a)
