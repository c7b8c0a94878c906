"""build_trainer: the one place a pl.Trainer is made, from the recipe's trainer settings."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, RichProgressBar
from pytorch_lightning.loggers import CSVLogger

# Lightning warns that in-memory batches have no workers; that is the point of them. The other
# notices are about Lightning itself, not the user's run.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
for _name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda",
              "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def build_trainer(settings, stage_dir: Path, *, callbacks: list | None = None, **fit_options) -> pl.Trainer:
    """`settings` is the recipe's TrainerSpec; `fit_options` are per-stage (max_epochs, clipping, ...)."""
    callbacks = list(callbacks or [])
    callbacks.append(LearningRateMonitor(logging_interval="step", log_momentum=True))
    show_progress = settings.progress_bar and sys.stdout.isatty()
    if show_progress:
        callbacks.append(RichProgressBar())
    return pl.Trainer(
        accelerator=settings.accelerator,
        devices=settings.devices,
        strategy=settings.strategy,
        num_nodes=settings.num_nodes,
        precision=settings.precision,
        deterministic=settings.deterministic,
        logger=CSVLogger(stage_dir, name="logs", version=""),
        callbacks=callbacks,
        log_every_n_steps=settings.log_every_n_steps,
        enable_checkpointing=False,
        enable_progress_bar=show_progress,
        enable_model_summary=False,
        default_root_dir=stage_dir,
        **fit_options,
    )
