"""Fully connected classifiers: a configurable MLP and LeNet-300-100 (LeCun et al. 1998)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

from torch import nn

from runner.models import MODELS

_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


@MODELS.register("mlp")
def mlp(
    hidden: list[int],
    in_features: int = 784,
    num_classes: int = 10,
    activation: Literal["relu", "sigmoid", "tanh"] = "relu",
    batchnorm: bool | list[bool] = False,
    dropout: float | list[float] = 0.0,
) -> nn.Module:
    """Layers fc1..fcN (N = len(hidden) + 1); batchnorm and dropout per hidden layer or for all."""
    batchnorm = batchnorm if isinstance(batchnorm, list) else [batchnorm] * len(hidden)
    dropout = dropout if isinstance(dropout, list) else [dropout] * len(hidden)
    if len(batchnorm) != len(hidden) or len(dropout) != len(hidden):
        raise ValueError("`batchnorm` and `dropout` lists need one entry per hidden layer")
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    width = in_features
    for i, (size, bn, p) in enumerate(zip(hidden, batchnorm, dropout), start=1):
        layers.append((f"fc{i}", nn.Linear(width, size)))
        if bn:
            layers.append((f"bn{i}", nn.BatchNorm1d(size)))
        layers.append((f"act{i}", _ACTIVATIONS[activation]()))
        if p > 0:
            layers.append((f"drop{i}", nn.Dropout(p)))
        width = size
    layers.append((f"fc{len(hidden) + 1}", nn.Linear(width, num_classes)))
    return nn.Sequential(OrderedDict(layers))


@MODELS.register("lenet_300_100")
def lenet_300_100(in_features: int = 784, num_classes: int = 10, dropout: float | list[float] = 0.0) -> nn.Module:
    """784-300-100-10 with ReLU: 266,610 parameters (Han et al. 2015's 267K); dropout after each hidden layer if asked."""
    return mlp(hidden=[300, 100], in_features=in_features, num_classes=num_classes, dropout=dropout)
