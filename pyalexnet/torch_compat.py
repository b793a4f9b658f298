"""PyTorch interop, both ways. pyalexnet itself never needs PyTorch: `import pyalexnet` works without it.

1. The same networks in PyTorch, for comparisons (tests, `pyalexnet bench`): the caller imports torch and passes
   it in. torch_model(torch, net) builds, from net.specs, a torch module with net's state-dict keys and a copy of
   its weights: for the torchvision variant a module with `features`, `avgpool` and `classifier` (torchvision's
   layout and indices, so torchvision's own alexnet() is interchangeable with it), for the paper variant a
   Sequential whose children are named after the layers (conv1, relu1, lrn2, ...). LocalResponseNorm gets
   alpha * n, because PyTorch divides alpha by n and the paper does not.

2. Our kernels inside PyTorch models: torch.autograd.Functions (Conv2dFunction, LocalResponseNormFunction,
   MaxPool2dFunction, AdaptiveAvgPool2dFunction, LinearFunction, ReLUFunction), functional forms (conv2d,
   local_response_norm, max_pool2d, adaptive_avg_pool2d, linear, relu) and nn.Modules (Conv2d, LocalResponseNorm,
   MaxPool2d, AdaptiveAvgPool2d, Linear, ReLU). These import torch themselves, when first used. Contract:
   tensors of the active backend's device in, tensors of that device out (CUDA tensors on the cuda backend,
   CPU tensors on the emulator), float32 and contiguous, never copied or cast: the kernels read the caller's
   memory (DLPack into CuPy, or Tensor.numpy()) and the results are the arrays our ops allocated (torch.from_dlpack,
   torch.from_numpy). On cuda every launch goes to PyTorch's current stream of the input's device, so our work
   and PyTorch's stay ordered without synchronisation. Backward runs our backward kernels and computes only the
   gradients autograd asks for (ctx.needs_input_grad).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

from . import _backend, ops
from . import _checks as check


def torch_layers(torch, net):
    """One torch module per entry of net.specs, in order (the flatten included)."""
    nn = torch.nn
    layers = []
    for i, spec in enumerate(net.specs):
        kind, shape = spec[0], net.shapes[i]
        if kind == "conv":
            _, _, out, kernel, stride, padding, groups, _ = spec
            layers.append(nn.Conv2d(shape[0], out, kernel, stride, padding, groups=groups))
        elif kind == "linear":
            layers.append(nn.Linear(shape[0], spec[2]))
        elif kind == "lrn":
            layers.append(nn.LocalResponseNorm(5, alpha=1e-4 * 5, beta=0.75, k=2.0))
        elif kind == "avgpool":
            layers.append(nn.AdaptiveAvgPool2d((spec[1], spec[2])))
        else:
            layers.append({"relu": nn.ReLU, "flatten": nn.Flatten, "dropout": lambda: nn.Dropout(0.5),
                           "pool": lambda: nn.MaxPool2d(3, 2)}[kind]())
    return layers


def _torchvision_layout(torch, layers):
    """torchvision's AlexNet layout: features, avgpool, flatten, classifier. Where the specs have no ("avgpool",
    ...) entry, `avgpool` is the identity (torchvision's AdaptiveAvgPool2d(6) is one at 224 x 224)."""
    nn = torch.nn
    split = next(i for i, m in enumerate(layers) if isinstance(m, nn.Flatten))
    pooled = split > 0 and isinstance(layers[split - 1], nn.AdaptiveAvgPool2d)
    features = layers[:split - 1] if pooled else layers[:split]
    avgpool = layers[split - 1] if pooled else nn.Identity()

    class AlexNetTV(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*features)
            self.avgpool = avgpool
            self.classifier = nn.Sequential(*layers[split + 1:])

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    return AlexNetTV()


def torch_model(torch, net, dtype=None):
    """A torch module computing what `net` computes, with a copy of net's weights (on the CPU, float32 unless
    `dtype` says otherwise)."""
    layers = torch_layers(torch, net)
    if net.variant == "paper":
        names = []
        for i, spec in enumerate(net.specs):
            names.append(spec[1] if spec[0] in ("conv", "linear") else f"{spec[0]}{i}")
        model = torch.nn.Sequential(OrderedDict(zip(names, layers)))
    else:
        model = _torchvision_layout(torch, layers)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in net.state_dict().items()})
    return model if dtype is None else model.to(dtype)


def model_layers(torch, model, variant):
    """The modules of torch_model's result (or of torchvision's alexnet()) in the order of net.specs."""
    if variant == "paper":
        return list(model.children())
    from .model import layer_specs

    pool = [model.avgpool] if any(s[0] == "avgpool" for s in layer_specs(variant)) else []
    return list(model.features) + pool + [torch.nn.Flatten()] + list(model.classifier)


# ---- our kernels as autograd Functions ------------------------------------------------------------------------
# Defined on first use (module __getattr__ below), so that importing this module never imports torch.

_LAZY = ("Conv2dFunction", "LocalResponseNormFunction", "MaxPool2dFunction", "AdaptiveAvgPool2dFunction",
         "LinearFunction", "ReLUFunction", "Conv2d", "LocalResponseNorm", "MaxPool2d", "AdaptiveAvgPool2d",
         "Linear", "ReLU")


def has_adaptive_avgpool() -> bool:
    """Whether this build has the adaptive average pool: pa.ops.adaptive_avgpool_forward/backward and the kernels
    they launch, in the active backend's compiled module."""
    names = ("adaptive_avgpool_forward", "adaptive_avgpool_backward")
    return all(hasattr(ops, n) and hasattr(_backend.active.module, n) for n in names)


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"pyalexnet.torch_compat's autograd functions and modules need PyTorch ({e})") from e
    return torch


def _describe(a) -> str:
    t = type(a)
    return f"{t.__module__}.{t.__qualname__}" if t.__module__ != "builtins" else t.__qualname__


def _to_backend(torch, t, name: str):
    """A view of tensor `t` as an array of the active backend (no copy), after checking device, dtype, layout."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {_describe(t)}")
    be = _backend.active
    if be.name == "cuda" and t.device.type != "cuda":
        raise TypeError(f"{name}: is on {t.device}, but pyalexnet's active backend is 'cuda'; move it with "
                        f"{name}.cuda()")
    if be.name != "cuda" and t.device.type != "cpu":
        raise TypeError(f"{name}: is on {t.device}, but pyalexnet's active backend is 'emu' (the CPU emulator: "
                        f"{_backend.cuda_unavailable}); pass a CPU tensor ({name}.cpu())")
    if t.dtype != torch.float32:
        raise check.DTypeError(f"{name}: expected dtype torch.float32, got {t.dtype}; convert with {name}.float(): "
                               "pyalexnet never casts silently")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (got strides {tuple(t.stride())} for shape {tuple(t.shape)}); "
                         f"pass {name}.contiguous(): pyalexnet never copies silently")
    t = t.detach()  # a view; autograd is this module's business, not the kernels'
    return be.xp.from_dlpack(t) if be.name == "cuda" else t.numpy()


def _to_torch(torch, a):
    """The tensor viewing backend array `a` (no copy: it owns a reference to a)."""
    return torch.from_dlpack(a) if _backend.active.name == "cuda" else torch.from_numpy(a)


@contextlib.contextmanager
def _on_torch_stream(torch, device):
    """On cuda, makes `device` CuPy's current device and PyTorch's current stream on it CuPy's current stream (our
    ops launch on CuPy's current stream, see _backend.stream()); the conversions run inside too, so DLPack sees
    one stream and needs no synchronisation. Nothing to do on the emulator."""
    be = _backend.active
    if be.name != "cuda" or device.type != "cuda":  # a CPU tensor on cuda: _to_backend refuses it, inside
        yield
        return
    cp = be.xp
    with cp.cuda.Device(device.index if device.index is not None else torch.cuda.current_device()):
        ptr = torch.cuda.current_stream(device).cuda_stream
        with cp.cuda.Stream.null if ptr == 0 else cp.cuda.ExternalStream(ptr):
            yield


def _grad(torch, dy, name="grad_output"):
    """autograd's incoming gradient, made contiguous (a copy only if it is not: e.g. the gradient of a transpose)."""
    return _to_backend(torch, dy.contiguous(), name)


def _define(torch):
    """Builds the autograd Functions and the modules; returns them by name."""
    F, nn = torch.autograd.Function, torch.nn
    once = torch.autograd.function.once_differentiable  # our backward kernels have no backward of their own

    def args(*pairs):
        return [None if t is None else _to_backend(torch, t, name) for t, name in pairs]

    class Conv2dFunction(F):
        """y = conv2d(x, weight) + bias on our kernels (cross-correlation, zero padding, groups)."""

        @staticmethod
        def forward(ctx, x, weight, bias, stride, padding, groups):
            with _on_torch_stream(torch, x.device):
                xa, wa, ba = args((x, "x"), (weight, "weight"), (bias, "bias"))
                y = _to_torch(torch, ops.conv2d_forward(xa, wa, ba, stride, padding, groups))
            ctx.save_for_backward(x, weight)
            ctx.geometry, ctx.has_bias = (stride, padding, groups), bias is not None
            return y

        @staticmethod
        @once
        def backward(ctx, dy):
            x, weight = ctx.saved_tensors
            need_x, need_w, need_b = ctx.needs_input_grad[:3]
            stride, padding, groups = ctx.geometry
            dx = dw = db = None
            with _on_torch_stream(torch, x.device):
                g, xa, wa = _grad(torch, dy), *args((x, "x"), (weight, "weight"))
                if need_x and (need_w or need_b):
                    dx, dw, db = ops.conv2d_backward(g, xa, wa, stride, padding, groups)
                elif need_x:
                    dx = _conv_backward_data(g, xa, wa, stride, padding, groups)
                elif need_w or need_b:
                    dw, db = _conv_backward_filter(g, xa, wa, stride, padding, groups)
                dx, dw, db = [None if a is None else _to_torch(torch, a) for a in (dx, dw, db)]
            return dx, dw if need_w else None, db if need_b and ctx.has_bias else None, None, None, None

    class LinearFunction(F):
        """y = x weight^T + bias on our kernels; x (batch, in), weight (out, in), bias (out,) or None."""

        @staticmethod
        def forward(ctx, x, weight, bias):
            with _on_torch_stream(torch, x.device):
                xa, wa, ba = args((x, "x"), (weight, "weight"), (bias, "bias"))
                y = _to_torch(torch, ops.linear_forward(xa, wa, ba))
            ctx.save_for_backward(x, weight)
            ctx.has_bias = bias is not None
            return y

        @staticmethod
        @once
        def backward(ctx, dy):
            x, weight = ctx.saved_tensors
            need_x, need_w, need_b = ctx.needs_input_grad
            dx = dw = db = None
            with _on_torch_stream(torch, x.device):
                g, xa, wa = _grad(torch, dy), *args((x, "x"), (weight, "weight"))
                if need_w or need_b:
                    dx, dw, db = ops.linear_backward(g, xa, wa)
                elif need_x:
                    dx = _linear_backward_data(g, xa, wa)
                dx, dw, db = [None if a is None else _to_torch(torch, a) for a in (dx, dw, db)]
            return dx if need_x else None, dw if need_w else None, db if need_b and ctx.has_bias else None

    class ReLUFunction(F):
        """y = max(x, 0) on our kernel; backward from the output y."""

        @staticmethod
        def forward(ctx, x):
            with _on_torch_stream(torch, x.device):
                y = _to_torch(torch, ops.relu_forward(*args((x, "x"))))
            ctx.save_for_backward(y)
            return y

        @staticmethod
        @once
        def backward(ctx, dy):
            if not ctx.needs_input_grad[0]:
                return None
            (y,) = ctx.saved_tensors
            with _on_torch_stream(torch, y.device):
                return _to_torch(torch, ops.relu_backward(_grad(torch, dy), *args((y, "y"))))

    class LocalResponseNormFunction(F):
        """The paper's LRN across channels: y = x / (k + alpha sum_window x^2)^beta, alpha NOT divided by size
        (torch.nn.functional.local_response_norm(x, size, alpha * size, beta, k) computes the same)."""

        @staticmethod
        def forward(ctx, x, size, alpha, beta, k):
            with _on_torch_stream(torch, x.device):
                y = _to_torch(torch, ops.lrn_forward(*args((x, "x")), size, alpha, beta, k))
            ctx.save_for_backward(x, y)
            ctx.hyper = (size, alpha, beta, k)
            return y

        @staticmethod
        @once
        def backward(ctx, dy):
            if not ctx.needs_input_grad[0]:
                return None, None, None, None, None
            x, y = ctx.saved_tensors
            with _on_torch_stream(torch, x.device):
                dx = ops.lrn_backward(_grad(torch, dy), *args((x, "x"), (y, "y")), *ctx.hyper)
                return _to_torch(torch, dx), None, None, None, None

    class MaxPool2dFunction(F):
        """Max over kernel_size x kernel_size windows every `stride` pixels, floor mode, no padding; backward
        sends each gradient to its window's first maximum."""

        @staticmethod
        def forward(ctx, x, kernel_size, stride):
            with _on_torch_stream(torch, x.device):
                y = _to_torch(torch, ops.maxpool_forward(*args((x, "x")), kernel_size, stride))
            ctx.save_for_backward(x, y)
            ctx.geometry = (kernel_size, stride)
            return y

        @staticmethod
        @once
        def backward(ctx, dy):
            if not ctx.needs_input_grad[0]:
                return None, None, None
            x, y = ctx.saved_tensors
            with _on_torch_stream(torch, x.device):
                dx = ops.maxpool_backward(_grad(torch, dy), *args((x, "x"), (y, "y")), *ctx.geometry)
                return _to_torch(torch, dx), None, None

    class AdaptiveAvgPool2dFunction(F):
        """PyTorch's adaptive average pooling to output_size (oh, ow): window i spans [floor(i H / oh),
        ceil((i + 1) H / oh)), likewise along the width."""

        @staticmethod
        def forward(ctx, x, output_size):
            _require_adaptive_avgpool()
            with _on_torch_stream(torch, x.device):
                y = _to_torch(torch, ops.adaptive_avgpool_forward(*args((x, "x")), output_size))
            ctx.save_for_backward(x)
            return y

        @staticmethod
        @once
        def backward(ctx, dy):
            if not ctx.needs_input_grad[0]:
                return None, None
            (x,) = ctx.saved_tensors
            with _on_torch_stream(torch, x.device):
                return _to_torch(torch, ops.adaptive_avgpool_backward(_grad(torch, dy), *args((x, "x")))), None

    class Conv2d(nn.Conv2d):
        """torch.nn.Conv2d (same parameters, initialisation and state-dict keys) computed by our kernels. Square
        or rectangular kernels; one stride and one zero padding for both dimensions; no dilation."""

        def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, groups=1, bias=True,
                     device=None, dtype=None):
            stride = check.positive_int(stride, "stride")
            padding = check.nonnegative_int(padding, "padding")
            super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=bias,
                             device=device, dtype=dtype)

        def forward(self, x):
            return Conv2dFunction.apply(x, self.weight, self.bias, self.stride[0], self.padding[0], self.groups)

    class Linear(nn.Linear):
        """torch.nn.Linear (same parameters, initialisation and state-dict keys) computed by our kernels; the
        input must be (batch, in_features)."""

        def forward(self, x):
            return LinearFunction.apply(x, self.weight, self.bias)

    class ReLU(nn.Module):
        """ReLU on our kernel (never in place)."""

        def forward(self, x):
            return ReLUFunction.apply(x)

    class LocalResponseNorm(nn.Module):
        """The paper's local response normalisation: alpha is NOT divided by size, unlike
        torch.nn.LocalResponseNorm (ours with alpha equals theirs with alpha * size). Defaults are the paper's."""

        def __init__(self, size=5, alpha=1e-4, beta=0.75, k=2.0):
            super().__init__()
            self.size, self.alpha, self.beta, self.k = ops._lrn_args(size, alpha, beta, k)

        def forward(self, x):
            return LocalResponseNormFunction.apply(x, self.size, self.alpha, self.beta, self.k)

        def extra_repr(self):
            return f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k} (alpha not divided by size)"

    class MaxPool2d(nn.Module):
        """Max pooling, floor mode, no padding (the paper's overlapping pool is the default: 3, stride 2)."""

        def __init__(self, kernel_size=3, stride=2):
            super().__init__()
            self.kernel_size = check.positive_int(kernel_size, "kernel_size")
            self.stride = check.positive_int(stride, "stride")

        def forward(self, x):
            return MaxPool2dFunction.apply(x, self.kernel_size, self.stride)

        def extra_repr(self):
            return f"kernel_size={self.kernel_size}, stride={self.stride}"

    class AdaptiveAvgPool2d(nn.Module):
        """torch.nn.AdaptiveAvgPool2d on our kernels; output_size an int or an (height, width) pair."""

        def __init__(self, output_size):
            super().__init__()
            self.output_size = _pair(output_size, "output_size")

        def forward(self, x):
            return AdaptiveAvgPool2dFunction.apply(x, self.output_size)

        def extra_repr(self):
            return f"output_size={self.output_size}"

    return {k: v for k, v in locals().items() if k in _LAZY}


def _pair(value, name):
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{name}: expected an int or a pair (height, width), got {value!r}")
        return tuple(check.positive_int(v, name) for v in value)
    v = check.positive_int(value, name)
    return (v, v)


def _require_adaptive_avgpool():
    if not has_adaptive_avgpool():
        raise NotImplementedError("adaptive average pooling: this build of pyalexnet has no adaptive_avgpool "
                                  "kernels (rebuild it); use torch.nn.AdaptiveAvgPool2d meanwhile")


def _conv_backward_data(dy, x, w, stride, padding, groups):
    """dx alone (conv2d_backward's first result), for a frozen layer: our conv_backward_data kernel."""
    x, w, stride, padding, groups, out = ops._conv_args(x, w, stride, padding, groups)
    dy = check.array(dy, "dy", ndim=4)
    check.same_shape(dy, "dy", out)
    dx = ops._empty(x.shape)
    ops._call("conv_backward_data", dy, w, dx, stride, padding, groups)
    return dx


def _conv_backward_filter(dy, x, w, stride, padding, groups):
    """(dw, db) alone, when the input needs no gradient (e.g. the images): our conv_backward_filter kernel."""
    x, w, stride, padding, groups, out = ops._conv_args(x, w, stride, padding, groups)
    dy = check.array(dy, "dy", ndim=4)
    check.same_shape(dy, "dy", out)
    dw = ops._empty(w.shape)
    db = ops._empty((w.shape[0],))
    ops._call("conv_backward_filter", dy, x, dw, db, stride, padding, groups)
    return dw, db


def _linear_backward_data(dy, x, w):
    """dx = dy w alone (linear_backward's first result) with our GEMM, for a frozen layer."""
    x, w, _ = ops._linear_shapes(x, w)
    dy = check.array(dy, "dy", ndim=2)
    check.same_shape(dy, "dy", (x.shape[0], w.shape[0]))
    dx = ops._empty(x.shape)
    ops._call("sgemm", dy, w, dx, False, False, 1.0, 0.0, None)
    return dx


def __getattr__(name):
    if name in _LAZY:
        globals().update(_define(_torch()))
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _fn(name):
    return globals()[name] if name in globals() else __getattr__(name)


def conv2d(x, weight, bias=None, stride=1, padding=0, groups=1):
    """torch.nn.functional.conv2d on our kernels (one int stride and padding, no dilation), differentiable."""
    return _fn("Conv2dFunction").apply(x, weight, bias, stride, padding, groups)


def linear(x, weight, bias=None):
    """torch.nn.functional.linear on our kernels for x (batch, in), differentiable."""
    return _fn("LinearFunction").apply(x, weight, bias)


def relu(x):
    """torch.relu on our kernel, differentiable."""
    return _fn("ReLUFunction").apply(x)


def local_response_norm(x, size=5, alpha=1e-4, beta=0.75, k=2.0):
    """The paper's LRN, differentiable; alpha is NOT divided by size: this equals
    torch.nn.functional.local_response_norm(x, size, alpha * size, beta, k)."""
    return _fn("LocalResponseNormFunction").apply(x, size, alpha, beta, k)


def max_pool2d(x, kernel_size=3, stride=2):
    """torch.nn.functional.max_pool2d(x, kernel_size, stride) (floor mode, no padding) on our kernels."""
    return _fn("MaxPool2dFunction").apply(x, kernel_size, stride)


def adaptive_avg_pool2d(x, output_size):
    """torch.nn.functional.adaptive_avg_pool2d on our kernels; output_size an int or a pair."""
    return _fn("AdaptiveAvgPool2dFunction").apply(x, _pair(output_size, "output_size"))
