"""Small models for tests, loaded through the recipe's `model: {import: tests.models:<factory>}`."""

from __future__ import annotations

from torch import nn


def conv_bn(num_classes: int = 10, channels: int = 4) -> nn.Module:
    """Conv + BatchNorm + ReLU (fused into one ConvBnReLU2d by QAT) on 1x8x8 inputs."""
    return nn.Sequential(nn.Conv2d(1, channels, 3), nn.BatchNorm2d(channels), nn.ReLU(), nn.Flatten(),
                         nn.Linear(channels * 36, num_classes))
