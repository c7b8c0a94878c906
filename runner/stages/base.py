"""The one interface every stage implements: `run(spec, model, ctx) -> StageResult`."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import pytorch_lightning as pl
from torch import nn


@dataclass
class StageContext:
    """What a stage may use besides its spec and the model; nothing reaches into other stages."""

    recipe: Any  # the validated Recipe
    index: int  # position in the recipe, 0-based
    stage_dir: Path  # this stage's output folder; the stage may write extra files here
    data: Callable[[], Any]  # the shared InMemoryData, built on first use
    trainer: Callable[..., pl.Trainer]  # build_trainer bound to the recipe's trainer settings
    seed: int  # this stage's seed (already applied with seed_everything)
    upstream: dict[str, "StageResult"] = field(default_factory=dict)  # earlier results by stage name

    def part(self, name: str) -> "StageContext":
        """The context of one fit of a stage that trains several times: its own folder for logs and resume
        checkpoints, so one round can never resume from another's checkpoint."""
        folder = self.stage_dir / name
        bound = self.trainer  # functools.partial(build_trainer, settings, stage_dir)
        assert isinstance(bound, functools.partial) and bound.args[-1] == self.stage_dir
        trainer = functools.partial(bound.func, *bound.args[:-1], folder, **bound.keywords)
        return dataclasses.replace(self, stage_dir=folder, trainer=trainer)


@dataclass
class StageResult:
    model: nn.Module
    metrics: dict[str, Any] = field(default_factory=dict)


class StageFn(Protocol):
    def __call__(self, spec: Any, model: nn.Module, ctx: StageContext) -> StageResult: ...
