"""Data set registry: a name maps to a factory returning in-memory train/val/test tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from runner.registry import Registry


@dataclass(frozen=True)
class Splits:
    """A whole data set in memory: images as float tensors (N, C, H, W), labels as int64."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int


class DataUnavailable(Exception):
    """The data set cannot be found or fetched; the message says what to do."""


DATASETS: Registry[Callable[..., Splits]] = Registry("data set")

from runner.data import mnist, synthetic, torchvision_roots  # noqa: E402,F401
