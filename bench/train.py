"""Training throughput: nnopt's train stage vs a plain PyTorch loop vs plain Lightning, same math.

Every runner builds the model from the same seed, reads the same batches in the same order
(one seeded permutation per epoch, as runner.data.batches does), takes `steps` SGD steps with
Nesterov momentum, weight decay and a per-step cosine schedule, and returns a Clock (wall and
process CPU seconds) from optimizer construction to the last step, with the trained model (so
tests can check the math).
"""

from __future__ import annotations

import functools
import math
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from runner.data.batches import TensorBatches
from runner.data.build import build_data
from runner.lightning.trainer import build_trainer
from runner.models import MODELS
from runner.recipe import Recipe
from runner.stages import STAGES, StageContext

OPTIMIZER = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1.0e-4}
SEED = 0


class Clock:
    """Wall and CPU seconds of this process. With one torch thread and no loader workers, CPU time
    is the work done; wall time also counts the waits when other jobs hold the shared cores."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return self


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(SEED)
    return MODELS.get(name)()


def _cosine(step: int, steps: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def _sgd(model, **kernel) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), **{k: v for k, v in OPTIMIZER.items() if k != "name"}, **kernel)


def _permutation(n: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(SEED * 100_003 + epoch))


def _loop(model_name: str, data, steps: int, fast: bool):
    model = _model(model_name)
    x, y = data.train
    clock = Clock()
    optimizer = _sgd(model, foreach=True) if fast else _sgd(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_cosine, steps=steps))
    model.train()
    step, epoch = 0, 0
    while step < steps:
        order = _permutation(len(x), epoch)
        for first in range(0, len(x), data.batch_size):
            index = order[first:first + data.batch_size]
            xb, yb = (x.index_select(0, index), y.index_select(0, index)) if fast else (x[index], y[index])
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == steps:
                break
        epoch += 1
    return clock.stop(), model


def plain_loop(model_name: str, data, steps: int):
    """The reference: the hand-written loop of the PyTorch tutorials (x[index] batches, default SGD)."""
    return _loop(model_name, data, steps, fast=False)


def plain_loop_foreach(model_name: str, data, steps: int):
    """The same loop with nnopt's data path and optimizer default (foreach): what is left is Lightning's cost."""
    return _loop(model_name, data, steps, fast=True)


class _PlainModule(pl.LightningModule):
    """What a Lightning user writes first: log the loss every step, return it."""

    def __init__(self, model, steps: int):
        super().__init__()
        self.model, self.steps = model, steps

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = _sgd(self.model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_cosine, steps=self.steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _BareModule(_PlainModule):
    """Lightning's floor: no logging at all, and nnopt's kernels (foreach SGD, index_select batches)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        optimizer = _sgd(self.model, foreach=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_cosine, steps=self.steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _fit_lightning(module: pl.LightningModule, data, steps: int):
    batches = TensorBatches(*data.train, data.batch_size, shuffle=True, seed=SEED)
    clock = Clock()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=batches)
    return clock.stop(), module.model


def plain_lightning(model_name: str, data, steps: int):
    """Lightning's defaults on the same in-memory batches; no files (logger, checkpoints) or progress bar."""
    return _fit_lightning(_PlainModule(_model(model_name), steps), data, steps)


def bare_lightning(model_name: str, data, steps: int):
    """Lightning's own loop and nothing else on nnopt's kernels: what no LightningModule can go below."""
    return _fit_lightning(_BareModule(_model(model_name), steps), data, steps)


def nnopt_recipe(model_name: str, steps: int, batch_size: int) -> Recipe:
    return Recipe.model_validate({
        "name": "bench", "seed": SEED, "model": {"name": model_name},
        "data": {"name": "mnist", "batch_size": batch_size},
        "trainer": {"progress_bar": False},
        "stages": [{"name": "train", "kind": "train", "steps": steps, "optimizer": OPTIMIZER,
                    "schedule": {"name": "cosine"}}],
    })


def _no_earlier_stage(name: str):
    raise AssertionError(f"the bench's train stage has no earlier stage `{name}`")


def run_stage(recipe: Recipe, model: torch.nn.Module, data) -> tuple[Clock, torch.nn.Module, dict]:
    """The recipe's first stage (a training stage) on `data`, in a throwaway folder: its Clock, model and metrics."""
    with tempfile.TemporaryDirectory() as folder:
        ctx = StageContext(name="train", folder=Path(folder), seed=recipe.seed, data=lambda: data,
                           trainer=functools.partial(build_trainer, recipe.trainer), model_spec=recipe.model,
                           load=_no_earlier_stage, artifact=_no_earlier_stage)
        clock = Clock()
        result = STAGES.get("train")(recipe.stages[0], model, ctx)
        return clock.stop(), result.model, result.metrics


def nnopt_stage(model_name: str, data, steps: int):
    """nnopt's train stage as a recipe runs it: Trainer from the recipe, CSV log and LR monitor on."""
    clock, model, _ = run_stage(nnopt_recipe(model_name, steps, data.batch_size), _model(model_name), data)
    return clock, model


RUNNERS = {"plain_loop": plain_loop, "plain_loop_foreach": plain_loop_foreach, "plain_lightning": plain_lightning,
           "bare_lightning": bare_lightning, "nnopt": nnopt_stage}


def load_mnist(batch_size: int):
    recipe = nnopt_recipe("lenet_300_100", 1, batch_size)
    return build_data(recipe.data, recipe.seed)
