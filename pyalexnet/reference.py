"""The oracle: float64 NumPy forward and backward of every operation, written to be read, not to be fast.

Every kernel is tested against these functions, and these functions are tested against central finite
differences and, where PyTorch has the op, against PyTorch. Conventions match ``pyalexnet.ops``: NCHW
activations, conv weights (K, C/groups, R, S), FC weights (out, in). Inputs are converted to float64;
nothing is modified in place (``sgd_update`` returns the new arrays).
"""

from __future__ import annotations

import numpy as np


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _out_size(size: int, window: int, stride: int, padding: int = 0) -> int:
    out = (size + 2 * padding - window) // stride + 1
    if size + 2 * padding < window or out < 1:
        raise ValueError(f"window {window} does not fit an input of size {size} with padding {padding}")
    return out


# ---- convolution ------------------------------------------------------------------------------------------
# y[n, k, p, q] = b[k] + sum_{c in k's group, r, s} x_padded[n, c, p*stride + r, q*stride + s] * w[k, c, r, s]
# Computed one kernel offset (r, s) at a time: the strided slice of the padded input that meets w[:, :, r, s].


def _conv_shapes(x, w, stride, padding, groups):
    n, c, h, wd = x.shape
    k, cg, r, s = w.shape
    if stride < 1 or padding < 0 or groups < 1:
        raise ValueError("stride must be >= 1, padding >= 0, groups >= 1")
    if c % groups or k % groups or cg != c // groups:
        raise ValueError(f"channels {c} and filters {k} must split into {groups} groups of {cg} input channels")
    return n, c, h, wd, k, cg, r, s, _out_size(h, r, stride, padding), _out_size(wd, s, stride, padding)


def _window(a, r, s, stride, p, q):
    """The (.., p, q) slice of a that kernel offset (r, s) meets."""
    return a[:, :, r : r + stride * (p - 1) + 1 : stride, s : s + stride * (q - 1) + 1 : stride]


def conv2d_forward(x, w, b=None, stride=1, padding=0, groups=1):
    x, w = _f64(x), _f64(w)
    n, c, h, wd, k, cg, r, s, p, q = _conv_shapes(x, w, stride, padding, groups)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    y = np.zeros((n, k, p, q))
    kg = k // groups
    for g in range(groups):
        xg, wg = xp[:, g * cg : (g + 1) * cg], w[g * kg : (g + 1) * kg]
        for i in range(r):
            for j in range(s):
                patch = _window(xg, i, j, stride, p, q)  # (n, cg, p, q)
                y[:, g * kg : (g + 1) * kg] += np.einsum("ncpq,kc->nkpq", patch, wg[:, :, i, j], optimize=True)
    if b is not None:
        y += _f64(b)[None, :, None, None]
    return y


def conv2d_backward(dy, x, w, stride=1, padding=0, groups=1):
    """Returns (dx, dw, db)."""
    dy, x, w = _f64(dy), _f64(x), _f64(w)
    n, c, h, wd, k, cg, r, s, p, q = _conv_shapes(x, w, stride, padding, groups)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    dxp = np.zeros_like(xp)
    dw = np.zeros_like(w)
    kg = k // groups
    for g in range(groups):
        xg, wg, dyg = xp[:, g * cg : (g + 1) * cg], w[g * kg : (g + 1) * kg], dy[:, g * kg : (g + 1) * kg]
        dxg = dxp[:, g * cg : (g + 1) * cg]
        for i in range(r):
            for j in range(s):
                patch = _window(xg, i, j, stride, p, q)
                dw[g * kg : (g + 1) * kg, :, i, j] += np.einsum("nkpq,ncpq->kc", dyg, patch, optimize=True)
                _window(dxg, i, j, stride, p, q)[...] += np.einsum("nkpq,kc->ncpq", dyg, wg[:, :, i, j], optimize=True)
    dx = dxp[:, :, padding : padding + h, padding : padding + wd]
    return dx, dw, dy.sum(axis=(0, 2, 3))


# ---- ReLU -----------------------------------------------------------------------------------------------------
def relu_forward(x):
    return np.maximum(_f64(x), 0.0)  # NaN stays NaN


def relu_backward(dy, y):
    return np.where(_f64(y) > 0, _f64(dy), 0.0)


# ---- local response normalisation across channels (the paper's formula) -------------------------------------
# b[c] = a[c] / (k + alpha * sum_{c' = c - n/2 .. c + n/2} a[c']^2)^beta, the sum clipped to existing channels.
# alpha is NOT divided by n (PyTorch and Caffe divide it: compare with local_response_norm(alpha * n)).


def _channel_window_sum(a, size):
    """out[:, c] = sum of a[:, c'] over the channels c' within size // 2 of c."""
    half = size // 2
    out = np.zeros_like(a)
    for c in range(a.shape[1]):
        out[:, c] = a[:, max(0, c - half) : c + half + 1].sum(axis=1)
    return out


def _lrn_check(x, size, alpha, beta, k):
    if x.ndim != 4:
        raise ValueError(f"x: expected NCHW, got shape {x.shape}")
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size: expected an odd window >= 1, got {size}")
    if not (alpha >= 0 and beta >= 0 and k > 0):
        raise ValueError("expected alpha >= 0, beta >= 0, k > 0")


def lrn_forward(x, size=5, alpha=1e-4, beta=0.75, k=2.0):
    x = _f64(x)
    _lrn_check(x, size, alpha, beta, k)
    denom = k + alpha * _channel_window_sum(x * x, size)
    return x * denom**-beta


def lrn_backward(dy, x, y=None, size=5, alpha=1e-4, beta=0.75, k=2.0):
    """dx[c] = dy[c] d[c]^-beta - 2 alpha beta x[c] sum_{j near c} dy[j] x[j] d[j]^(-beta-1), d the denominator.

    ``y`` (the forward output) is accepted for the kernels' signature and not needed here.
    """
    dy, x = _f64(dy), _f64(x)
    _lrn_check(x, size, alpha, beta, k)
    denom = k + alpha * _channel_window_sum(x * x, size)
    # The window is symmetric, so "c is in j's window" is "j is in c's window".
    spread = _channel_window_sum(dy * x * denom ** (-beta - 1), size)
    return dy * denom**-beta - 2 * alpha * beta * x * spread


# ---- overlapping max-pooling (floor mode, no padding) -----------------------------------------------------------
# y[n, c, p, q] = max over the size x size window at (p*stride, q*stride). Ties go to the first maximum in
# row-major window order; a NaN in the window wins (the first one). The gradient flows to that one element.


def _maxpool_argmax(x, size, stride):
    n, c, h, w = x.shape
    if size < 1 or stride < 1:
        raise ValueError("size and stride must be >= 1")
    p, q = _out_size(h, size, stride), _out_size(w, size, stride)
    best = np.full((n, c, p, q), -np.inf)
    arg = np.zeros((n, c, p, q), dtype=np.int64)
    for i in range(size):
        for j in range(size):
            v = _window(x, i, j, stride, p, q)
            better = (v > best) | (np.isnan(v) & ~np.isnan(best))
            best = np.where(better, v, best)
            arg = np.where(better, i * size + j, arg)
    return best, arg


def maxpool_forward(x, size=3, stride=2):
    return _maxpool_argmax(_f64(x), size, stride)[0]


def maxpool_backward(dy, x, y=None, size=3, stride=2):
    """``y`` is accepted for the kernels' signature; the argmax is recomputed from x."""
    dy, x = _f64(dy), _f64(x)
    _, arg = _maxpool_argmax(x, size, stride)
    p, q = arg.shape[2:]
    dx = np.zeros_like(x)
    for i in range(size):
        for j in range(size):
            _window(dx, i, j, stride, p, q)[...] += np.where(arg == i * size + j, dy, 0.0)
    return dx


# ---- adaptive average pooling (PyTorch's AdaptiveAvgPool2d) -------------------------------------------------------
# Output cell i averages input rows floor(i H / OH) .. ceil((i + 1) H / OH) - 1, columns likewise. The windows may
# overlap, and when H < OH several cells average the same rows.


def _adaptive_windows(size: int, out: int) -> list[slice]:
    if size < 1 or out < 1:
        raise ValueError(f"adaptive pooling needs sizes >= 1, got input {size} and output {out}")
    return [slice(i * size // out, -(-(i + 1) * size // out)) for i in range(out)]


def _output_pair(output_size) -> tuple[int, int]:
    return (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)


def adaptive_avgpool_forward(x, output_size=(6, 6)):
    x = _f64(x)
    oh, ow = _output_pair(output_size)
    rows, cols = _adaptive_windows(x.shape[2], oh), _adaptive_windows(x.shape[3], ow)
    y = np.empty(x.shape[:2] + (oh, ow))
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            y[:, :, i, j] = x[:, :, r, c].mean(axis=(2, 3))
    return y


def adaptive_avgpool_backward(dy, x):
    """Each cell's gradient, divided by its window's size, goes to every element of its window."""
    dy, x = _f64(dy), _f64(x)
    oh, ow = dy.shape[2:]
    rows, cols = _adaptive_windows(x.shape[2], oh), _adaptive_windows(x.shape[3], ow)
    dx = np.zeros_like(x)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            count = (r.stop - r.start) * (c.stop - c.start)
            dx[:, :, r, c] += dy[:, :, i, j][:, :, None, None] / count
    return dx


# ---- fully connected --------------------------------------------------------------------------------------------
def linear_forward(x, w, b=None):
    y = _f64(x) @ _f64(w).T
    return y if b is None else y + _f64(b)


def linear_backward(dy, x, w):
    """Returns (dx, dw, db)."""
    dy, x, w = _f64(dy), _f64(x), _f64(w)
    return dy @ w, dy.T @ x, dy.sum(axis=0)


# ---- inverted dropout, given the mask -----------------------------------------------------------------------------
# Training: kept units (mask true) are scaled by 1/(1 - p), dropped ones are 0, so no rescaling at test time.


def dropout_forward(x, mask, p=0.5):
    if not 0 <= p < 1:
        raise ValueError(f"p: expected a value in [0, 1), got {p}")
    return np.where(np.asarray(mask, dtype=bool), _f64(x) / (1.0 - p), 0.0)


def dropout_backward(dy, mask, p=0.5):
    return dropout_forward(dy, mask, p)


# ---- softmax + cross-entropy, mean over the batch -------------------------------------------------------------------
def softmax_cross_entropy(logits, labels):
    """Returns (mean loss as a float, dlogits)."""
    z = _f64(logits)
    labels = np.asarray(labels)
    batch, classes = z.shape
    if labels.shape != (batch,) or labels.min() < 0 or labels.max() >= classes:
        raise ValueError("labels: expected one label in [0, classes) per row")
    shifted = z - z.max(axis=1, keepdims=True)  # exp never overflows
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    rows = np.arange(batch)
    loss = -log_softmax[rows, labels].mean()
    dlogits = np.exp(log_softmax)
    dlogits[rows, labels] -= 1.0
    return float(loss), dlogits / batch


# ---- the paper's SGD ------------------------------------------------------------------------------------------------
def sgd_update(w, dw, v, lr, momentum=0.9, weight_decay=5e-4):
    """v' = momentum v - weight_decay lr w - lr dw; w' = w + v'. Returns (w', v')."""
    w, dw, v = _f64(w), _f64(dw), _f64(v)
    v_new = momentum * v - weight_decay * lr * w - lr * dw
    return w + v_new, v_new


# ---- the dropout generator: Philox4x32-10, and the mask it gives ----------------------------------------------------
_M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al. 2011) on uint32 counters of shape (..., 4) and a key (k0, k1)."""
    c = [np.asarray(counter, dtype=np.uint64)[..., i] for i in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]  # a 32 x 32 -> 64-bit product: hi and lo halves
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & _M32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & _M32]
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M32
    return np.stack(c, axis=-1).astype(np.uint32)


def dropout_mask(shape, p, seed):
    """Which elements dropout keeps (True), as the kernels decide: element i draws word i % 4 of
    philox4x32_10((i // 4 mod 2^32, i // 2^34, 0, 0), (seed mod 2^32, seed // 2^32)) and is kept iff its top 24
    bits are >= ceil(p * 2^24)."""
    n = int(np.prod(shape))
    quads = np.arange((n + 3) // 4, dtype=np.uint64)
    zeros = np.zeros_like(quads)
    counters = np.stack([quads & _M32, quads >> np.uint64(32), zeros, zeros], axis=-1)
    draws = philox4x32_10(counters, (seed & 0xFFFFFFFF, seed >> 32)).reshape(-1)[:n]
    return ((draws >> 8) >= int(np.ceil(p * 2**24))).reshape(shape)


# ---- a whole network, from the layer specs of pyalexnet.model.layer_specs -----------------------------------------
_LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)


def network_forward(specs, params, x, masks=None):
    """Logits and every layer's input, for float64 parameters `params` (name -> array). `masks`: one boolean
    array per dropout layer (training), or None (evaluation: dropout is the identity)."""
    acts, masks = [_f64(x)], list(masks) if masks is not None else None
    for spec in specs:
        a, kind = acts[-1], spec[0]
        if kind == "conv":
            _, name, _, _, stride, padding, groups, _ = spec
            a = conv2d_forward(a, params[f"{name}.weight"], params[f"{name}.bias"], stride, padding, groups)
        elif kind == "relu":
            a = relu_forward(a)
        elif kind == "lrn":
            a = lrn_forward(a, **_LRN)
        elif kind == "pool":
            a = maxpool_forward(a, 3, 2)
        elif kind == "avgpool":  # ("avgpool", out height, out width): torchvision's AdaptiveAvgPool2d
            a = adaptive_avgpool_forward(a, spec[1:])
        elif kind == "flatten":
            a = a.reshape(a.shape[0], -1)
        elif kind == "dropout":
            a = dropout_forward(a, masks.pop(0), 0.5) if masks is not None else a
        elif kind == "linear":
            a = linear_forward(a, params[f"{spec[1]}.weight"], params[f"{spec[1]}.bias"])
        acts.append(a)
    return acts[-1], acts


def network_backward(specs, params, acts, dlogits, masks=None):
    """name -> gradient of every parameter, given network_forward's activations and d(loss)/d(logits)."""
    grads, g, masks = {}, _f64(dlogits), list(masks) if masks is not None else None
    for i in range(len(specs) - 1, -1, -1):
        spec, kind, a_in, a_out = specs[i], specs[i][0], acts[i], acts[i + 1]
        if kind == "conv":
            _, name, _, _, stride, padding, groups, _ = spec
            g, grads[f"{name}.weight"], grads[f"{name}.bias"] = conv2d_backward(
                g, a_in, params[f"{name}.weight"], stride, padding, groups)
        elif kind == "relu":
            g = relu_backward(g, a_out)
        elif kind == "lrn":
            g = lrn_backward(g, a_in, a_out, **_LRN)
        elif kind == "pool":
            g = maxpool_backward(g, a_in, a_out, 3, 2)
        elif kind == "avgpool":
            g = adaptive_avgpool_backward(g, a_in)
        elif kind == "flatten":
            g = g.reshape(a_in.shape)
        elif kind == "dropout":
            g = dropout_backward(g, masks.pop(), 0.5) if masks is not None else g
        elif kind == "linear":
            name = spec[1]
            g, grads[f"{name}.weight"], grads[f"{name}.bias"] = linear_backward(g, a_in, params[f"{name}.weight"])
    return grads
