"""Data set registry: a name maps to a factory returning a whole data set in memory (Splits) or as
torch Datasets read example by example (DatasetSplits)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import Dataset

from runner.registry import Registry


@dataclass(frozen=True)
class Splits:
    """A whole data set in memory: images as float tensors (N, C, H, W), labels as int64."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int


@dataclass(frozen=True)
class DatasetSplits:
    """A data set too large (or too varied in its examples) for memory: each split a map-style
    Dataset of (image, label), the image a PIL image or a tensor before the recipe's transforms."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int


class DataUnavailable(Exception):
    """The data set cannot be found or read; the message says what, `hint` what to do, and `arg`
    names the `data.args` entry at fault so `validate` can point at its line."""

    def __init__(self, message: str, hint: str | None = None, arg: str | None = None):
        self.message, self.hint, self.arg = message, hint, arg
        super().__init__(message + (f"\nhint: {hint}" if hint else ""))


DATASETS: Registry[Callable[..., Splits | DatasetSplits]] = Registry("data set")

# name -> a cheap check of a registered data set's arguments (files present, folder layout), run at
# `validate`; it raises DataUnavailable. The factory runs it too, since files can change in between.
PREFLIGHT: dict[str, Callable[..., None]] = {}


def preflight(name: str) -> Callable:
    def add(check: Callable[..., None]) -> Callable[..., None]:
        PREFLIGHT[name] = check
        return check

    return add


from runner.data import image_folder, mnist, synthetic, torchvision_roots, torchvision_sets  # noqa: E402,F401
