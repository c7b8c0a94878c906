"""Build the recipe's `data:` block into an object of the data contract: in memory when the data set is
tensors and needs no per-example transforms, streamed through DataLoader workers otherwise, or the
user's own LightningDataModule."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset, TensorDataset

from runner.data import DATASETS, DatasetSplits, DataUnavailable, Splits
from runner.data import augment
from runner.data.batches import InMemoryData
from runner.data.streaming import StreamingData
from runner.data.user_module import ModuleData


def build_data(spec, seed: int):
    """`spec` is the recipe's DataSpec; the result has num_classes, batch_size, eval_batch_size, the three
    loaders, examples(split, count), split_size(split) and input_shape."""
    if spec.import_ is not None:
        made = _call_import(spec)
    else:
        made = DATASETS.get(spec.name)(**spec.factory_args())
    if isinstance(made, pl.LightningDataModule):
        return ModuleData(made, spec)
    given_transforms = bool(spec.transforms.train or spec.transforms.eval)
    if isinstance(made, Splits) and not given_transforms:
        return InMemoryData(made, spec.batch_size, spec.eval_batch_size, spec.limit, seed)
    if isinstance(made, Splits):
        made = DatasetSplits(*(TensorDataset(*getattr(made, split)) for split in ("train", "val", "test")),
                             num_classes=made.num_classes)
    transforms = augment.build(spec.transforms.train), augment.build(spec.transforms.eval)
    return StreamingData(made, spec.batch_size, spec.eval_batch_size, spec.limit, seed, transforms, spec.loader)


def _call_import(spec):
    from runner.imports import resolve

    factory = resolve(spec.import_, spec.recipe_dir)
    made = factory(**spec.args)
    if isinstance(made, pl.LightningDataModule):
        return made
    if isinstance(made, (tuple, list)) and len(made) == 3 and all(isinstance(d, Dataset) for d in made):
        for split, dataset in zip(("train", "val", "test"), made):
            if hasattr(dataset, "__len__") and len(dataset) == 0:  # before counting classes from its labels
                raise DataUnavailable(f"the {split} Dataset `{spec.import_}` returned is empty",
                                      "every stage needs examples: training reads train, validation val, evaluate test")
        return DatasetSplits(*made, num_classes=_class_count(made[0], spec.import_))
    raise DataUnavailable(f"`{spec.import_}` returned {type(made).__name__}, not a LightningDataModule or a "
                          "(train, val, test) tuple of torch Datasets",
                          "return `MyDataModule(...)` or `train_set, val_set, test_set`")


def _class_count(train: Dataset, target: str) -> int:
    """From what torchvision's and torch's data sets expose, without reading an example."""
    classes = getattr(train, "classes", None)
    if classes is not None:
        return len(classes)
    labels = getattr(train, "targets", None)
    if labels is None and isinstance(train, TensorDataset) and len(train.tensors) == 2:
        labels = train.tensors[1]
    if labels is not None:
        return int(torch.as_tensor(labels).max()) + 1
    raise DataUnavailable(f"the training Dataset `{target}` returned has neither `classes` nor `targets`, so the "
                          "number of classes is unknown",
                          "set `train_set.classes = [names...]` (or `targets`, the labels) before returning it")


def root_listing_digest(spec) -> str | None:
    """A digest of the files under a registered data set's `root` folder (relative name, size, modification
    time: a walk of file names, never reading them), so that adding, removing or rewriting a file reruns
    what was trained on it. None for data without a root folder."""
    if spec.name is None or not isinstance(spec.args.get("root"), str):
        return None
    root = Path(spec.factory_args()["root"])
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders.sort()
        for name in sorted(files):
            stat = os.stat(os.path.join(folder, name))
            digest.update(f"{os.path.relpath(os.path.join(folder, name), root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
