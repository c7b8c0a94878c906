"""`image_folder`: images in one subfolder per class, as DIR/{train,val,test}/<class>/ or as one DIR/<class>/
split by seeded fractions; read with torchvision's ImageFolder, example by example."""

from __future__ import annotations

from pathlib import Path

import torch

from runner.data import DATASETS, DatasetSplits, DataUnavailable, preflight

SPLITS = ("train", "val", "test")
DEFAULT_FRACTION = 0.1  # of each class, for val and for test, when one folder holds everything


def _extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return IMG_EXTENSIONS


def _class_folders(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith("."))


def _images_by_class(folder: Path, classes: list[str]) -> dict[str, list[Path]]:
    extensions = _extensions()
    found = {name: sorted(path for path in (folder / name).rglob("*") if path.suffix.lower() in extensions
                          and path.is_file()) for name in classes}
    for name, images in found.items():
        if not images:
            raise DataUnavailable(f"class folder `{folder / name}` holds no images",
                                  f"every class folder needs at least one image ({', '.join(extensions)})", arg="root")
    return found


def _split_folders(root: Path, val_fraction: float | None, test_fraction: float | None) -> dict[str, Path | float]:
    """Each split's folder, or the fraction of train it is carved from."""
    layout: dict[str, Path | float] = {"train": root / "train"}
    for split, fraction, arg in (("val", val_fraction, "val_fraction"), ("test", test_fraction, "test_fraction")):
        folder = root / split
        if folder.is_dir() and fraction is not None:
            raise DataUnavailable(f"`{folder}` exists and `{arg}` would carve another {split} split from train",
                                  f"drop `{arg}`, or remove the {split} folder", arg=arg)
        if not folder.is_dir() and fraction is None:
            raise DataUnavailable(f"`{root}` has a train folder but no `{split}` folder",
                                  f"add {folder}/<class>/..., or set `{arg}` to carve it from train", arg="root")
        layout[split] = folder if folder.is_dir() else fraction
    return layout


def scan(root: str, val_fraction: float | None = None, test_fraction: float | None = None,
         split_seed: int = 0) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
    """The class names and each split's (image path, class index) list; raises DataUnavailable naming
    the folder at fault. Reads file names only, never the images."""
    folder = Path(root)
    if not folder.exists():
        raise DataUnavailable(f"data root `{folder}` does not exist",
                              "a relative `root` is relative to the recipe file's folder", arg="root")
    if not folder.is_dir():
        raise DataUnavailable(f"data root `{folder}` is a file, not a folder", arg="root")
    for arg, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if fraction is not None and not 0 < fraction < 1:
            raise DataUnavailable(f"`{arg}` must be in (0, 1), got {fraction}", arg=arg)

    if (folder / "train").is_dir():
        layout = _split_folders(folder, val_fraction, test_fraction)
    else:
        layout = {"train": folder, "val": DEFAULT_FRACTION if val_fraction is None else val_fraction,
                  "test": DEFAULT_FRACTION if test_fraction is None else test_fraction}
    classes = _class_folders(layout["train"])
    if not classes:
        shown = ", ".join(sorted(entry.name for entry in layout["train"].iterdir())[:5]) or "nothing"
        raise DataUnavailable(f"`{layout['train']}` holds no class folders (found: {shown})",
                              f"put each class's images in its own folder: {folder}/<class>/<image>, or "
                              f"{folder}/train/<class>/<image> with val/ and test/ alike", arg="root")
    split_folders = {split: place for split, place in layout.items() if isinstance(place, Path)}
    for split, place in split_folders.items():
        theirs = _class_folders(place)
        if theirs != classes:
            missing, extra = sorted(set(classes) - set(theirs)), sorted(set(theirs) - set(classes))
            parts = ([f"lacks {', '.join(f'`{c}`' for c in missing)}"] if missing else []) + \
                    ([f"has {', '.join(f'`{c}`' for c in extra)} that train lacks"] if extra else [])
            raise DataUnavailable(f"the splits have different classes: `{place}` {' and '.join(parts)}",
                                  "every split needs the same class folders (the class index is the folder's "
                                  "position in sorted order)", arg="root")

    samples: dict[str, list[tuple[str, int]]] = {split: [] for split in SPLITS}
    generator = torch.Generator().manual_seed(split_seed)
    for split, place in split_folders.items():
        for index, images in enumerate(_images_by_class(place, classes).values()):
            samples[split] += [(str(path), index) for path in images]
    carved = {split: place for split, place in layout.items() if not isinstance(place, Path)}
    if carved:
        # Per class, so every split keeps the class balance; train keeps what is left.
        kept: list[tuple[str, int]] = []
        for index, images in enumerate(_images_by_class(layout["train"], classes).values()):
            order = [images[i] for i in torch.randperm(len(images), generator=generator).tolist()]
            for split, fraction in carved.items():
                count = round(len(images) * fraction)
                samples[split] += [(str(path), index) for path in order[:count]]
                order = order[count:]
            kept += [(str(path), index) for path in order]
        samples["train"] = kept
    for split in SPLITS:
        if not samples[split]:
            arg = f"{split}_fraction" if split in carved else "root"
            raise DataUnavailable(f"the {split} split of `{folder}` is empty",
                                  f"raise `{arg}` or add images" if split in carved else "add images", arg=arg)
    return classes, samples


preflight("image_folder")(scan)


class ImageFiles(torch.utils.data.Dataset):
    """(PIL image, class index) for each (path, index) of a split; images are decoded when read."""

    def __init__(self, samples: list[tuple[str, int]], classes: list[str]):
        self.samples, self.classes = samples, classes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from torchvision.datasets.folder import default_loader

        path, label = self.samples[index]
        return default_loader(path), label


@DATASETS.register("image_folder")
def image_folder(root: str, val_fraction: float | None = None, test_fraction: float | None = None,
                 split_seed: int = 0) -> DatasetSplits:
    """`root/train`, `root/val`, `root/test` with one folder per class (a missing val or test carved
    from train by `val_fraction`/`test_fraction`), or one `root/<class>/` folder carved into all three
    (10% each by default), per class and seeded by `split_seed`."""
    classes, samples = scan(root, val_fraction, test_fraction, split_seed)
    return DatasetSplits(*(ImageFiles(samples[split], classes) for split in SPLITS), num_classes=len(classes))
