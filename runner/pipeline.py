"""Run a validated recipe: plan it, execute each planned stage in order, and commit each finished stage."""

from __future__ import annotations

import datetime as dt
import functools
import time
from contextlib import ExitStack
from pathlib import Path

import pytorch_lightning as pl
import torch
from rich.console import Console
from torch import nn

from runner import artifacts, modelio
from runner.data.build import build_data
from runner.distributed import Ranks, buffers_from_zero, launch, model_from_zero, run_on_zero, state_digest
from runner.errors import StageError
from runner.files import read_json, write_json
from runner.lightning.trainer import build_trainer
from runner.lock import run_lock
from runner.outcome import StageOutcome
from runner.plan import PlannedStage, make_plan
from runner.provenance import INPUTS
from runner.report import summary_table, write_reports
from runner.stages import STAGES, StageContext, StageResult
from runner.store import Store, keep_setting, origin, store_of
from runner.verdicts import verdict_table


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def print_plan(plan: list[PlannedStage], console: Console) -> None:
    style = {"run": "bold", "reuse": "cyan", "skip": "dim"}
    console.print("plan:")
    for step in plan:
        console.print(f"  [{style[step.action]}]{step.action:<5}[/] {step.spec.name} ({step.spec.kind}): {step.reason}",
                      soft_wrap=True)


def run_recipe(recipe, output_root: Path, console: Console, *, force: bool = False, start: str | None = None,
               only: str | None = None, run_dir: Path | None = None, store: Store | None = None) -> list[StageOutcome]:
    """Plan, execute and report one run; returns one outcome per stage.

    The run folder is `output_root/<recipe name>` unless `run_dir` says otherwise (seeds, sweep points);
    its stage artifacts live in `store` (default: the run folder's own `.store`), which the seeds and
    sweep points of a recipe share. After the run, the store is pruned to its bound (runner.store).

    Under a multi-process strategy every rank runs this: training stages on every rank, any
    other stage on global rank 0 (its model is then sent to the others); only rank 0 takes the
    run folder's lock, plans (the others follow its plan, whatever their view of the disk) and writes.
    """
    run_dir = Path(run_dir) if run_dir is not None else Path(output_root) / recipe.name
    store = store if store is not None else store_of(run_dir)
    keep = keep_setting()  # a bad $NNOPT_STORE_KEEP stops the run before it starts, not after
    ranks = launch(recipe.trainer)
    if not ranks.is_zero:
        console = Console(quiet=True)
    with ExitStack() as held:
        # A recipe's `trainer.threads` holds for its run only: a later run in this process (import nnopt) computes,
        # and is fingerprinted, with the process's own count.
        held.callback(torch.set_num_threads, torch.get_num_threads())

        def lock_and_plan():
            artifacts.refuse_link(run_dir)
            held.enter_context(run_lock(run_dir))
            held.enter_context(store.in_use())
            return make_plan(recipe, run_dir, store, force=force, start=start, only=only)

        plan = ranks.from_zero(run_on_zero(ranks, "plan", lock_and_plan))
        print_plan(plan, console)
        started = _now()
        outcomes = execute(recipe, plan, console, ranks, store)
        verdicts = write_reports(run_dir, recipe, outcomes, started, _now()) if ranks.is_zero else []
    if ranks.is_zero:
        store.prune(keep)  # skipped (None) while another run uses the store
    console.print(summary_table(recipe.name, outcomes))
    if recipe.expect is not None:
        console.print(verdict_table(recipe.expect.source, verdicts))
    console.print(f"artifacts: {run_dir}  (report: {run_dir / 'report.md'})")
    return outcomes


class _Models:
    """The model handed from stage to stage, and the finished models of earlier stages by name.

    A stage that is reused or skipped leaves its model on disk; it is loaded only when a later
    stage runs (or asks for it by name), so a fully reused run loads nothing.
    """

    def __init__(self, recipe, ranks: Ranks, data, console: Console):
        self.recipe, self.ranks, self.data, self.console = recipe, ranks, data, console
        self.current: nn.Module | None = None  # the recipe's model, built (with its weights) when the first stage runs
        self.pending: Path | None = None  # the folder the next running stage loads its model from
        self.finished: dict[str, Path] = {}  # stage name -> folder of its committed artifact

    def passed_over(self, step: PlannedStage) -> None:
        self.pending = step.folder
        if step.action == "reuse":
            self.finished[step.spec.name] = step.folder

    def for_stage(self, name: str) -> nn.Module:
        if self.pending is not None:
            loaded = _load_finished(self.pending, name) if self.ranks.is_zero else None
            self.current, self.pending = model_from_zero(self.ranks, self.recipe.model, loaded), None
        elif self.current is None:
            self.current, loaded_weights = modelio.initial_model(self.recipe.model, self.data)
            if loaded_weights:
                self.console.print(loaded_weights)
        return self.current

    def load(self, asking: str, name: str) -> nn.Module:
        """An earlier stage's finished model, fresh from its artifact (a later stage cannot change it)."""
        return _load_finished(self.artifact(asking, name), asking)

    def artifact(self, asking: str, name: str) -> Path:
        """The folder of an earlier stage's finished artifact."""
        if name not in self.finished:
            raise StageError(asking, f"stage `{name}` has no finished artifact to read here",
                             "name a stage that comes before this one and is not skipped")
        return self.finished[name]


def _load_finished(folder: Path, stage: str) -> nn.Module:
    try:
        return modelio.load_model(folder)
    except Exception as error:  # tampered with or damaged after it was finished: never trusted, never unpickled
        raise StageError(stage, f"the finished artifact it starts from, {folder}, does not load: {error}",
                         f"rerun with --from {folder.name.split('-', 1)[1]} to rebuild it") from None


def execute(recipe, plan: list[PlannedStage], console: Console, ranks: Ranks, store: Store) -> list[StageOutcome]:
    """Run the planned stages in order, each built apart in the store and committed once complete; a reused
    stage's numbered folder is pointed at its finished artifact; reused and skipped ones are reported."""
    if recipe.trainer.threads is not None:
        torch.set_num_threads(recipe.trainer.threads)
    data = functools.cache(lambda: build_data(recipe.data, recipe.seed))
    pl.seed_everything(recipe.seed, verbose=False)
    models = _Models(recipe, ranks, data, console)
    outcomes: list[StageOutcome] = []
    for step in plan:
        spec = step.spec
        if step.action != "run":
            if ranks.is_zero and step.reuse and store.shown(step.folder) != step.artifact:
                store.show(step.folder, step.artifact)  # a config run before (A -> B -> A), or by another seed or point
            models.passed_over(step)
            finished = ranks.is_zero and (step.action == "reuse" or artifacts.is_done(step.folder, step.fingerprint))
            outcomes.append(StageOutcome(spec.name, spec.kind, "reused" if step.action == "reuse" else "skipped",
                                         str(step.folder), step.fingerprint,
                                         metrics=read_json(step.folder / artifacts.METRICS) if finished else {},
                                         origin=origin(step.artifact) if ranks.is_zero and step.reuse else None))
            continue
        model = models.for_stage(spec.name)
        console.print(f"[bold]run[/] {spec.name} ({spec.kind})")
        with ExitStack() as building:
            if ranks.is_zero:
                building.enter_context(store.build(step.fingerprint, spec.model_dump(mode="json"), resume=step.resume))
            seed = recipe.seed + step.index
            pl.seed_everything(seed, verbose=False)
            settings = recipe.trainer if spec.runs_on_every_rank else recipe.trainer.one_process()
            ctx = StageContext(name=spec.name, folder=store.building(step.fingerprint), seed=seed, data=data,
                               trainer=functools.partial(build_trainer, settings), model_spec=recipe.model,
                               load=functools.partial(models.load, spec.name),
                               artifact=functools.partial(models.artifact, spec.name))
            start = time.perf_counter()
            result = run_stage(spec, model, ctx, ranks, recipe.model)
            seconds = time.perf_counter() - start
            if ranks.is_zero:
                commit_stage(step, ctx.folder, result, recipe.model, store)
        models.current = result.model
        models.finished[spec.name] = step.folder
        outcomes.append(StageOutcome(spec.name, spec.kind, "ran", str(step.folder), step.fingerprint,
                                     round(seconds, 3), result.metrics))
    return outcomes


def run_stage(spec, model: nn.Module, ctx: StageContext, ranks: Ranks, model_spec) -> StageResult:
    """A training stage runs on every rank (and the ranks must agree on the result); any other runs on rank 0
    and its model is sent to the others."""
    run = STAGES.get(spec.kind)
    if spec.runs_on_every_rank:
        ranks.from_zero(None)  # a barrier: every rank sees the folder (and any checkpoint to resume) after reset
        result = run(spec, model, ctx)
        if ranks.world_size > 1:
            result.metrics["rank_digests"] = _same_on_every_rank(ranks, spec.name, result.model)
        return result
    result = run_on_zero(ranks, spec.name, lambda: run(spec, model, ctx))
    return StageResult(model_from_zero(ranks, model_spec, result and result.model),
                       ranks.from_zero(result and result.metrics))


def commit_stage(step: PlannedStage, folder: Path, result: StageResult, model_spec, store: Store) -> None:
    """Write the finished stage's artifact into the folder it was built in (its resolved config is there
    since the build began), then commit it: DONE last, into the store, and the numbered folder switched to it."""
    modelio.save_model(result.model, folder, model_spec)
    write_json(folder / artifacts.METRICS, result.metrics)
    write_json(folder / INPUTS, step.inputs)  # what a later plan compares to say why a stage reruns
    store.commit(step.fingerprint, step.folder)


def _same_on_every_rank(ranks: Ranks, stage: str, model) -> list[str]:
    """Each rank's state digest after training (buffers taken from rank 0, as DDP does); replicas
    whose weights or masks drifted apart fail the stage."""
    buffers_from_zero(ranks, model)
    digests = ranks.gather(state_digest(model))
    if len(set(digests)) > 1:
        raise StageError(stage, f"the ranks ended training with different models (state digests {digests})",
                         "a callback or mask update that depends on the rank breaks data-parallel training")
    return digests
