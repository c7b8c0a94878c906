"""LeNet-5 as in Caffe's MNIST example (the variant Han et al. 2015 prune)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from runner.models import MODELS


@MODELS.register("lenet5")
def lenet5(in_channels: int = 1, num_classes: int = 10, image_size: int = 28, dropout: float = 0.0) -> nn.Module:
    """conv20-5x5, maxpool, conv50-5x5, maxpool, fc500 + ReLU, fc10: 431,080 parameters on MNIST.

    Caffe's prototxt has no nonlinearity after the convolutions; we keep it that way so the
    parameter counts and the pruning figures match the papers. `dropout` > 0 puts a dropout
    module between fc1's ReLU and fc2 (Caffe's net has none).
    """
    side = ((image_size - 4) // 2 - 4) // 2
    layers = [
        ("conv1", nn.Conv2d(in_channels, 20, 5)),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(20, 50, 5)),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(50 * side * side, 500)),
        ("act1", nn.ReLU()),
    ]
    if dropout > 0:
        layers.append(("drop1", nn.Dropout(dropout)))
    layers.append(("fc2", nn.Linear(500, num_classes)))
    return nn.Sequential(OrderedDict(layers))
