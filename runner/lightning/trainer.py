"""build_trainer: the one place a pl.Trainer is made, from the recipe's trainer settings."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import LearningRateMonitor, RichProgressBar
from pytorch_lightning.loggers import CSVLogger
from torch import nn

from runner.lightning.module import CompiledForward
from runner.lightning.resume import ResumePoints

# Lightning warns that in-memory batches have no workers; that is the point of them. The other
# notices are about Lightning itself, not the user's run.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*is deprecated.*")
for _name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda",
              "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class _TunerCheckpointNotice(logging.Filter):
    """Lightning's LR and batch-size finders save a temporary checkpoint of their own without `weights_only`
    and say it defaulted to False. Nobody loads that file but the finder itself, in this process, and every
    checkpoint nnopt writes or reads states weights_only (lightning/resume.py, fit.py), so the notice only misleads."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`weights_only` was not set" not in record.getMessage()


for _name in ("pytorch_lightning.trainer.connectors.checkpoint_connector",
              "lightning.pytorch.trainer.connectors.checkpoint_connector"):
    logging.getLogger(_name).addFilter(_TunerCheckpointNotice())


def _strategy(settings):
    """The strategy as Lightning takes it: a name, or a configured FSDP/DeepSpeed strategy."""
    if settings.strategy == "fsdp":
        from pytorch_lightning.strategies import FSDPStrategy

        from runner.recipe.schema import FSDPOptions

        options = settings.fsdp or FSDPOptions()
        return FSDPStrategy(sharding_strategy=options.sharding_strategy, cpu_offload=options.cpu_offload)
    if settings.strategy == "deepspeed":
        from pytorch_lightning.strategies import DeepSpeedStrategy

        from runner.recipe.schema import DeepSpeedOptions

        options = settings.deepspeed or DeepSpeedOptions()
        return DeepSpeedStrategy(stage=options.stage, offload_optimizer=options.offload_optimizer)
    return settings.strategy


def _loggers(names: list[str], stage_dir: Path, run_name: str) -> list:
    """The stage's experiment loggers, all writing under `stage_dir/logs/` without any network: the CSV log
    (always: the report's curves read it) and those the recipe names."""
    logs = Path(stage_dir) / "logs"
    loggers = [CSVLogger(stage_dir, name="logs", version="")]
    if "tensorboard" in names:
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(logs, name="tensorboard", version="", default_hp_metric=False))
    if "mlflow" in names:
        from pytorch_lightning.loggers import MLFlowLogger

        loggers.append(MLFlowLogger(experiment_name=run_name, tracking_uri=(logs / "mlruns").as_uri()))
    if "wandb" in names:
        from pytorch_lightning.loggers import WandbLogger

        (logs / "wandb").mkdir(parents=True, exist_ok=True)
        loggers.append(WandbLogger(save_dir=logs / "wandb", offline=True, project="nnopt", name=run_name))
    return loggers


def build_trainer(settings, stage_dir: Path, *, callbacks: list | None = None, override=None, run_name: str = "stage",
                  **fit_options) -> pl.Trainer:
    """`settings` is the run's TrainerSpec, `override` the training block's own `trainer:`;
    `fit_options` are per-stage (max_epochs, clipping, ...)."""
    settings = settings.with_override(override)
    callbacks = list(callbacks or []) + [spec.build() for spec in settings.callbacks]
    callbacks.append(LearningRateMonitor(logging_interval="step", log_momentum=True))
    if settings.compile:
        callbacks.append(CompiledForward())
    if settings.checkpoint is not None:
        callbacks.append(ResumePoints(stage_dir, settings.checkpoint.every_n_steps, settings.checkpoint.every_n_epochs))
    show_progress = settings.progress_bar and sys.stdout.isatty()
    if show_progress:
        callbacks.append(RichProgressBar())
    return pl.Trainer(
        accelerator=settings.accelerator,
        devices=settings.devices,
        strategy=_strategy(settings),
        num_nodes=settings.num_nodes,
        precision=settings.precision,
        sync_batchnorm=settings.sync_batchnorm,
        accumulate_grad_batches=settings.accumulate_grad_batches,
        deterministic=settings.deterministic,
        logger=_loggers(settings.loggers, stage_dir, run_name),
        callbacks=callbacks,
        log_every_n_steps=settings.log_every_n_steps,
        # True only lets our ResumePoints (a Checkpoint) in; Lightning adds no ModelCheckpoint of its own then.
        enable_checkpointing=settings.checkpoint is not None,
        enable_progress_bar=show_progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,  # validation_step is ours and tested: the pre-fit dry run only costs time
        default_root_dir=stage_dir,
        **fit_options,
    )


def fitted_model(trainer: pl.Trainer, module: pl.LightningModule, model_spec) -> nn.Module:
    """The trained `module.model` as a plain CPU model on every rank.

    DDP hands the module back unwrapped (and SyncBatchNorm reverted). FSDP and DeepSpeed leave
    the parameters wrapped (FSDP: sharded across ranks), so the model is rebuilt from the full
    state dict, gathered on rank 0 and broadcast, and later stages and artifacts see the recipe's model.
    """
    from pytorch_lightning.strategies import DeepSpeedStrategy, FSDPStrategy

    from runner.modelio import rebuild
    from runner.transforms import transforms_of

    if not isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
        return module.model
    state = trainer.strategy.broadcast(trainer.strategy.lightning_module_state_dict())  # a collective: every rank
    prefix = "model."
    state = {name[len(prefix):]: tensor.detach().cpu() for name, tensor in state.items() if name.startswith(prefix)}
    return rebuild(model_spec, transforms_of(module.model), state)
