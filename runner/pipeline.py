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
from runner.plan import make_plan
from runner.report import summary_table, write_reports
from runner.stages import STAGES, StageContext


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def run_recipe(recipe, output_root: Path, console: Console) -> list[dict]:
    """Returns one outcome per stage (name, kind, status, seconds, metrics, folder)."""
    run_dir = Path(output_root) / recipe.name
    plan = make_plan(recipe, run_dir)
    if recipe.trainer.threads is not None:
        torch.set_num_threads(recipe.trainer.threads)
    data = functools.cache(lambda: build_data(recipe.data, recipe.seed))
    model_spec = recipe.model.model_dump(mode="json", by_alias=True, exclude_none=True)
    started = _now()

    pl.seed_everything(recipe.seed, verbose=False)
    model = build_model(recipe.model)
    last_reused = None
    outcomes: list[dict] = []
    results = {}
    for step in plan:
        spec = step.spec
        if step.reuse:
            console.print(f"[cyan]reuse[/] {spec.name}: {step.reason} ({step.folder})")
            last_reused = step.folder
            outcomes.append({"name": spec.name, "kind": spec.kind, "status": "reused", "seconds": 0.0,
                             "folder": str(step.folder), "fingerprint": step.fingerprint,
                             "metrics": artifacts.read_json(step.folder / artifacts.METRICS)})
            continue
        if last_reused is not None:
            model, last_reused = artifacts.load_model(last_reused), None
        console.print(f"[bold]run[/] {spec.name} ({spec.kind}): {step.reason}")
        artifacts.reset(step.folder)
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
        outcomes.append({"name": spec.name, "kind": spec.kind, "status": "ran", "seconds": round(seconds, 3),
                         "folder": str(step.folder), "fingerprint": step.fingerprint, "metrics": result.metrics})

    write_reports(run_dir, recipe, outcomes, started, _now())
    console.print(summary_table(recipe.name, outcomes))
    console.print(f"artifacts: {run_dir}  (report: {run_dir / 'report.md'})")
    return outcomes
