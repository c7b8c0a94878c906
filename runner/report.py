"""The run's summary: run.json for machines, report.md for people, a rich table for the terminal."""

from __future__ import annotations

import platform
from pathlib import Path

import pytorch_lightning
import torch
from rich.table import Table

from runner import __version__
from runner.artifacts import write_json, write_text

# The metrics worth a column in the one-row-per-stage summary, in this order.
HEADLINE = ["val_acc", "test_acc", "test_error", "sparsity", "params_nonzero", "model_bytes",
            "latency_ms_b1", "latency_ms_b256", "samples_per_second"]


def versions() -> dict:
    return {"nnopt": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "pytorch_lightning": pytorch_lightning.__version__, "platform": platform.platform()}


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _columns(outcomes: list[dict]) -> list[str]:
    return [key for key in HEADLINE if any(key in o["metrics"] for o in outcomes)]


def summary_table(recipe_name: str, outcomes: list[dict]) -> Table:
    table = Table(title=f"nnopt run: {recipe_name}")
    for column in ["stage", "kind", "status", "seconds"] + _columns(outcomes):
        table.add_column(column, justify="left" if column in ("stage", "kind", "status") else "right")
    for o in outcomes:
        table.add_row(o["name"], o["kind"], o["status"], f"{o['seconds']:.1f}",
                      *(_cell(o["metrics"].get(c)) for c in _columns(outcomes)))
    return table


def write_reports(run_dir: Path, recipe, outcomes: list[dict], started: str, finished: str) -> None:
    write_json(run_dir / "run.json", {
        "recipe": recipe.model_dump(mode="json", by_alias=True),
        "seed": recipe.seed,
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "started": started,
        "finished": finished,
        "stages": outcomes,
    })
    columns = _columns(outcomes)
    lines = [f"# {recipe.name}", "", recipe.description, "",
             f"Run {started} -> {finished}; nnopt {__version__}, torch {torch.__version__}, "
             f"Lightning {pytorch_lightning.__version__}, seed {recipe.seed}.", "",
             "| " + " | ".join(["stage", "kind", "status", "seconds"] + columns) + " |",
             "|" + "---|" * (4 + len(columns))]
    for o in outcomes:
        cells = [o["name"], o["kind"], o["status"], f"{o['seconds']:.1f}"] + [_cell(o["metrics"].get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Every metric of every stage is in the stage folder's `metrics.json` and in `run.json`.", ""]
    write_text(run_dir / "report.md", "\n".join(lines))
