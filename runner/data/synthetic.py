"""Deterministic synthetic classification data: noisy copies of one random prototype per class."""

from __future__ import annotations

import torch

from runner.data import DATASETS, Splits


@DATASETS.register("synthetic")
def synthetic(
    shape: list[int] = [1, 28, 28],
    num_classes: int = 10,
    num_train: int = 1024,
    num_val: int = 256,
    num_test: int = 256,
    noise: float = 1.0,
    seed: int = 0,
) -> Splits:
    """Learnable but not trivial: accuracy well above chance shows that a stage trains."""
    generator = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, *shape, generator=generator)

    def draw(n: int):
        labels = torch.randint(0, num_classes, (n,), generator=generator)
        images = prototypes[labels] + noise * torch.randn(n, *shape, generator=generator)
        return images, labels

    return Splits(draw(num_train), draw(num_val), draw(num_test), num_classes)
