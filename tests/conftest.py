"""Shared fixtures: tiny recipes built from dicts, and the CLI called as a user calls it."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from runner.cli import main


@pytest.fixture(autouse=True)
def torch_threads_as_the_process_started():
    """A test that pins torch's thread count (a bench loop, a recipe run in-process) must not leave it pinned:
    the count is part of every stage's fingerprint, so an in-process run after it would no longer match the
    same recipe run in a subprocess."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def validate_cache_of_its_own(tmp_path_factory, monkeypatch):
    """Each test starts with an empty validate facts cache (runner.recipe.facts_cache), its subprocesses included:
    one test's monkeypatched probe or registry must not answer another's validate."""
    monkeypatch.setenv("NNOPT_VALIDATE_CACHE", str(tmp_path_factory.mktemp("validate_cache")))


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe dict (or raw text) to a YAML file and return its path."""

    def write(content, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        return path

    return write


@pytest.fixture
def nnopt(capsys):
    """Run `nnopt ARGS...` in-process; returns (exit code, stdout, stderr)."""

    def call(*args: str):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


def synthetic_recipe(**stage_overrides) -> dict:
    """A recipe that trains a small MLP on synthetic data in about a second."""
    train = {"name": "train", "kind": "train", "epochs": 3,
             "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, **stage_overrides}
    return {
        "name": "tiny",
        "seed": 0,
        "model": {"name": "mlp", "args": {"hidden": [32], "in_features": 32}},
        "data": {"name": "synthetic", "batch_size": 32,
                 "args": {"shape": [32], "num_train": 512, "num_val": 128, "num_test": 256, "noise": 2.0}},
        "trainer": {"progress_bar": False},
        "stages": [train, {"name": "evaluate", "kind": "evaluate", "latency_batch_sizes": [1, 32],
                           "latency_repeats": 3, "latency_warmup": 0}],
    }


def mnist_recipe(stages: list[dict], train_limit: int = 5000, **top) -> dict:
    """LeNet-300-100 on a fixed MNIST subset: real data, a few seconds per epoch."""
    return {"name": "mnist_small", "seed": 0, "model": {"name": "lenet_300_100"},
            "data": {"name": "mnist", "batch_size": 64, "limit": {"train": train_limit, "val": 2000, "test": 2000}},
            "trainer": {"progress_bar": False}, "stages": stages, **top}


def building_folder(recipe_output: Path, recipe_file: Path, index: int = 0) -> Path:
    """Where stage `index` of a recipe file is built, with its resume checkpoints, until it is finished."""
    from runner.plan import fingerprints
    from runner.recipe import load_recipe
    from runner.store import store_of

    return store_of(recipe_output).building(fingerprints(load_recipe(recipe_file))[index])


def read_metrics(run_dir: Path, folder: str) -> dict:
    return json.loads((run_dir / folder / "metrics.json").read_text())


def kill_at_step(victim: subprocess.Popen, position: Path, step: int) -> None:
    """SIGKILL `victim` (an `nnopt run` process) once its checkpoint position file reaches `step`."""
    while victim.poll() is None:
        if position.is_file() and json.loads(position.read_text())["step"] >= step:
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert victim.wait() == -signal.SIGKILL, victim.stdout.read()
