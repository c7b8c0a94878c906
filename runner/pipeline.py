"""Run a validated recipe: plan, then each stage in order, writing artifacts as it goes."""

from __future__ import annotations

import datetime as dt
import functools
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from rich.console import Console

from runner import artifacts
from runner.data.batches import build_data
from runner.lightning.trainer import build_trainer
from runner.models import build_model
from runner.lock import run_lock
from runner.plan import make_plan
from runner.report import summary_table, write_reports
from runner.stages import STAGES, StageContext


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def print_plan(plan, console: Console) -> None:
    style = {"run": "bold", "reuse": "cyan", "skip": "dim"}
    console.print("plan:")
    for step in plan:
        console.print(f"  [{style[step.action]}]{step.action:<5}[/] {step.spec.name} ({step.spec.kind}): {step.reason}")


def run_recipe(recipe, output_root: Path, console: Console, *, force: bool = False, start: str | None = None,
               only: str | None = None) -> list[dict]:
    """Returns one outcome per stage (name, kind, status, seconds, metrics, folder)."""
    run_dir = Path(output_root) / recipe.name
    with run_lock(run_dir):
        return _run_locked(recipe, run_dir, console, make_plan(recipe, run_dir, force=force, start=start, only=only))


def _run_locked(recipe, run_dir: Path, console: Console, plan) -> list[dict]:
    print_plan(plan, console)
    if recipe.trainer.threads is not None:
        torch.set_num_threads(recipe.trainer.threads)
    data = functools.cache(lambda: build_data(recipe.data, recipe.seed))
    model_spec = recipe.model.model_dump(mode="json", by_alias=True, exclude_none=True)
    started = _now()

    pl.seed_everything(recipe.seed, verbose=False)
    model = build_model(recipe.model)
    upstream_artifact = None  # the folder the next running stage loads its model from, if not in memory
    outcomes: list[dict] = []
    results = {}
    for step in plan:
        spec = step.spec
        outcome = {"name": spec.name, "kind": spec.kind, "status": {"reuse": "reused", "skip": "skipped"}.get(step.action, "ran"),
                   "seconds": 0.0, "folder": str(step.folder), "fingerprint": step.fingerprint}
        if step.action != "run":
            upstream_artifact = step.folder
            finished = step.action == "reuse" or artifacts.is_done(step.folder, step.fingerprint)
            outcomes.append({**outcome, "metrics": artifacts.read_json(step.folder / artifacts.METRICS) if finished else {}})
            continue
        if upstream_artifact is not None:
            model, upstream_artifact = artifacts.load_model(upstream_artifact), None
        console.print(f"[bold]run[/] {spec.name} ({spec.kind})")
        artifacts.reset(step.folder, step.fingerprint)
        seed = recipe.seed + step.index
        pl.seed_everything(seed, verbose=False)
        ctx = StageContext(
            recipe=recipe, index=step.index, stage_dir=step.folder, data=data, seed=seed, upstream=results,
            trainer=functools.partial(build_trainer, recipe.trainer, step.folder),
        )
        start = time.perf_counter()
        result = STAGES.get(spec.kind)(spec, model, ctx)
        seconds = time.perf_counter() - start
        model = result.model
        results[spec.name] = result
        artifacts.save_model(model, step.folder, model_spec)
        artifacts.write_json(step.folder / artifacts.METRICS, result.metrics)
        artifacts.write_json(step.folder / artifacts.CONFIG, spec.model_dump(mode="json"))
        artifacts.mark_done(step.folder, step.fingerprint)  # last: the stage is complete only now
        outcomes.append({**outcome, "seconds": round(seconds, 3), "metrics": result.metrics})

    write_reports(run_dir, recipe, outcomes, started, _now())
    console.print(summary_table(recipe.name, outcomes))
    console.print(f"artifacts: {run_dir}  (report: {run_dir / 'report.md'})")
    return outcomes
