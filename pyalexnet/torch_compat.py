"""The same networks in PyTorch, for comparisons (tests, `pyalexnet bench`). PyTorch is imported by the caller
and passed in: pyalexnet itself never needs it.

torch_model(torch, net) builds, from net.specs, a torch module with net's state-dict keys and a copy of its
weights: for the torchvision variant a module with `features` and `classifier` (torchvision's layout and
indices, so torchvision's own alexnet() is interchangeable with it at 224 x 224), for the paper variant a
Sequential whose children are named after the layers (conv1, relu1, lrn2, ...). LocalResponseNorm gets
alpha * n, because PyTorch divides alpha by n and the paper does not.
"""

from __future__ import annotations

from collections import OrderedDict


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
        else:
            layers.append({"relu": nn.ReLU, "flatten": nn.Flatten, "dropout": lambda: nn.Dropout(0.5),
                           "pool": lambda: nn.MaxPool2d(3, 2)}[kind]())
    return layers


def _torchvision_layout(torch, layers):
    """torchvision's AlexNet layout: features, flatten, classifier (its AdaptiveAvgPool2d(6) is the identity at
    224 x 224 and is left out, so small inputs work too)."""
    nn = torch.nn
    split = next(i for i, m in enumerate(layers) if isinstance(m, nn.Flatten))

    class AlexNetTV(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers[:split])
            self.classifier = nn.Sequential(*layers[split + 1:])

        def forward(self, x):
            return self.classifier(torch.flatten(self.features(x), 1))

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
    return list(model.features) + [torch.nn.Flatten()] + list(model.classifier)
