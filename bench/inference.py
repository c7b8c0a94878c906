"""Latency of model artifacts (stage folders holding model.pt), eager and on their fastest path."""

from __future__ import annotations

from pathlib import Path

import torch

from runner.artifacts import CONFIG
from runner.files import read_json
from runner.modelio import MODEL_WEIGHTS, load_model
from runner.deploy import fastest_path
from runner.measure import latency_ms


UNCHANGED = {"evaluate", "export"}  # stage kinds that pass their input model on as it is


def find_artifacts(run_dir: Path) -> dict[str, torch.nn.Module]:
    """`<recipe>/<NN-stage> (kind)` -> the reloaded model, for every stage folder that changed the model."""
    found = {}
    for folder in sorted(p for p in run_dir.iterdir() if (p / MODEL_WEIGHTS).is_file()):
        kind = read_json(folder / CONFIG)["kind"]
        if kind not in UNCHANGED:
            found[f"{run_dir.name}/{folder.name} ({kind})"] = load_model(folder).eval()
    return found


def runnables(models: dict[str, torch.nn.Module], example: torch.Tensor, forwards: int) -> dict[str, tuple]:
    """name -> (eager model, fastest path's name, its runnable), the path picked by runner.deploy."""
    out = {}
    for name, model in models.items():
        path, runnable, _ = fastest_path(model, example, repeats=forwards, warmup=5)
        out[name] = (model, path, runnable)
    return out


def time_once(model, example: torch.Tensor, forwards: int) -> float:
    """One sample for the harness: the median of `forwards` forward passes, in milliseconds."""
    return latency_ms(model, example, forwards, warmup=max(1, forwards // 5))
