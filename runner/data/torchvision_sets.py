"""torchvision's data sets by name from a folder the user already has (`root:`), read example by example;
nothing is downloaded, and a missing file is named at `validate`."""

from __future__ import annotations

import importlib.util
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Subset

from runner.data import DATASETS, DatasetSplits, DataUnavailable, preflight


@dataclass(frozen=True)
class TorchvisionSet:
    class_name: str  # in torchvision.datasets
    num_classes: int
    val_size: int  # default count of the last training examples that become the validation split
    needs: tuple[str, ...] = ()  # packages torchvision needs to read the files


SETS = {
    "cifar10": TorchvisionSet("CIFAR10", 10, 5000),
    "cifar100": TorchvisionSet("CIFAR100", 100, 5000),
    "fashion_mnist": TorchvisionSet("FashionMNIST", 10, 10000),
    "kmnist": TorchvisionSet("KMNIST", 10, 10000),
    "mnist": TorchvisionSet("MNIST", 10, 10000),  # registered by runner.data.mnist; only its `root:` form is here
    "svhn": TorchvisionSet("SVHN", 10, 5000, needs=("scipy",)),
}


def _dataset_class(name: str):
    import torchvision.datasets

    return getattr(torchvision.datasets, SETS[name].class_name)


def expected_files(name: str) -> list[str]:
    """The files torchvision reads, relative to `root`, from the data set class's own file lists."""
    cls = _dataset_class(name)
    if hasattr(cls, "resources"):  # the MNIST family: ROOT/<Class>/raw/<archive without .gz>
        return [os.path.join(cls.__name__, "raw", os.path.splitext(os.path.basename(url))[0]) for url, _ in cls.resources]
    if hasattr(cls, "train_list"):  # CIFAR: ROOT/<base folder>/<batch files>
        files = [file for file, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return [os.path.join(cls.base_folder, file) for file in files]
    return [file for _, file, _ in cls.split_list.values()]  # SVHN: ROOT/<split>_32x32.mat


def check_root(name: str, root: str) -> None:
    """Raises DataUnavailable naming every expected file that is missing under `root`."""
    spec = SETS[name]
    folder = Path(root)
    missing_packages = [package for package in spec.needs if importlib.util.find_spec(package) is None]
    if missing_packages:
        raise DataUnavailable(f"{spec.class_name} needs {', '.join(f'`{p}`' for p in missing_packages)} to read its "
                              f"files, which is not installed", f"pip install {' '.join(missing_packages)}")
    expected = expected_files(name)
    missing = [file for file in expected if not (folder / file).is_file()]
    if missing:
        where = "does not exist" if not folder.is_dir() else f"lacks {len(missing)} of its {len(expected)} files"
        raise DataUnavailable(
            f"{spec.class_name} root `{folder}` {where}; expected: " + ", ".join(f"{folder / f}" for f in expected),
            f"nnopt never downloads: fetch it where there is internet (torchvision.datasets.{spec.class_name}"
            f"(ROOT, download=True)) and copy ROOT here; a relative root is relative to the recipe file", arg="root")


def load(name: str, root: str, val_size: int | None = None) -> DatasetSplits:
    check_root(name, root)
    spec, cls = SETS[name], _dataset_class(name)

    def split(train: bool):
        if "train" in inspect.signature(cls).parameters:
            return cls(root, train=train, download=False)
        return cls(root, split="train" if train else "test", download=False)

    try:
        train, test = split(True), split(False)
    except RuntimeError as error:  # present but not readable (a checksum mismatch, a truncated file)
        raise DataUnavailable(f"{spec.class_name} under `{root}` does not load: {error}",
                              "fetch the files again", arg="root") from None
    val_size = spec.val_size if val_size is None else val_size
    if not 0 < val_size < len(train):
        raise DataUnavailable(f"`val_size` {val_size} leaves no training or no validation examples of the "
                              f"{len(train)} in {spec.class_name}'s training split", arg="val_size")
    cut = len(train) - val_size
    return DatasetSplits(Subset(train, range(cut)), Subset(train, range(cut, len(train))), test, spec.num_classes)


def _register(name: str) -> None:
    def factory(root: str, val_size: int | None = None) -> DatasetSplits:
        return load(name, root, val_size)

    factory.__name__ = name
    factory.__doc__ = (f"torchvision's {SETS[name].class_name} from `root` (never downloaded); the last "
                       f"`val_size` training examples (default {SETS[name].val_size}) are the validation split.")
    DATASETS.register(name)(factory)
    preflight(name)(lambda root, val_size=None: check_root(name, root))


for _name in SETS:
    if _name != "mnist":
        _register(_name)


@preflight("mnist")
def _mnist_root(root: str | None = None, **_) -> None:
    if root is not None:
        check_root("mnist", root)
