"""KeepBest: remember the weights of the best validated epoch, so a training stage can hand those on instead of the last."""

from __future__ import annotations

import pytorch_lightning as pl
import torch


class KeepBest(pl.Callback):
    """After each validation, keep a CPU copy of the model's state (masks included) when `monitor` improved.

    Its state (the best score, epoch and weights) is saved in every resume checkpoint, so an interrupted
    stage resumed from a checkpoint keeps the same best epoch as one never interrupted.
    """

    def __init__(self, monitor: str, mode: str):
        self.monitor, self.mode = monitor, mode
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def _improved(self, score: float) -> bool:
        if self.best_score is None:
            return True
        return score < self.best_score if self.mode == "min" else score > self.best_score

    def on_validation_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[self.monitor])
        if self._improved(score):
            self.best_score, self.best_epoch = score, trainer.current_epoch + 1  # epochs counted from 1, as `epochs`
            self.best_state = {name: tensor.detach().to("cpu", copy=True)
                               for name, tensor in pl_module.model.state_dict().items()}

    def restore(self, model: torch.nn.Module) -> dict:
        """Load the best weights into `model` (the fitted model) and return what was kept, for the metrics."""
        if self.best_state is None:
            raise RuntimeError(f"no validation reported {self.monitor}, so no best epoch exists")
        model.load_state_dict(self.best_state)
        return {"epoch": self.best_epoch, self.monitor: self.best_score}

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_state": self.best_state}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score, self.best_epoch = state_dict["best_score"], state_dict["best_epoch"]
        self.best_state = state_dict["best_state"]
