"""Startup: commands that train nothing import nothing training needs; the MNIST cache is uint8 and loads exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from runner.data import DataUnavailable, mnist

ROOT = Path(__file__).resolve().parent.parent

# Lightning (and what only training, plots and export use) costs seconds of import; these commands need none of it.
# torchvision comes in through Torch-Pruning and timm, which only neuron pruning needs.
HEAVY = ("pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics", "matplotlib", "onnx", "onnxruntime",
         "torchvision", "timm", "torch_pruning")
COMMANDS = [["validate", "recipes/prune_then_quant.yaml"], ["list"], ["list", "--args"], ["schema"], ["docs"],
            ["docs", "trainer"]]

# Each command in turn in one process (one torch import for all): after each, the heavy modules loaded so far.
PROBE = """
import contextlib, io, json, sys
from runner.cli import main
heavy, found = json.loads(sys.argv[1]), {}
for command in json.loads(sys.argv[2]):
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(command)
    found[" ".join(command)] = {"exit": code, "loaded": [m for m in heavy if m in sys.modules]}
print(json.dumps(found))
"""


def test_commands_that_train_nothing_import_no_lightning():
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(HEAVY), json.dumps(COMMANDS)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(found) == [" ".join(c) for c in COMMANDS]
    assert all(entry["exit"] == 0 for entry in found.values()), found
    # the first command to load a heavy module names it; an empty list after the last covers them all
    assert {command: entry["loaded"] for command, entry in found.items() if entry["loaded"]} == {}


HIT_PROBE = """
import contextlib, io, json, sys
from runner.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = main(["validate", sys.argv[1]])
print(json.dumps({"exit": code, "out": out.getvalue(), "torch": "torch" in sys.modules}))
"""


def test_validate_imports_no_torch_once_it_knows_the_recipe(recipe="recipes/prune_then_quant.yaml"):
    """The first validate imports torch (dry build, data facts) and caches what it learned
    (runner.recipe.facts_cache); the next one of the same recipe answers the same without importing it."""
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", HIT_PROBE, recipe], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert [run["exit"] for run in runs] == [0, 0] and runs[0]["out"] == runs[1]["out"]
    assert [run["torch"] for run in runs] == [True, False]


def _float_cache(folder: Path, pixels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An earlier version's cache: float32 pixels k/256 and int64 labels under the old name."""
    arrays = {}
    for split, count in (("train", 5), ("val", 3), ("test", 2)):
        arrays[f"{split}_x"] = pixels[split].astype(np.float32) / np.float32(256)
        arrays[f"{split}_y"] = np.arange(count, dtype=np.int64) % 10
    folder.mkdir(parents=True)
    np.savez(folder / mnist.FLOAT_CACHE_NAME, **arrays)
    return arrays


def test_float_cache_of_earlier_versions_becomes_uint8_exactly(tmp_path, monkeypatch):
    generator = np.random.default_rng(0)
    pixels = {split: generator.integers(0, 256, (count, 784)) for split, count in (("train", 5), ("val", 3), ("test", 2))}
    pixels["train"][0, :2] = (0, 255)  # both ends of the range
    cache = tmp_path / "cache"
    original = _float_cache(cache, pixels)
    monkeypatch.setenv("NNOPT_CACHE", str(cache))
    for attempt in ("converted from the float cache", "read back from the uint8 cache"):
        monkeypatch.setattr(mnist, "_LOADED", None)
        splits = mnist.mnist()
        assert not (cache / mnist.FLOAT_CACHE_NAME).exists(), attempt  # the 220 MB file is gone once converted
        with np.load(cache / mnist.CACHE_NAME) as stored:
            assert stored["train_x"].dtype == np.uint8 and np.array_equal(stored["train_x"], pixels["train"]), attempt
        for split in ("train", "val", "test"):
            images, labels = getattr(splits, split)
            assert images.dtype == torch.float32 and images.shape[1:] == (1, 28, 28), attempt
            assert torch.equal(images.flatten(1), torch.from_numpy(original[f"{split}_x"])), (attempt, split)
            assert labels.dtype == torch.int64 and torch.equal(labels, torch.from_numpy(original[f"{split}_y"]))


def test_pixels_uint8_cannot_hold_are_refused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    arrays = _float_cache(cache, {split: np.zeros((n, 784)) for split, n in (("train", 5), ("val", 3), ("test", 2))})
    arrays["val_x"][0, 0] = 0.3  # not k/256: rounding it would change the data
    np.savez(cache / mnist.FLOAT_CACHE_NAME, **arrays)
    monkeypatch.setenv("NNOPT_CACHE", str(cache))
    monkeypatch.setattr(mnist, "_LOADED", None)
    with pytest.raises(DataUnavailable, match="multiples of 1/256"):
        mnist.mnist()
    assert not (cache / mnist.CACHE_NAME).exists()
