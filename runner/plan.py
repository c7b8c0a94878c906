"""The plan: each stage with its folder, its fingerprint, and whether a finished artifact can be reused."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from runner import __version__
from runner.artifacts import is_done, stage_dir


@dataclass(frozen=True)
class PlannedStage:
    index: int
    spec: object  # the stage's validated spec
    folder: Path
    fingerprint: str
    reuse: bool
    reason: str


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_plan(recipe, run_dir: Path) -> list[PlannedStage]:
    """Fingerprint = hash(stage config, upstream fingerprint, run-wide settings, nnopt version).

    A stage is reused only when its DONE marker holds the same fingerprint and every stage
    before it is reused too; editing stage k reruns k and everything after it.
    """
    shared = recipe.model_dump(mode="json", by_alias=True, include={"seed", "model", "data", "trainer"})
    plan: list[PlannedStage] = []
    upstream = _digest({"run": shared, "version": __version__})
    all_reused = True
    for index, spec in enumerate(recipe.stages):
        fingerprint = _digest({"stage": spec.model_dump(mode="json"), "index": index, "upstream": upstream})
        folder = stage_dir(run_dir, index, spec.name)
        done = is_done(folder, fingerprint)
        reuse = all_reused and done
        if reuse:
            reason = "finished artifact matches"
        elif not all_reused:
            reason = "an earlier stage runs"
        elif folder.exists():
            reason = "config changed" if (folder / "DONE").exists() else "unfinished artifact"
        else:
            reason = "new"
        plan.append(PlannedStage(index, spec, folder, fingerprint, reuse, reason))
        all_reused = reuse
        upstream = fingerprint
    return plan
