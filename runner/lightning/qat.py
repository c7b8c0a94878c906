"""FreezeQuantization: fix QAT's activation ranges, then BatchNorm statistics, at chosen points of the fit."""

from __future__ import annotations

import pytorch_lightning as pl

from runner.compress import int8
from runner.lightning.units import stage_length, to_steps


class FreezeQuantization(pl.Callback):
    """Fixes the activation ranges, then the BatchNorm statistics, at the configured steps (Jacob et al. 2018 §3).

    Validation never moves the ranges: torch's observers run in eval mode too, so they are paused
    while Lightning validates.
    """

    def __init__(self, observers_after, batchnorm_after):
        self.observers_after, self.batchnorm_after = observers_after, batchnorm_after  # Point specs or None
        self.observers_at: int | None = None  # optimizer steps, resolved once the data is attached
        self.batchnorm_at: int | None = None
        self.observers_frozen_at: int | None = None
        self.batchnorm_frozen_at: int | None = None

    def setup(self, trainer, pl_module, stage):
        steps_per_epoch, total = stage_length(trainer)
        self.observers_at, self.batchnorm_at = (None if point is None else to_steps(point, steps_per_epoch, total)
                                                for point in (self.observers_after, self.batchnorm_after))

    def on_train_start(self, trainer, pl_module):
        # Resuming from a checkpoint: `freeze_bn` is a plain attribute, not in the state dict, so what the
        # restored state says was frozen must be frozen again before training goes on.
        if self.observers_frozen_at is not None:
            int8.freeze_observers(pl_module.model)
        if self.batchnorm_frozen_at is not None:
            int8.freeze_batchnorm(pl_module.model)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if self.observers_frozen_at is None and self.observers_at is not None and step >= self.observers_at:
            int8.freeze_observers(pl_module.model)
            self.observers_frozen_at = step
        if self.batchnorm_frozen_at is None and self.batchnorm_at is not None and step >= self.batchnorm_at:
            int8.freeze_batchnorm(pl_module.model)
            self.batchnorm_frozen_at = step

    def on_validation_epoch_start(self, trainer, pl_module):
        int8.freeze_observers(pl_module.model)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.observers_frozen_at is None:
            int8.resume_observers(pl_module.model)

    def state_dict(self):
        return {"observers_frozen_at": self.observers_frozen_at, "batchnorm_frozen_at": self.batchnorm_frozen_at}

    def load_state_dict(self, state_dict):
        self.observers_frozen_at = state_dict["observers_frozen_at"]
        self.batchnorm_frozen_at = state_dict["batchnorm_frozen_at"]
