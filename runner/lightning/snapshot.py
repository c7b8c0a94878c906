"""WeightSnapshot: keep a copy of the weights at one point of training (a lottery-ticket rewind point)."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from typing_extensions import override

from runner.lightning.units import stage_length, to_steps
from runner.measure import named_weights


class WeightSnapshot(Callback):
    """Copies the weights, as the forward pass sees them, just before optimizer step `at` (a Moment)."""

    def __init__(self, at):
        self.at = at
        self.step: int | None = None
        self.weights: dict | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.step = to_steps(self.at, *stage_length(trainer))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.weights is None and trainer.global_step == self.step:
            self.weights = {name: w.clone() for name, w in named_weights(pl_module.model).items()}

    @override
    def state_dict(self) -> dict:
        # The step too: a resumed fit that had already finished never reaches on_train_start to resolve it.
        return {"weights": self.weights, "step": self.step}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.weights = state_dict["weights"]
        self.step = state_dict.get("step")
