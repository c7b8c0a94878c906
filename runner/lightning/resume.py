"""Exact resume inside a training stage: periodic checkpoints of the whole training state, and their reuse."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint

from runner.artifacts import CHECKPOINT_POSITION, CHECKPOINTS, LAST_CHECKPOINT
from runner.files import write_json
from runner.lightning.internals import restore_loader_position
from runner.transforms import replay, transforms_of

EXTRA = "nnopt"  # our key in the checkpoint dict


def _rng_states() -> dict:
    """Every global generator a training step may draw from (dropout, random pruning, augmentation).

    numpy's state is stored as a tensor so the checkpoint loads with torch.load(weights_only=True)."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _inner_model(pl_module: pl.LightningModule) -> torch.nn.Module:
    return getattr(pl_module, "model", pl_module)


class ResumePoints(Checkpoint):
    """Writes `<stage>/checkpoint/last.ckpt` every `every_n_steps` optimizer steps, at the end of every
    `every_n_epochs` epochs, and when the fit ends.

    Lightning's checkpoint already holds the model, optimizers, schedulers, loop progress,
    callbacks' state dicts and the data loader's position; this adds what it leaves out: the
    global RNG states, the transforms recorded on the model (pruning masks, quantized modules),
    which must exist before the weights load, and the last logged metrics. Lightning writes the
    file atomically (temp file, then rename).
    """

    def __init__(self, stage_dir: Path, every_n_steps: int | None, every_n_epochs: int | None):
        self.path = Path(stage_dir) / CHECKPOINTS / LAST_CHECKPOINT
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self._last_step_saved = -1
        self._restored_metrics: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # global_step stays put during gradient accumulation: save once per optimizer step.
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step_saved:
            self._save(trainer)
            self._last_step_saved = step

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        # The finished fit, too: a stage interrupted after it (converting, pruning the next round,
        # writing artifacts) restores this and goes on without training again.
        if not trainer.interrupted:
            self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # False: the full training state
        if trainer.is_global_zero:
            write_json(self.path.with_name(CHECKPOINT_POSITION), {"step": trainer.global_step, "epoch": trainer.current_epoch})

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[EXTRA] = {"rng": _rng_states(), "transforms": transforms_of(_inner_model(pl_module)),
                             # the last logged values (val_loss of the last validation, ...), as the stage reports them
                             "metrics": {k: v.detach().cpu() for k, v in trainer.callback_metrics.items()}}

    def on_train_start(self, trainer, pl_module) -> None:
        restore_loader_position(trainer)  # before the first batch is drawn

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Called after the weights load and before training continues: the next draw is the one
        # the interrupted run would have made.
        _set_rng_states(checkpoint[EXTRA]["rng"])
        self._restored_metrics = checkpoint[EXTRA]["metrics"]

    def on_fit_end(self, trainer, pl_module) -> None:
        # Lightning clears the logged values when fit starts; what was last logged before the
        # checkpoint (and not logged again since) is still what the stage reports.
        for key, value in self._restored_metrics.items():
            trainer.callback_metrics.setdefault(key, value)


def _discard(path: Path, why: str) -> None:
    print(f"warning: not resuming from {path}: {why}; the stage starts from its beginning", file=sys.stderr)
    path.unlink(missing_ok=True)  # every rank may get here
    return None


def prepare_resume(stage_dir: Path, pl_module: pl.LightningModule) -> Path | None:
    """The checkpoint to resume from, with the model made ready to take its weights; None to start afresh.

    `reset` kept the checkpoint only if it belongs to this exact stage config. A file that does
    not load (it cannot be half-written, but a disk can fail) is dropped, never trusted.
    """
    path = Path(stage_dir) / CHECKPOINTS / LAST_CHECKPOINT
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = checkpoint[EXTRA]["transforms"]
    except Exception as error:  # unreadable or foreign: restart the stage rather than trust it
        return _discard(path, f"it does not load as plain tensors ({type(error).__name__})")
    present = transforms_of(_inner_model(pl_module))
    if saved[:len(present)] != present:
        return _discard(path, "it was made from a differently restructured model")
    # Transforms a callback applied during training (gradual pruning adds masks) must exist before
    # the strict state-dict load; replaying them keeps parameter identities for the optimizer.
    model = replay(_inner_model(pl_module), saved[len(present):])
    if hasattr(pl_module, "model"):
        pl_module.model = model
    return path
