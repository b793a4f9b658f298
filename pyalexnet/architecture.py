"""AlexNet's two variants as plain data (DESIGN.md section 1): the convolution layers' geometry.

Each entry: (name, input channels, input height, input width, filters, kernel size, stride, padding, groups).
Heights and widths are those each layer sees at the variant's input size (227 for the paper, 224 for
torchvision), after the pooling that precedes it.
"""

CONV_LAYERS = {
    "paper": [
        ("conv1", 3, 227, 227, 96, 11, 4, 0, 1),
        ("conv2", 96, 27, 27, 256, 5, 1, 2, 2),
        ("conv3", 256, 13, 13, 384, 3, 1, 1, 1),
        ("conv4", 384, 13, 13, 384, 3, 1, 1, 2),
        ("conv5", 384, 13, 13, 256, 3, 1, 1, 2),
    ],
    "torchvision": [
        ("conv1", 3, 224, 224, 64, 11, 4, 2, 1),
        ("conv2", 64, 27, 27, 192, 5, 1, 2, 1),
        ("conv3", 192, 13, 13, 384, 3, 1, 1, 1),
        ("conv4", 384, 13, 13, 256, 3, 1, 1, 1),
        ("conv5", 256, 13, 13, 256, 3, 1, 1, 1),
    ],
}


def named_conv_layers():
    """Every conv layer of both variants, named "<variant> <layer>": what the tests and benchmarks iterate over."""
    return [(f"{variant} {name}", *rest) for variant, layers in CONV_LAYERS.items() for name, *rest in layers]
