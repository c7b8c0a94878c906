"""Build torch optimizers and learning-rate schedules from their recipe specs."""

from __future__ import annotations

import bisect
import math
from typing import Callable

import torch

from runner.lightning.units import to_steps
from runner.recipe import training as spec


# One torch class per optimizer spec class (tests/test_architecture.py checks the union is covered).
OPTIMIZERS = {spec.SGD: torch.optim.SGD, spec.Adam: torch.optim.Adam, spec.AdamW: torch.optim.AdamW,
              spec.RMSprop: torch.optim.RMSprop}


def build_optimizer(opt, params, lr: float) -> torch.optim.Optimizer:
    """`lr` is passed apart from the spec because the LR finder may have replaced it.

    On CPU torch's default update is one small op per parameter tensor: for LeNet-300-100, SGD
    with Nesterov momentum and weight decay costs about 1 ms per step that way, 0.2-0.4 ms with
    `foreach` (multi-tensor ops, the same results bit for bit, so our default) and 0.1-0.2 ms
    `fused` (opt-in: it rounds differently, which moves final figures by seed-noise amounts)."""
    fields = opt.model_dump(exclude={"name", "lr", "implementation"})
    implementation = getattr(opt, "implementation", "foreach")
    return OPTIMIZERS[type(opt)](params, lr=lr, **fields, **{implementation: True})


# Multipliers of the base lr at optimizer step `step` (0-based), one per LambdaLR schedule spec class.
# Each gets (schedule, base_lr, steps_per_epoch, total_steps, warmup_steps).

def _constant(schedule, base_lr, steps_per_epoch, total_steps, warmup_steps):
    return lambda step: 1.0


def _step_decay(schedule, base_lr, steps_per_epoch, total_steps, warmup_steps):
    return lambda step: schedule.gamma ** math.floor(step / steps_per_epoch / schedule.every_epochs + 1e-9)


def _multistep(schedule, base_lr, steps_per_epoch, total_steps, warmup_steps):
    return lambda step: schedule.gamma ** bisect.bisect_right(schedule.milestones, step / steps_per_epoch + 1e-9)


def _exponential(schedule, base_lr, steps_per_epoch, total_steps, warmup_steps):
    return lambda step: schedule.gamma ** (step / steps_per_epoch)


def _annealing(shape: Callable[[float], float]):
    """From lr down to min_lr over the stage after warmup, following `shape` (1 at t=0, 0 at t=1)."""
    def factor_fn(schedule, base_lr, steps_per_epoch, total_steps, warmup_steps):
        span = max(1, total_steps - warmup_steps)
        floor = schedule.min_lr / base_lr
        return lambda step: floor + (1 - floor) * shape(min(1.0, max(0, step - warmup_steps) / span))
    return factor_fn


def _piecewise(schedule, base_lr, steps_per_epoch, total_steps, warmup_steps):
    return lambda step: schedule.values[bisect.bisect_right(schedule.boundaries, step / steps_per_epoch + 1e-9)] / base_lr


def _inv(schedule, base_lr, steps_per_epoch, total_steps, warmup_steps):
    return lambda step: (1 + schedule.gamma * step) ** -schedule.power  # Caffe: base_lr * (1 + gamma * iter) ^ (-power)


FACTORS: dict[type, Callable[..., Callable[[int], float]]] = {
    spec.Constant: _constant, spec.StepDecay: _step_decay, spec.MultiStep: _multistep, spec.Exponential: _exponential,
    spec.Cosine: _annealing(lambda t: 0.5 * (1 + math.cos(math.pi * t))), spec.Linear: _annealing(lambda t: 1 - t),
    spec.Piecewise: _piecewise, spec.Inv: _inv,
}


def _one_cycle(schedule, warmup, optimizer, steps_per_epoch, total_steps, val_every_epochs) -> dict:
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=schedule.max_lr, total_steps=total_steps, pct_start=schedule.pct_start,
        anneal_strategy=schedule.anneal, cycle_momentum=schedule.cycle_momentum,
        base_momentum=schedule.base_momentum, max_momentum=schedule.max_momentum,
        div_factor=schedule.div_factor, final_div_factor=schedule.final_div_factor)
    return {"scheduler": scheduler, "interval": "step"}


def _reduce_on_plateau(schedule, warmup, optimizer, steps_per_epoch, total_steps, val_every_epochs) -> dict:
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min" if schedule.monitor == "val_loss" else "max", factor=schedule.factor,
        patience=schedule.patience, threshold=schedule.threshold, min_lr=schedule.min_lr)
    return {"scheduler": scheduler, "interval": "epoch", "frequency": val_every_epochs,
            "monitor": schedule.monitor, "strict": True}


def _lambda_lr(schedule, warmup, optimizer, steps_per_epoch, total_steps, val_every_epochs) -> dict:
    warmup_steps = 0
    if warmup is not None:
        warmup_steps = max(1, to_steps(warmup, steps_per_epoch, total_steps))
    main = FACTORS[type(schedule)](schedule, optimizer.param_groups[0]["lr"], steps_per_epoch, total_steps,
                                   warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return main(step) * (warmup.start_factor + (1 - warmup.start_factor) * step / warmup_steps)
        return main(step)

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}


# One scheduler builder per schedule spec class (tests/test_architecture.py checks the union is covered).
SCHEDULERS = {spec.OneCycle: _one_cycle, spec.ReduceOnPlateau: _reduce_on_plateau,
              **{schedule_class: _lambda_lr for schedule_class in FACTORS}}


def build_scheduler(schedule, warmup, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    total_steps: int, val_every_epochs: int) -> dict:
    """A Lightning lr_scheduler config: stepped per optimizer step, except reduce-on-plateau."""
    return SCHEDULERS[type(schedule)](schedule, warmup, optimizer, steps_per_epoch, total_steps, val_every_epochs)
