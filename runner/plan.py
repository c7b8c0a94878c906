"""The plan: each stage with its folder, its fingerprint, and whether it runs, is reused or is skipped."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from runner import __version__
from runner.artifacts import DONE, checkpoint_position, resume_points, stage_dir
from runner.errors import Issue, RecipeError
from runner.files import read_json
from runner.provenance import INPUTS, changes, run_inputs, spec_inputs
from runner.recipe.locate import dotted
from runner.recipe.semantics import teacher_models
from runner.registry import did_you_mean
from runner.store import Store

Action = Literal["run", "reuse", "skip"]


@dataclass(frozen=True)
class PlannedStage:
    index: int
    spec: object  # the stage's validated spec
    folder: Path  # the numbered stage folder: shows the stage's current artifact in the store
    fingerprint: str
    action: Action
    reason: str
    resume: bool = True  # False when a flag asked for this stage: it starts afresh, its checkpoints dropped
    artifact: Path | None = None  # the store's finished artifact of this config, if any
    inputs: dict = field(default_factory=dict)  # digests of the weights and code the run reads (runner.provenance)

    @property
    def reuse(self) -> bool:
        return self.action == "reuse"


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _flag_error(flag: str, message: str, hint: str | None = None) -> RecipeError:
    return RecipeError([Issue("command line", None, None, flag, message, hint)])


def _stage_index(names: list[str], flag: str, name: str) -> int:
    if name in names:
        return names.index(name)
    raise _flag_error(flag, f"no stage named `{name}`; the recipe's stages are: {', '.join(names)}",
                      did_you_mean(name, names))


def compute_threads(recipe) -> int:
    """The torch intra-op threads the run computes with: `trainer.threads`, or the process's count (torch's default:
    OMP_NUM_THREADS or the cores). torch's CPU kernels split matmuls and reductions by thread, so another count
    changes the results' last bits (one SGD step of an MLP at batch 32 already differs), and training amplifies them."""
    return recipe.trainer.threads or torch.get_num_threads()


def fingerprints(recipe, inputs: dict | None = None) -> list[str]:
    """Fingerprint of stage k = hash(its config, its position, stage k-1's fingerprint, run-wide settings with the
    thread count the run computes with, the content of the weights and user code the run reads, nnopt version).
    Checkpoint intervals are left out: with exact resume they cannot change a result; so is the weights' path (moving
    a project reruns nothing) and are the data loader settings (each example's augmentation is seeded by the example,
    not the worker)."""
    shared = recipe.model_dump(mode="json", by_alias=True, include={"seed", "model", "data", "trainer"},
                               exclude={"trainer": {"checkpoint", "loggers"}, "data": {"loader"}})
    shared["model"].pop("weights", None)
    shared["trainer"]["threads"] = compute_threads(recipe)
    inputs = run_inputs(recipe) if inputs is None else inputs
    upstream = _digest({"run": shared, "inputs": inputs, "version": __version__})
    result = []
    teachers: dict[int, dict] = {}  # a teacher given as a model: the content of its weights and code, as model's
    for path, teacher in teacher_models(recipe):
        teachers.setdefault(path[1], {})[dotted(path)] = spec_inputs(teacher)
    for index, spec in enumerate(recipe.stages):
        stage = {"stage": spec.model_dump(mode="json"), "index": index, "upstream": upstream}
        if index in teachers:
            stage["teachers"] = teachers[index]
        upstream = _digest(stage)
        result.append(upstream)
    return result


def _what_changed(folder: Path, inputs: dict) -> str:
    """Why a stage whose numbered folder shows an older finished artifact reruns: the weights or code it read
    (as that artifact recorded them), else its config."""
    try:
        return ", ".join(changes(read_json(folder / INPUTS), inputs)) or "config changed"
    except (OSError, ValueError):  # an artifact from before inputs were recorded
        return "config changed"


def _why_not_reused(folder: Path, building: Path, fingerprint: str, inputs: dict) -> str:
    points = resume_points(building, fingerprint)
    if points:
        where = []
        for point in points:
            position = checkpoint_position(point)
            part = "" if point.parent.parent == building else f"{point.parent.parent.name} "
            where.append(f"{part}step {position['step']} (epoch {position['epoch']})" if position else part.strip())
        return "unfinished: resumes from its last checkpoint" + (f" at {', '.join(w for w in where if w)}" if any(where) else "")
    if (folder / DONE).is_file():
        return _what_changed(folder, inputs)
    if not folder.exists() and not building.exists():
        return "new"
    return "unfinished artifact: redone"


def _reused(folder: Path, artifact: Path, store: Store, brought_from: str | None = None) -> str:
    if brought_from is not None:
        return f"finished in {brought_from}"
    return "finished artifact matches" + ("" if store.shown(folder) == artifact else " (kept in the store)")


def make_plan(recipe, run_dir: Path, store: Store, *, force: bool = False, start: str | None = None,
              only: str | None = None) -> list[PlannedStage]:
    """Reuse every leading stage whose config (fingerprint) has a finished artifact in the store, or in a sibling
    recipe's store under the same output folder (brought into this one: Store.bring); run the rest.

    Editing stage k changes the fingerprints of k and everything after it (each includes its
    upstream's), so k and later rerun and nothing before does. `force` reruns everything,
    `start` reruns that stage and the later ones, `only` runs one stage from its upstream's
    finished artifact and skips the later ones; a stage a flag asked for starts afresh, never
    from an interrupted run's checkpoint.
    """
    names = [spec.name for spec in recipe.stages]
    if start is not None and only is not None:
        raise _flag_error("--only", "give at most one of `--from` and `--only`")
    first_forced = _stage_index(names, "--from", start) if start is not None else None
    only_index = _stage_index(names, "--only", only) if only is not None else None
    inputs = run_inputs(recipe)
    prints = fingerprints(recipe, inputs)
    folders = [stage_dir(run_dir, index, name) for index, name in enumerate(names)]
    for folder in folders:
        store.prepare(folder)
    finished = [store.finished(fp) for fp in prints]
    brought_from: dict[int, str] = {}  # stage index -> the sibling recipe (and run) its artifact was brought from
    looked: set[int] = set()

    def done(index: int) -> bool:
        """Whether the stage has a finished artifact here, bringing one from a sibling recipe's store if need be
        (asked only of stages that would be reused: a stage that runs anyway is never brought)."""
        if finished[index] is None and index not in looked:
            looked.add(index)
            brought = store.bring(prints[index])
            if brought is not None:
                finished[index] = brought[0]
                if brought[1] is not None:
                    brought_from[index] = brought[1]
        return finished[index] is not None

    if only_index is not None and only_index > 0 and not done(only_index - 1):
        upstream = names[only_index - 1]
        raise _flag_error("--only", f"stage `{only}` needs the finished artifact of `{upstream}`, and there is none "
                          f"matching the recipe in {folders[only_index - 1]}",
                          f"run `--from {upstream}` (or without flags) to build it first")

    plan: list[PlannedStage] = []
    all_reused = True
    for index, spec in enumerate(recipe.stages):
        if only_index is not None:
            if index == only_index:
                action, reason = "run", "--only"
            else:
                action = "reuse" if index < only_index and done(index) else "skip"
                reason = (_reused(folders[index], finished[index], store, brought_from.get(index)) if action == "reuse"
                          else f"--only {only}")
        elif force:
            action, reason = "run", "--force"
        elif first_forced is not None and index >= first_forced:
            action, reason = "run", f"--from {start}"
        elif all_reused and done(index):
            action, reason = "reuse", _reused(folders[index], finished[index], store, brought_from.get(index))
        else:
            action = "run"
            reason = ("an earlier stage runs" if not all_reused
                      else _why_not_reused(folders[index], store.building(prints[index]), prints[index], inputs))
        all_reused = all_reused and action == "reuse"
        flagged = reason.startswith("--")
        plan.append(PlannedStage(index, spec, folders[index], prints[index], action, reason, resume=not flagged,
                                 artifact=finished[index], inputs=inputs))
    return plan
