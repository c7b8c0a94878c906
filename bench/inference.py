"""Latency of model artifacts (stage folders holding model.pt) at several batch sizes."""

from __future__ import annotations

from pathlib import Path

import torch

from runner.artifacts import CONFIG, MODEL_WEIGHTS, load_model, read_json
from runner.measure import latency_ms


def find_artifacts(run_dir: Path) -> dict[str, torch.nn.Module]:
    """`<recipe>/<NN-stage> (kind)` -> the reloaded model, for every stage folder of a run."""
    found = {}
    for folder in sorted(p for p in run_dir.iterdir() if (p / MODEL_WEIGHTS).is_file()):
        kind = read_json(folder / CONFIG)["kind"]
        found[f"{run_dir.name}/{folder.name} ({kind})"] = load_model(folder)
    return found


def example_batch(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return images[:batch_size].contiguous()


def time_once(model: torch.nn.Module, example: torch.Tensor, repeats: int) -> float:
    """One sample for the harness: the median of `repeats` forward passes, in milliseconds."""
    return latency_ms(model, example, repeats, warmup=max(1, repeats // 5))
