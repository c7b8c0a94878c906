"""Run a validated recipe: plan, then each stage in order, writing artifacts as it goes."""

from __future__ import annotations

import datetime as dt
import functools
import time
from contextlib import ExitStack
from pathlib import Path

import pytorch_lightning as pl
import torch
from rich.console import Console

from runner import artifacts
from runner.distributed import Ranks, buffers_from_zero, launch, model_from_zero, run_on_zero, state_digest
from runner.errors import StageError
from runner.data.batches import build_data
from runner.lightning.trainer import build_trainer
from runner.models import build_model
from runner.lock import run_lock
from runner.plan import make_plan
from runner.report import summary_table, write_reports
from runner.stages import STAGES, StageContext, StageResult
from runner.verdicts import verdict_table


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _load_upstream(folder: Path, stage: str):
    try:
        return artifacts.load_model(folder)
    except Exception as error:  # tampered with or damaged after it was finished: never trusted, never unpickled
        raise StageError(stage, f"the finished artifact it starts from, {folder}, does not load: {error}",
                         f"delete {folder} (or rerun with --from {folder.name.split('-', 1)[1]}) to rebuild it") from None


def print_plan(plan, console: Console) -> None:
    style = {"run": "bold", "reuse": "cyan", "skip": "dim"}
    console.print("plan:")
    for step in plan:
        console.print(f"  [{style[step.action]}]{step.action:<5}[/] {step.spec.name} ({step.spec.kind}): {step.reason}",
                      soft_wrap=True)


def run_recipe(recipe, output_root: Path, console: Console, *, force: bool = False, start: str | None = None,
               only: str | None = None, run_dir: Path | None = None) -> list[dict]:
    """Returns one outcome per stage (name, kind, status, seconds, metrics, folder).

    The run folder is `output_root/<recipe name>` unless `run_dir` says otherwise (seeds, sweep points).

    Under a multi-process strategy every rank runs this: training stages on every rank, any
    other stage on global rank 0 (its model is then sent to the others); only rank 0 takes the
    run folder's lock, plans (the others follow its plan, whatever their view of the disk) and writes.
    """
    run_dir = Path(run_dir) if run_dir is not None else Path(output_root) / recipe.name  # seeds, sweep points
    ranks = launch(recipe.trainer)
    if not ranks.is_zero:
        console = Console(quiet=True)
    with ExitStack() as held:
        def lock_and_plan():
            artifacts.refuse_link(run_dir)
            held.enter_context(run_lock(run_dir))
            return make_plan(recipe, run_dir, force=force, start=start, only=only)

        plan = ranks.from_zero(run_on_zero(ranks, "plan", lock_and_plan))
        return _run_locked(recipe, run_dir, console, plan, ranks)


def _run_locked(recipe, run_dir: Path, console: Console, plan, ranks: Ranks) -> list[dict]:
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
            finished = ranks.is_zero and (step.action == "reuse" or artifacts.is_done(step.folder, step.fingerprint))
            outcomes.append({**outcome, "metrics": artifacts.read_json(step.folder / artifacts.METRICS) if finished else {}})
            continue
        if upstream_artifact is not None:
            loaded = _load_upstream(upstream_artifact, spec.name) if ranks.is_zero else None
            model, upstream_artifact = model_from_zero(ranks, recipe.model, loaded), None
        console.print(f"[bold]run[/] {spec.name} ({spec.kind})")
        if ranks.is_zero:
            artifacts.reset(step.folder, step.fingerprint, resume=step.resume)
        seed = recipe.seed + step.index
        pl.seed_everything(seed, verbose=False)
        everywhere = spec.runs_on_every_rank
        settings = recipe.trainer if everywhere else recipe.trainer.one_process()
        ctx = StageContext(
            recipe=recipe, index=step.index, stage_dir=step.folder, data=data, seed=seed, upstream=results,
            trainer=functools.partial(build_trainer, settings, step.folder),
        )
        start = time.perf_counter()
        if everywhere:
            ranks.from_zero(None)  # a barrier: every rank sees the folder (and any checkpoint to resume) after reset
            result = STAGES.get(spec.kind)(spec, model, ctx)
            if ranks.world_size > 1:
                result.metrics["rank_digests"] = _same_on_every_rank(ranks, spec.name, result.model)
        else:
            result = run_on_zero(ranks, spec.name, lambda: STAGES.get(spec.kind)(spec, model, ctx))
            result = StageResult(model_from_zero(ranks, recipe.model, result and result.model),
                                 ranks.from_zero(result and result.metrics))
        seconds = time.perf_counter() - start
        model = result.model
        results[spec.name] = result
        if ranks.is_zero:
            artifacts.save_model(model, step.folder, model_spec)
            artifacts.write_json(step.folder / artifacts.METRICS, result.metrics)
            artifacts.write_json(step.folder / artifacts.CONFIG, spec.model_dump(mode="json"))
            artifacts.mark_done(step.folder, step.fingerprint)  # last: the stage is complete only now
        outcomes.append({**outcome, "seconds": round(seconds, 3), "metrics": result.metrics})

    verdicts = write_reports(run_dir, recipe, outcomes, started, _now()) if ranks.is_zero else []
    console.print(summary_table(recipe.name, outcomes))
    if recipe.expect is not None:
        console.print(verdict_table(recipe.expect.source, verdicts))
    console.print(f"artifacts: {run_dir}  (report: {run_dir / 'report.md'})")
    return outcomes


def _same_on_every_rank(ranks: Ranks, stage: str, model) -> list[str]:
    """Each rank's state digest after training (buffers taken from rank 0, as DDP does); replicas
    whose weights or masks drifted apart fail the stage."""
    buffers_from_zero(ranks, model)
    digests = ranks.gather(state_digest(model))
    if len(set(digests)) > 1:
        raise StageError(stage, f"the ranks ended training with different models (state digests {digests})",
                         "a callback or mask update that depends on the rank breaks data-parallel training")
    return digests
