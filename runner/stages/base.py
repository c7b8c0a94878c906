"""The one interface every stage implements: `run(spec, model, ctx) -> StageResult`, and the narrow context it gets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import pytorch_lightning as pl
from torch import nn


@dataclass(frozen=True)
class StageContext:
    """What a stage may use besides its spec and the model: nothing of the recipe or of other stages
    except the model description and the finished models of earlier stages, by name."""

    name: str  # the stage's name in the recipe (a retrain round keeps its stage's name)
    folder: Path  # this stage's output folder; the stage may write extra files here
    seed: int  # this stage's seed (already applied with seed_everything)
    data: Callable[[], Any]  # the run's data module (the data contract of runner.data), built on first use
    trainer: Callable[..., pl.Trainer]  # (folder, callbacks=..., override=..., **fit options) -> Trainer
    model_spec: Any  # the recipe's ModelSpec: what rebuilds this architecture from scratch
    load: Callable[[str], nn.Module]  # the finished model of an earlier stage, by stage name
    artifact: Callable[[str], Path]  # the folder of an earlier stage's finished artifact (its extra files), by name

    def build_trainer(self, **options) -> pl.Trainer:
        """A Trainer writing its logs and resume checkpoints into this context's folder; experiment loggers
        (MLflow, W&B) name the run after the stage."""
        return self.trainer(self.folder, run_name=self.name, **options)

    def part(self, name: str) -> "StageContext":
        """The context of one fit of a stage that trains several times: its own folder for logs and resume
        checkpoints, so one round can never resume from another's checkpoint."""
        return dataclasses.replace(self, folder=self.folder / name)


@dataclass
class StageResult:
    model: nn.Module
    metrics: dict[str, Any] = field(default_factory=dict)


class StageFn(Protocol):
    def __call__(self, spec: Any, model: nn.Module, ctx: StageContext) -> StageResult: ...
