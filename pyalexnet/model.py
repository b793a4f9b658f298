"""AlexNet, both variants, chained from our kernels with nothing hidden.

The network is a list of layer specs (plain data, below). ``forward`` runs them in order and keeps every
activation that ``backward`` needs; ``backward`` walks them in reverse and overwrites the gradients. All
activations, gradients and dropout masks live in a workspace allocated on the first step for a batch size and
reused by every later step, so a training step allocates nothing after the first but the logits ``forward``
returns: a copy (batch x classes floats) that belongs to the caller.

Dropout draws from our counter-based generator, keyed per call: the j-th dropout layer of the t-th training
forward uses the first 8 bytes of BLAKE2b("net seed:t:j") as its key. ``t`` (``dropout_calls``) is part of a
checkpoint, so a resumed run draws exactly the masks the uninterrupted run would have.

backward() reads the activations forward() kept, the input images among them: do not overwrite the array you
passed to forward() before calling backward().
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from . import _backend
from . import _checks as check
from .architecture import CONV_LAYERS

# The paper's hyperparameters for the layers without weights.
LRN = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
POOL = dict(size=3, stride=2)
DROPOUT_P = 0.5
AVGPOOL = (6, 6)  # the torchvision variant's adaptive average pool: its output size

# State-dict names. torchvision's are those of torchvision.models.alexnet(); the paper variant names its layers
# as the paper does (conv1..conv5, fc6..fc8), each with .weight and .bias.
_NAMES = {
    "paper": ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"],
    "torchvision": ["features.0", "features.3", "features.6", "features.8", "features.10", "classifier.1",
                    "classifier.4", "classifier.6"],
}
# The paper's initialisation: biases 1 for conv2, conv4, conv5 and the hidden FC layers, 0 elsewhere.
_BIAS_ONE = {"conv2", "conv4", "conv5", "fc6", "fc7"}

# Called as trace(layer, pass) before each layer's launches when set (pyalexnet.profile uses it to name every
# launch): layer is a display name from layer_labels(), pass one of "forward", "dgrad" (the data gradient),
# "wgrad" (the filter and bias gradients) and "backward" (layers without weights; linear layers: their whole
# backward, whose launches are dx, then dw and db, see kernels/linear.cu).
trace = None


def layer_labels(specs) -> list[str]:
    """A short name per spec, numbered after the weighted layer it follows: conv1, relu1, lrn1, pool1, ..., fc6,
    relu6, fc8; a dropout after the FC layer it belongs to, wherever the variant places it: dropout6 is on fc6's
    output in the paper variant, on its input in torchvision's."""
    labels, index, dropouts = [], 0, 0
    weighted = [i for i, s in enumerate(specs) if s[0] in ("conv", "linear")]
    for i, spec in enumerate(specs):
        kind = spec[0]
        if kind in ("conv", "linear"):
            index += 1
            labels.append(("conv" if kind == "conv" else "fc") + str(index))
        elif kind == "dropout":  # the j-th dropout belongs to the j-th FC layer, on its input or its output
            first_fc = next(n for n, j in enumerate(weighted) if specs[j][0] == "linear") + 1
            labels.append(f"dropout{first_fc + dropouts}")
            dropouts += 1
        else:
            labels.append(f"{kind}{index}")
    return labels


def layer_specs(variant: str, num_classes: int = 1000, width: float = 1.0) -> list[tuple]:
    """The network as data: ("conv", name, out, kernel, stride, padding, groups, bias init), ("relu",), ("lrn",),
    ("pool",), ("avgpool", out height, out width) (torchvision only), ("flatten",), ("dropout",), ("linear", name,
    out, bias init). `width` scales every hidden layer's
    channels and units (1.0 is AlexNet; smaller widths make the small networks the tests use)."""
    if variant not in CONV_LAYERS:
        raise ValueError(f"variant: expected 'paper' or 'torchvision', got {variant!r}")

    def scaled(n, multiple=2):
        return n if width == 1.0 else max(multiple, multiple * round(n * width / multiple))

    names = _NAMES[variant]
    paper_names = _NAMES["paper"]
    specs = []
    for i, (_, _, _, _, out, kernel, stride, padding, groups) in enumerate(CONV_LAYERS[variant]):
        bias = 1.0 if paper_names[i] in _BIAS_ONE else 0.0
        specs.append(("conv", names[i], scaled(out), kernel, stride, padding, groups, bias))
        specs.append(("relu",))
        if variant == "paper" and i < 2:
            specs.append(("lrn",))
        if i in (0, 1, 4):
            specs.append(("pool",))
    if variant == "torchvision":
        specs.append(("avgpool", *AVGPOOL))  # torchvision's AdaptiveAvgPool2d((6, 6)): any input >= 63 x 63
    specs.append(("flatten",))
    for i, units in ((5, scaled(4096)), (6, scaled(4096))):
        if variant == "paper":  # section 4.2: dropout on the outputs of the first two FC layers
            specs += [("linear", names[i], units, 1.0), ("relu",), ("dropout",)]
        else:  # torchvision: on their inputs
            specs += [("dropout",), ("linear", names[i], units, 1.0), ("relu",)]
    specs.append(("linear", names[7], num_classes, 0.0))
    return specs


class IncompatibleKeys(NamedTuple):
    """What load_state_dict(strict=False) did not load (PyTorch's name and fields)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def fused_relus(specs) -> dict[str, set[int]]:
    """Which ReLU layers (spec indices) run inside their neighbours' kernels (kernels/conv.cu, gemm.cu, pool.cu):
    "forward": those right after a conv or linear layer, whose epilogue applies them (the layer's own output is
    never made: acts[i] is None); "backward": those right before a max-pool or a conv layer (but the first),
    whose backward kernel multiplies by the ReLU's derivative as it writes (it reads the ReLU's output anyway)."""
    forward, backward = set(), set()
    for i, spec in enumerate(specs):
        if spec[0] != "relu":
            continue
        if i > 0 and specs[i - 1][0] in ("conv", "linear"):
            forward.add(i)
        if i + 1 < len(specs) and specs[i + 1][0] in ("pool", "conv"):
            backward.add(i)
    return {"forward": forward, "backward": backward}


class AlexNet:
    """AlexNet on the active backend.

    variant: "paper" (227 x 227 input, LRN, two-tower groups) or "torchvision" (224 x 224, no LRN, no groups).
    num_classes: the last layer's outputs. seed: initialisation and dropout. width, input_size: a smaller
    network of the same shape (tests use them); the defaults are AlexNet's.
    """

    def __init__(self, variant: str = "paper", num_classes: int = 1000, seed: int = 0, width: float = 1.0,
                 input_size: int | None = None, init: str = "paper"):
        self.variant = variant
        if init not in ("paper", "kaiming"):
            raise ValueError(f"init: expected 'paper' or 'kaiming', got {init!r}")
        self.init = init
        self.num_classes = check.positive_int(num_classes, "num_classes")
        self.seed = check.seed(seed)
        self.width = check.positive_finite(width, "width")
        self.specs = layer_specs(variant, num_classes, width)
        self.labels = layer_labels(self.specs)
        self._fused_relus = fused_relus(self.specs)
        default_size = 227 if variant == "paper" else 224
        self.input_size = check.positive_int(default_size if input_size is None else input_size, "input_size")
        self.shapes = self._infer_shapes()  # each layer's input shape, one image; the last entry is the output
        self.dropout_calls = 0
        self.training = True  # PyTorch's default: forward() without train= drops out until eval()
        self._params = self._initial_parameters()
        xp = _backend.active.xp
        self._grads = {k: xp.zeros_like(v) for k, v in self._params.items()}
        self._workspaces = {}  # batch size -> workspace; the two most recent are kept (training, evaluation)
        self._ws = None  # the workspace of the last forward
        self._ready_for_backward = False
        self._masks_of = None  # the workspace whose dropout masks the last training forward drew

    # ---- construction -----------------------------------------------------------------------------------------
    def _infer_shapes(self):
        shape = (3, self.input_size, self.input_size)
        shapes = [shape]
        for spec in self.specs:
            kind = spec[0]
            if kind == "conv":
                _, name, out, kernel, stride, padding, groups, _ = spec
                c, h, w = shape
                if c % groups or out % groups or h + 2 * padding < kernel or w + 2 * padding < kernel:
                    raise ValueError(f"input_size {self.input_size} is too small for {name} ({kernel}x{kernel})")
                shape = (out, (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1)
            elif kind == "pool":
                c, h, w = shape
                if h < POOL["size"] or w < POOL["size"]:
                    raise ValueError(f"input_size {self.input_size} is too small: a pooling window does not fit {h}x{w}")
                shape = (c, (h - POOL["size"]) // POOL["stride"] + 1, (w - POOL["size"]) // POOL["stride"] + 1)
            elif kind == "avgpool":
                shape = (shape[0], spec[1], spec[2])
            elif kind == "flatten":
                shape = (math.prod(shape),)
            elif kind == "linear":
                shape = (spec[2],)
            shapes.append(shape)
        return shapes

    def _initial_parameters(self):
        """init "paper": weights N(0, 0.01^2), biases 1 or 0 (see layer_specs), as section 5 says; it starts slowly
        (the loss sits at ln(classes) for a while), which a 90-epoch ImageNet run absorbs and a short demo does not.
        init "kaiming" (He et al. 2015): weights N(0, 2 / fan_in), biases 0; the last layer N(0, 0.01^2), as
        Goyal et al. (2017) start their classifier: the first logits stay small (the loss starts at ln(classes)),
        where He's variance there, after three max-pools have raised the activations' second moment, starts the
        torchvision variant at 2-3x that and its second step overshoots."""
        rng = np.random.default_rng(self.seed)
        params = {}
        for spec, shape in zip(self.specs, self.shapes):
            if spec[0] == "conv":
                _, name, out, kernel, _, _, groups, bias = spec
                wshape = (out, shape[0] // groups, kernel, kernel)
            elif spec[0] == "linear":
                _, name, out, bias = spec
                wshape = (out, shape[0])
            else:
                continue
            if self.init == "paper":
                std = 0.01
            else:
                bias = 0.0
                std = 0.01 if spec is self.specs[-1] else math.sqrt(2.0 / math.prod(wshape[1:]))
            params[f"{name}.weight"] = (rng.standard_normal(wshape) * std).astype(np.float32)
            params[f"{name}.bias"] = np.full(out, bias, np.float32)
        xp = _backend.active.xp
        return {k: xp.asarray(v) for k, v in params.items()}

    # ---- PyTorch's habits -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "AlexNet":
        """Training mode (dropout on) for calls of forward() without `train=`; returns the network."""
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"mode: expected True or False, got {mode!r}")
        self.training = bool(mode)
        return self

    def eval(self) -> "AlexNet":
        """Evaluation mode (dropout off), as train(False); returns the network."""
        return self.train(False)

    def __call__(self, x, train: bool | None = None):
        """net(x) is net.forward(x)."""
        return self.forward(x, train)

    def __repr__(self) -> str:
        lines = [f"AlexNet(variant={self.variant!r}, num_classes={self.num_classes}, width={self.width:g}, "
                 f"input_size={self.input_size}, init={self.init!r}, seed={self.seed}, "
                 f"mode={'train' if self.training else 'eval'}, backend={_backend.active.name!r}, "
                 f"parameters={self.num_parameters():,})"]
        for label, spec, shape in zip(self.labels, self.specs, self.shapes[1:]):
            kind = spec[0]
            if kind == "conv":
                _, name, out, kernel, stride, padding, groups, _ = spec
                what = f"{name}: {kernel}x{kernel}, stride {stride}, padding {padding}" + \
                    (f", groups {groups}" if groups > 1 else "")
            elif kind == "linear":
                what = f"{spec[1]}: linear"
            elif kind == "lrn":
                what = "local response norm: size {size}, alpha {alpha:g}, beta {beta:g}, k {k:g}".format(**LRN)
            elif kind == "pool":
                what = f"max pool {POOL['size']}x{POOL['size']}, stride {POOL['stride']}"
            elif kind == "avgpool":
                what = f"adaptive average pool to {spec[1]}x{spec[2]}"
            elif kind == "dropout":
                what = f"dropout p={DROPOUT_P}"
            else:
                what = kind
            lines.append(f"  ({label}) {what} -> {' x '.join(map(str, shape))}")
        return "\n".join(lines)

    def num_parameters(self) -> int:
        """The number of weights and biases."""
        return sum(math.prod(v.shape) for v in self._params.values())

    # ---- the parameters ---------------------------------------------------------------------------------------
    def parameters(self) -> dict[str, Any]:
        """name -> weight array, on the backend, in layer order. Updating them in place updates the network."""
        return dict(self._params)

    def gradients(self) -> dict[str, Any]:
        """name -> gradient of the last backward(), same keys and shapes as parameters()."""
        return dict(self._grads)

    def state_dict(self) -> dict[str, np.ndarray]:
        """name -> a host NumPy copy of each parameter (torchvision's names for the torchvision variant; conv1 ...
        fc8 for the paper variant)."""
        return {k: _to_host(v).copy() for k, v in self._params.items()}

    def load_state_dict(self, state: Mapping, strict: bool = True) -> IncompatibleKeys:
        """Copies parameters from `state` (NumPy arrays, or anything pyalexnet.to_numpy reads, e.g. the tensors of
        torchvision's state_dict()). Values must be float32, like every array pyalexnet takes (convert float64
        with .astype(np.float32), a tensor with .float()); shapes must match. strict (PyTorch's rule): the keys must
        match exactly; strict=False copies the keys both have and reports the others. Returns (missing_keys,
        unexpected_keys). Nothing is copied unless every entry to be copied is valid."""
        from . import to_numpy

        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a mapping of names to arrays, got {type(state).__name__}")
        missing = [k for k in self._params if k not in state]
        unexpected = [k for k in state if k not in self._params]
        if strict and (missing or unexpected):
            raise ValueError(f"state: missing keys {missing}, unexpected keys {unexpected} (strict=False loads the "
                             "keys both have)")
        host = {}
        for k, p in self._params.items():
            if k not in state:
                continue
            v = np.asarray(to_numpy(state[k]))
            if v.dtype != np.float32:
                raise check.DTypeError(f"state[{k!r}]: expected float32 values, got {v.dtype}; convert with "
                                       ".astype(np.float32) (a PyTorch tensor: .float())")
            if v.shape != tuple(p.shape):
                raise ValueError(f"state[{k!r}]: expected shape {tuple(p.shape)}, got {v.shape}")
            host[k] = np.ascontiguousarray(v)
        for k, v in host.items():  # only once every entry has been checked
            self._params[k][...] = _backend.active.xp.asarray(v)
        return IncompatibleKeys(missing, unexpected)

    # ---- forward and backward --------------------------------------------------------------------------------
    def _workspace(self, batch):
        if batch in self._workspaces:
            self._workspaces[batch] = self._workspaces.pop(batch)  # most recently used last
            return self._workspaces[batch]
        while len(self._workspaces) >= 2:  # e.g. the training batch and a smaller last or evaluation batch
            del self._workspaces[next(iter(self._workspaces))]
        xp = _backend.active.xp
        outs, grads, masks = [], [], []
        for i, spec in enumerate(self.specs):
            if spec[0] in ("flatten",) or i == 0:
                outs.append(None if i else xp.empty((batch, *self.shapes[1]), np.float32))  # flatten: a view
                grads.append(None)  # nobody needs the gradient of the images
            else:
                outs.append(xp.empty((batch, *self.shapes[i + 1]), np.float32))
                grads.append(xp.empty((batch, *self.shapes[i]), np.float32))
            n = batch * math.prod(self.shapes[i])
            masks.append(xp.empty(((n + 31) // 32,), np.uint32) if spec[0] == "dropout" else None)
        ws = {"batch": batch, "outs": outs, "grads": grads, "masks": masks, "acts": [None] * (len(self.specs) + 1)}
        self._workspaces[batch] = ws
        return ws

    def forward(self, x, train: bool | None = None):
        """Logits (batch, num_classes) for images x (batch, 3, S, S), S = input_size: a new array, the caller's.
        Dropout only when training: `train` when given, else the mode train() / eval() set (training at first)."""
        if train is None:
            train = self.training
        elif not isinstance(train, (bool, np.bool_)):
            raise TypeError(f"train: expected True, False or None, got {train!r}")
        x = check.array(x, "x", ndim=4)
        expect = (3, self.input_size, self.input_size)
        if tuple(x.shape[1:]) != expect or x.shape[0] < 1:
            raise ValueError(f"x: expected shape (batch, {', '.join(map(str, expect))}) for the {self.variant} "
                             f"variant, got {tuple(x.shape)}")
        be = _backend.active
        mod, stream = be.module, be.stream()
        ws = self._ws = self._workspace(x.shape[0])
        acts, dropout_index = ws["acts"], 0
        acts[0] = x
        fused = self._fused_relus
        for i, spec in enumerate(self.specs):
            a, out, kind = acts[i], ws["outs"][i], spec[0]
            relu_next = i + 1 in fused["forward"]  # this conv or linear also applies the ReLU after it
            if relu_next:
                out = ws["outs"][i + 1]  # straight into the ReLU's output: the layer's own is never made
            if trace is not None and kind != "flatten":
                trace(self.labels[i], "forward")
            if kind == "conv":
                _, name, _, _, stride, padding, groups, _ = spec
                mod.conv_forward(a, self._params[f"{name}.weight"], self._params[f"{name}.bias"], out, stride,
                                 padding, groups, stream=stream, relu=relu_next)
            elif kind == "relu" and i in fused["forward"]:
                out = acts[i + 1]  # made by the layer before, which left acts[i] None
            elif kind == "relu":
                mod.relu_forward(a, out, stream=stream)
            elif kind == "lrn":
                mod.lrn_forward(a, out, LRN["size"], LRN["alpha"], LRN["beta"], LRN["k"], stream=stream)
            elif kind == "pool":
                mod.maxpool_forward(a, out, POOL["size"], POOL["stride"], stream=stream)
            elif kind == "avgpool":
                if tuple(a.shape[2:]) == spec[1:]:
                    out = a  # the identity (torchvision at 224 x 224): no launch
                else:
                    mod.adaptive_avgpool_forward(a, out, stream=stream)
            elif kind == "flatten":
                out = a.reshape(a.shape[0], -1)
            elif kind == "dropout":
                if train:
                    mod.dropout_forward(a, out, ws["masks"][i], DROPOUT_P, self._dropout_key(dropout_index),
                                        stream=stream)
                else:
                    out = a
                dropout_index += 1
            elif kind == "linear":
                name = spec[1]
                mod.linear_forward(a, self._params[f"{name}.weight"], self._params[f"{name}.bias"], out,
                                   stream=stream, relu=relu_next)
            if relu_next:
                acts[i + 1], acts[i + 2] = None, out
            elif not (kind == "relu" and i in fused["forward"]):
                acts[i + 1] = out
        if train:
            self.dropout_calls += 1
            self._masks_of = ws
        self._trained_last = bool(train)
        self._ready_for_backward = True
        return acts[-1].copy()  # the workspace's logits stay ours: a list of forward() results holds each batch

    def backward(self, dlogits) -> None:
        """Fills gradients() with d(loss)/d(parameter) given d(loss)/d(logits), for the last forward (train or
        not). Overwrites the previous gradients; does not compute the gradient of the input images."""
        if not self._ready_for_backward:
            raise RuntimeError("backward() needs a forward() first")
        ws = self._ws
        dlogits = check.array(dlogits, "dlogits", ndim=2)
        check.same_shape(dlogits, "dlogits", (ws["batch"], self.num_classes))
        be = _backend.active
        mod, stream = be.module, be.stream()
        acts, g, fused = ws["acts"], dlogits, self._fused_relus["backward"]
        for i in range(len(self.specs) - 1, -1, -1):
            spec, kind = self.specs[i], self.specs[i][0]
            a_in, a_out, dx = acts[i], acts[i + 1], ws["grads"][i]
            if trace is not None and kind != "flatten":
                trace(self.labels[i], "wgrad" if kind == "conv" else "backward")
            if kind == "conv":
                _, name, _, _, stride, padding, groups, _ = spec
                w = self._params[f"{name}.weight"]
                mod.conv_backward_filter(g, a_in, self._grads[f"{name}.weight"], self._grads[f"{name}.bias"], stride,
                                         padding, groups, stream=stream)
                if i == 0:
                    break  # nobody needs the gradient of the images
                if trace is not None:
                    trace(self.labels[i], "dgrad")
                # the ReLU before this layer, if any, is differentiated here (its output is this layer's input)
                mod.conv_backward_data(g, w, dx, stride, padding, groups, stream=stream,
                                       relu_y=a_in if i - 1 in fused else None)
            elif kind == "relu" and i in fused:
                dx = g  # already times the ReLU's derivative: the layer after it applied it
            elif kind == "relu":
                mod.relu_backward(g, a_out, dx, stream=stream)
            elif kind == "lrn":
                mod.lrn_backward(g, a_in, a_out, dx, LRN["size"], LRN["alpha"], LRN["beta"], LRN["k"], stream=stream)
            elif kind == "pool":
                mod.maxpool_backward(g, a_in, a_out, dx, POOL["size"], POOL["stride"], stream=stream,
                                     relu=i - 1 in fused)
            elif kind == "avgpool":
                if a_out is a_in:
                    dx = g
                else:
                    mod.adaptive_avgpool_backward(g, dx, stream=stream)
            elif kind == "flatten":
                dx = g.reshape(a_in.shape)
            elif kind == "dropout":
                if self._trained_last:
                    mod.dropout_backward(g, ws["masks"][i], dx, DROPOUT_P, stream=stream)
                else:
                    dx = g
            elif kind == "linear":
                name = spec[1]
                mod.linear_backward(g, a_in, self._params[f"{name}.weight"], dx, self._grads[f"{name}.weight"],
                                    self._grads[f"{name}.bias"], stream=stream)
            g = dx

    def _dropout_key(self, layer: int) -> int:
        """The generator key of dropout layer `layer` in this training forward: distinct for every (seed, call,
        layer), whatever the seed's size."""
        text = f"{self.seed}:{self.dropout_calls}:{layer}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")

    def dropout_masks(self) -> list[np.ndarray]:
        """The dropout masks of the last forward, which must have been a training one, as host boolean arrays
        shaped like their inputs (True = kept)."""
        from .ops import dropout_keep

        if self._masks_of is None or self._masks_of is not self._ws or not self._trained_last:
            raise RuntimeError("dropout_masks() describes the last forward, and that was not forward(train=True)")
        ws = self._ws
        return [dropout_keep(ws["masks"][i], ws["acts"][i].shape) for i, s in enumerate(self.specs)
                if s[0] == "dropout"]


def _to_host(a):
    return a.get() if _backend.active.name == "cuda" else np.asarray(a)
