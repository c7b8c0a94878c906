"""Build torch optimizers and learning-rate schedules from their recipe specs."""

from __future__ import annotations

import bisect
import math
from typing import Callable

import torch

from runner.lightning.units import to_steps
from runner.recipe import training as spec


def build_optimizer(opt: spec.SGD | spec.Adam | spec.AdamW | spec.RMSprop, params, lr: float) -> torch.optim.Optimizer:
    """`lr` is passed apart from the spec because the LR finder may have replaced it.

    On CPU torch's default update is one small op per parameter tensor: for LeNet-300-100, SGD
    with Nesterov momentum and weight decay costs about 1 ms per step that way, 0.2-0.4 ms with
    `foreach` (multi-tensor ops, the same results bit for bit, so our default) and 0.1-0.2 ms
    `fused` (opt-in: it rounds differently, which moves final figures by seed-noise amounts)."""
    fields = opt.model_dump(exclude={"name", "lr", "implementation"})
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
           "rmsprop": torch.optim.RMSprop}[opt.name]
    implementation = getattr(opt, "implementation", "foreach")
    return cls(params, lr=lr, **fields, **{implementation: True})


def _factor_fn(schedule, base_lr: float, steps_per_epoch: int, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    span = max(1, total_steps - warmup_steps)  # cosine/linear run over the stage after warmup
    name = schedule.name

    def epoch(step: int) -> float:
        return step / steps_per_epoch

    if name == "constant":
        return lambda step: 1.0
    if name == "step":
        return lambda step: schedule.gamma ** math.floor(epoch(step) / schedule.every_epochs + 1e-9)
    if name == "multistep":
        return lambda step: schedule.gamma ** bisect.bisect_right(schedule.milestones, epoch(step) + 1e-9)
    if name == "exponential":
        return lambda step: schedule.gamma ** epoch(step)
    if name in ("cosine", "linear"):
        floor = schedule.min_lr / base_lr

        def anneal(step: int) -> float:
            t = min(1.0, max(0, step - warmup_steps) / span)
            shape = 0.5 * (1 + math.cos(math.pi * t)) if name == "cosine" else 1 - t
            return floor + (1 - floor) * shape
        return anneal
    if name == "piecewise":
        return lambda step: schedule.values[bisect.bisect_right(schedule.boundaries, epoch(step) + 1e-9)] / base_lr
    if name == "inv":  # Caffe: base_lr * (1 + gamma * iter) ^ (-power)
        return lambda step: (1 + schedule.gamma * step) ** -schedule.power
    raise AssertionError(f"schedule `{name}` is not a LambdaLR schedule")


def build_scheduler(schedule, warmup, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    total_steps: int, val_every_epochs: int) -> dict:
    """A Lightning lr_scheduler config: stepped per optimizer step, except reduce-on-plateau."""
    base_lr = optimizer.param_groups[0]["lr"]
    if schedule.name == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=schedule.max_lr, total_steps=total_steps, pct_start=schedule.pct_start,
            anneal_strategy=schedule.anneal, cycle_momentum=schedule.cycle_momentum,
            base_momentum=schedule.base_momentum, max_momentum=schedule.max_momentum,
            div_factor=schedule.div_factor, final_div_factor=schedule.final_div_factor)
        return {"scheduler": scheduler, "interval": "step"}
    if schedule.name == "reduce_on_plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min" if schedule.monitor == "val_loss" else "max", factor=schedule.factor,
            patience=schedule.patience, threshold=schedule.threshold, min_lr=schedule.min_lr)
        return {"scheduler": scheduler, "interval": "epoch", "frequency": val_every_epochs,
                "monitor": schedule.monitor, "strict": True}
    warmup_steps = 0
    if warmup is not None:
        warmup_steps = max(1, to_steps(warmup, steps_per_epoch, total_steps))
    main = _factor_fn(schedule, base_lr, steps_per_epoch, total_steps, warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return main(step) * (warmup.start_factor + (1 - warmup.start_factor) * step / warmup_steps)
        return main(step)

    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}
