"""MNIST from a torchvision-format folder (`mnist` with `root:`), read whole into memory; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from runner.data import DataUnavailable, Splits


def from_root(class_name: str, root: str, val_size: int) -> Splits:
    """The last `val_size` training examples become the validation split."""
    try:
        import torchvision
    except ImportError:
        raise DataUnavailable(f"`root:` data needs torchvision, which is not installed\n"
                              "hint: pip install torchvision (matching your torch), or drop `root:` for the offline MNIST") from None
    if not Path(root).is_dir():
        raise DataUnavailable(f"data root `{root}` is not a directory")
    dataset_class = getattr(torchvision.datasets, class_name)

    def tensors(train: bool):
        try:
            dataset = dataset_class(root, train=train, download=False)
        except RuntimeError as err:
            raise DataUnavailable(f"{class_name} not found under `{root}`: {err}") from None
        images = torch.as_tensor(dataset.data).float() / 255.0
        images = images.permute(0, 3, 1, 2) if images.dim() == 4 else images.unsqueeze(1)
        return images.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.int64)

    (x, y), test = tensors(True), tensors(False)
    cut = len(x) - val_size
    return Splits((x[:cut], y[:cut]), (x[cut:], y[cut:]), test, 10)
