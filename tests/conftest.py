"""Shared fixtures (tiny recipes built from dicts, the CLI called as a user calls it) and the test processes' cores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, lowered by a cgroup v2 CPU quota (a container given
    2 CPUs of a 64-core host sees 64 in os.cpu_count() but gets the time of 2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return cores
    return cores if quota == "max" else max(1, min(cores, int(quota) // int(period)))


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without xdist (-p no:xdist) it is never called
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's addopts): one test process per usable core. None defers to xdist, which reads
    $PYTEST_XDIST_AUTO_NUM_WORKERS."""
    return None if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS") else usable_cores()


# A pytest-xdist worker computes on its share of the cores, so that two workers on two cores do not each run two
# torch threads (half of every matmul waiting for a core). Set before torch is imported, in the environment, so the
# `nnopt` subprocesses a test starts compute with the same count as the test's in-process runs: the count is part
# of every stage's fingerprint. A count the user set in OMP_NUM_THREADS stands; a serial run (-n 0) keeps torch's.
# torch and nnopt are imported by the fixtures, not here: xdist's controlling process, which only hands out tests,
# loads this file too and would spend seconds on them before starting the workers.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


@pytest.fixture(autouse=True)
def torch_threads_as_the_process_started():
    """A test that pins torch's thread count (a bench loop, a recipe run in-process) must not leave it pinned:
    the count is part of every stage's fingerprint, so an in-process run after it would no longer match the
    same recipe run in a subprocess."""
    import torch

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
    from runner.cli import main

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


# ---- exact resume: a run interrupted and rerun, against the same run never interrupted ----------------------

TIMING = {"fit_seconds", "samples_per_second", "resumed"}


def timing(metric: str) -> bool:
    """Wall-clock figures (and the inference path chosen by timing) differ between any two runs;
    everything else must match bit for bit."""
    return metric in TIMING or metric.startswith(("latency", "deploy_"))


def untimed_metrics(run_dir: Path, folder: str) -> dict:
    """A stage's metrics less the wall-clock ones: what a resumed run must reproduce exactly."""
    return {k: v for k, v in read_metrics(run_dir, folder).items() if not timing(k)}


def interrupt_after_checkpoint(monkeypatch, count: int) -> list[int]:
    """Press Ctrl-C right after the `count`-th checkpoint is written (0: never); returns the steps saved."""
    from runner.lightning.resume import ResumePoints  # Lightning: imported by the tests that train, not here

    save, saved = ResumePoints._save, []

    def save_then_interrupt(self, trainer):
        save(self, trainer)
        saved.append(trainer.global_step)
        if len(saved) == count:
            raise KeyboardInterrupt

    monkeypatch.setattr(ResumePoints, "_save", save_then_interrupt)
    return saved


@dataclass
class Resumed:
    """What `run_straight_and_resumed` leaves: both run folders, and what the interrupted run and its rerun did."""

    straight: Path  # the run never interrupted
    resumed: Path  # the run interrupted, then rerun to resume
    saved_before: list[int]  # the steps checkpointed before the interruption
    saved_after: list[int]  # the steps the rerun checkpointed
    out: str  # the rerun's console output
    err: str


def run_straight_and_resumed(nnopt, monkeypatch, recipe: Path, output: Path, checkpoints: int) -> Resumed:
    """Run `recipe` straight through into output/straight; run it into output/interrupted with a Ctrl-C right
    after its `checkpoints`-th checkpoint (counted over all its stages), then again there, which resumes."""
    assert nnopt("run", recipe, "-O", output / "straight")[0] == 0
    with monkeypatch.context() as patch:
        saved_before = interrupt_after_checkpoint(patch, checkpoints)
        assert nnopt("run", recipe, "-O", output / "interrupted")[0] == 130
    with monkeypatch.context() as patch:
        saved_after = interrupt_after_checkpoint(patch, 0)  # count only
        code, out, err = nnopt("run", recipe, "-O", output / "interrupted")
    assert code == 0, out + err
    name = yaml.safe_load(recipe.read_text())["name"]
    return Resumed(output / "straight" / name, output / "interrupted" / name, saved_before, saved_after, out, err)
