"""Stage-relative moments (epochs, steps or fractions of the stage) resolved to optimizer steps."""

from __future__ import annotations

import math

import pytorch_lightning as pl


def stage_length(trainer: pl.Trainer) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps in the stage), known once the data is attached."""
    batches = len(trainer.datamodule.train_dataloader())
    steps_per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
    return steps_per_epoch, int(trainer.estimated_stepping_batches)


def to_steps(moment, steps_per_epoch: int, total_steps: int) -> int:
    """`moment` has `steps`, `epochs` or `fraction` (of the stage) set; fractional epochs round to a step."""
    if moment.steps is not None:
        return moment.steps
    if moment.epochs is not None:
        return round(moment.epochs * steps_per_epoch)
    return round(moment.fraction * total_steps)
