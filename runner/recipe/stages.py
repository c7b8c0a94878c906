"""Stage specs: one class per `kind`, joined into a discriminated union."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from runner.recipe.base import PositiveFloat, PositiveInt, Slug, Spec
from runner.recipe.training import (
    BatchSizeFinder,
    Constant,
    CrossEntropy,
    EarlyStopping,
    Loss,
    LRFinder,
    Optimizer,
    Regularization,
    Schedule,
    Warmup,
)


class TrainStage(Spec):
    """Train the model with Lightning: optimizer, schedule, loss, regularization."""

    name: Slug
    kind: Literal["train"]
    epochs: PositiveInt | None = None
    steps: PositiveInt | None = None
    optimizer: Optimizer
    schedule: Schedule = Constant(name="constant")
    warmup: Warmup | None = None
    loss: Loss = CrossEntropy(name="cross_entropy")
    regularization: list[Regularization] = []
    gradient_clip: PositiveFloat | None = None
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"
    early_stopping: EarlyStopping | None = None
    lr_finder: LRFinder | None = None
    batch_size_finder: BatchSizeFinder | None = None
    val_every_epochs: PositiveInt = 1

    @model_validator(mode="after")
    def _duration(self):
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of `epochs` or `steps`")
        if self.warmup is not None and self.schedule.name in ("onecycle", "reduce_on_plateau"):
            raise ValueError(f"`warmup` cannot be combined with the `{self.schedule.name}` schedule"
                             + (" (1cycle has its own warmup: pct_start)" if self.schedule.name == "onecycle" else ""))
        return self


class EvaluateStage(Spec):
    """Measure the model: test loss/accuracy, parameter counts, sparsity, size, latency."""

    name: Slug
    kind: Literal["evaluate"]
    split: Literal["test", "val"] = "test"
    latency_batch_sizes: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 256]
    latency_repeats: Annotated[int, Field(ge=3)] = 30
    latency_warmup: Annotated[int, Field(ge=0)] = 5
    threads: PositiveInt | None = None  # torch threads during timing; default: as the process has


Stage = Annotated[Union[TrainStage, EvaluateStage], Field(discriminator="kind")]
STAGE_KINDS = ["train", "evaluate"]
