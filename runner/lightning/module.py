"""ClassifierModule: one LightningModule for every training stage (train, finetune, ...)."""

from __future__ import annotations

import fnmatch
import inspect
import math
from typing import Callable

import pytorch_lightning as pl
import torch
from torch import nn

from runner.lightning.internals import HOOK_NAME_ATTRIBUTE
from runner.lightning.objective import build_objective, distillation_loss
from runner.lightning.teacher import Teacher
from runner.lightning.units import stage_length
from runner.measure import named_tensors
from runner.lightning.optim import build_optimizer, build_scheduler
from runner.pruning import add_masks_from_state_dict


class NonFiniteLoss(ArithmeticError):
    """The loss became NaN or infinite; `fit` turns it into the stage's StageError."""


_LOSSES = "nnopt_train_losses"  # our key in Lightning checkpoints


class ClassifierModule(pl.LightningModule):
    """Wraps a plain nn.Module; the stage spec supplies optimizer, schedule, objective, regularization."""

    def __init__(self, model: nn.Module, spec, num_classes: int):
        super().__init__()
        self.model = model
        self.spec = spec
        self.num_classes = num_classes
        self.lr = spec.optimizer.lr  # public: Lightning's LR finder writes its suggestion here
        self.objective = build_objective(spec.loss, num_classes)
        self._penalties = self._match_penalties()
        self._epoch_losses: list[torch.Tensor] = []  # this epoch's detached step losses, logged in windows
        self._epoch_parts: list[torch.Tensor] = []  # (data loss, penalty) per step, with L1/L2 terms
        self._logged_until = 0
        self._compiled: Callable | None = None  # set by CompiledForward for the length of a fit
        self._teacher: Teacher | None = None  # set by teach_with: the soft targets of a distilled fit

    def __setattr__(self, name: str, value) -> None:
        # Plain attributes set often (see runner.lightning.internals) skip nn.Module's type checks;
        # _compiled and _teacher are not submodules, so they must not enter the state dict either.
        if name in (HOOK_NAME_ATTRIBUTE, "_compiled", "_teacher"):
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def _match_penalties(self) -> list[tuple[float, float, list[str]]]:
        # Plain names (`fc1.weight`) even when a mask parametrizes the weight: the penalty is on what
        # the forward pass uses, and users' patterns keep working after pruning.
        names = list(named_tensors(self.model))
        return [(term.l1, term.l2, sorted({n for pattern in term.params for n in fnmatch.filter(names, pattern)}))
                for term in self.spec.regularization]

    def teach_with(self, teacher: Teacher) -> None:
        """Distil from `teacher` (the spec's `distillation` block) in every training step."""
        self._teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x)

    def _training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self._logits(x)
        if self._teacher is None:
            return self.objective(logits, y)
        return distillation_loss(self.spec.distillation, self.objective, logits, self._teacher.logits(x), y)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return (self._compiled or self.model)(x)

    def penalty(self) -> torch.Tensor | float:
        """The explicit L1/L2 terms added to the loss (Keras-style: a sum, not a mean)."""
        params = named_tensors(self.model)
        total: torch.Tensor | float = 0.0
        for l1, l2, names in self._penalties:
            for name in names:
                weight = params[name]
                if l1:
                    total = total + l1 * weight.abs().sum()
                if l2:
                    total = total + l2 * weight.pow(2).sum()
        return total

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self._training_loss(x, y)
        if self._penalties:
            penalty = self.penalty()
            # logged apart: train_loss includes the penalty, so only the data loss compares with val_loss
            self._epoch_parts.append(torch.stack([loss.detach(), penalty.detach()]))
            loss = loss + penalty
        # .item() reads one number (a few microseconds); torch.isfinite on a 0-d tensor costs ten times that on CPU.
        # Either waits for the step's kernels on an accelerator.
        if not math.isfinite(loss.detach().item()):
            self._stop_on_non_finite(loss, batch_idx)
        # self.log costs about as much as a LeNet-300-100 optimizer step on CPU, so the loss is
        # kept as a detached tensor (no sync, no host transfer) and logged as the mean over the
        # logging window, only on the steps Lightning writes logs (its own
        # rule, restated in _log_step), and as the epoch mean at the end of each epoch.
        self._epoch_losses.append(loss.detach())
        if self._log_step():
            self._log_train_loss(self._epoch_losses[self._logged_until:], self._epoch_parts[self._logged_until:],
                                 on_step=True)
            self._logged_until = len(self._epoch_losses)
        return loss

    # Lightning reads training_step's signature on every step (is_param_in_hook_signature, through
    # inspect.getfullargspec, about 20 us on CPU); inspect returns a function's __signature__ when it has one.
    training_step.__signature__ = inspect.signature(training_step)

    def _log_step(self) -> bool:
        """Whether Lightning writes logs at this step: every `log_every_n_steps` optimizer steps, and when stopping."""
        every = self.trainer.log_every_n_steps
        return every > 0 and ((self.trainer.global_step + 1) % every == 0 or self.trainer.should_stop)

    def on_train_epoch_start(self) -> None:
        self._epoch_losses = []
        self._epoch_parts = []
        self._logged_until = 0

    def on_train_epoch_end(self) -> None:
        if self._epoch_losses:
            self._log_train_loss(self._epoch_losses, self._epoch_parts, on_step=False)

    def _log_train_loss(self, losses: list[torch.Tensor], parts: list[torch.Tensor], on_step: bool) -> None:
        # Averaged over ranks so that a multi-process run reports the global batch's loss; every
        # rank reaches this on the same steps, so the all-reduce happens only here.
        self.log("train_loss", torch.stack(losses).mean(), on_step=on_step, on_epoch=not on_step, prog_bar=True,
                 batch_size=1, sync_dist=True)
        if parts:
            data_loss, penalty = torch.stack(parts).mean(dim=0)
            for name, value in (("train_data_loss", data_loss), ("train_penalty", penalty)):
                self.log(name, value, on_step=on_step, on_epoch=not on_step, batch_size=1, sync_dist=True)

    def _stop_on_non_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Training on from a NaN or infinite loss only spreads it into every weight: stop the stage now."""
        lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else self.lr
        raise NonFiniteLoss(f"the training loss is {loss.item()} at step {self.global_step} "
                            f"(epoch {self.current_epoch}, batch {batch_idx}), learning rate {lr:.4g}")

    def _evaluate(self, batch, prefix: str):
        x, y = batch
        logits = self._logits(x)
        loss = self.objective(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{prefix}_loss", loss, on_epoch=True, batch_size=len(y), sync_dist=True, prog_bar=True)
        self.log(f"{prefix}_acc", acc, on_epoch=True, batch_size=len(y), sync_dist=True, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The epoch's losses so far: a run resumed mid-epoch reports the same means as one never stopped.
        checkpoint[_LOSSES] = {"losses": torch.stack(self._epoch_losses) if self._epoch_losses else torch.empty(0),
                               "logged_until": self._logged_until}

    def on_fit_start(self) -> None:
        # An earlier stage may hand the model on in eval mode (evaluate does), and Lightning keeps each
        # module's mode: training it so would switch dropout off and freeze BatchNorm statistics.
        self.model.train()
        if self._teacher is not None:
            self._teacher.to(self.device)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint of a pruned model names its masks; a fresh module gets them before the strict load.
        add_masks_from_state_dict(self.model, checkpoint["state_dict"], prefix="model.")
        if _LOSSES in checkpoint:
            self._epoch_losses = list(checkpoint[_LOSSES]["losses"].unbind())
            self._logged_until = checkpoint[_LOSSES]["logged_until"]

    def configure_optimizers(self):
        optimizer = build_optimizer(self.spec.optimizer, self.model.parameters(), self.lr)
        steps_per_epoch, total_steps = stage_length(self.trainer)
        scheduler = build_scheduler(self.spec.schedule, self.spec.warmup, optimizer, steps_per_epoch,
                                    total_steps, self.spec.val_every_epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


class CompiledForward(pl.Callback):
    """`trainer.compile: true`: the module's forward runs through torch.compile (TorchInductor) during fit.

    The compiled wrapper is dropped at teardown, so the stage hands on (and saves) the plain model."""

    def setup(self, trainer, pl_module, stage):
        pl_module._compiled = torch.compile(pl_module.model)

    def teardown(self, trainer, pl_module, stage):
        pl_module._compiled = None

