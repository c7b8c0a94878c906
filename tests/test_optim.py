"""Optimizers and lr schedules as torch receives them: classes, hyperparameters, the lr at chosen steps."""

from __future__ import annotations

import pytest
import torch

from runner.lightning.optim import build_optimizer, build_scheduler
from runner.recipe import training as spec

STEPS_PER_EPOCH, TOTAL_STEPS = 10, 60


def _lr_at(schedule, steps: list[int], warmup=None) -> list[float]:
    """The lr torch uses for optimizer step k (0-based), for each k in `steps`, base lr 0.1."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(schedule, warmup, optimizer, STEPS_PER_EPOCH, TOTAL_STEPS, 1)["scheduler"]
    lrs = []
    for step in range(max(steps) + 1):
        if step in steps:
            lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("schedule, steps, expected", [
    # lr * gamma ** floor(epoch / every_epochs): epochs 0, 1.9, 2, 4.5
    (spec.StepDecay(name="step", every_epochs=2, gamma=0.5), [0, 19, 20, 45], [0.1, 0.1, 0.05, 0.025]),
    # lr * gamma ** (milestones passed): epochs 1.4, 1.5, 3.9, 4
    (spec.MultiStep(name="multistep", milestones=[1.5, 4], gamma=0.1), [14, 15, 39, 40], [0.1, 0.01, 0.01, 0.001]),
    # lr * gamma ** epoch, smooth: epochs 0.5, 2, 3.3
    (spec.Exponential(name="exponential", gamma=0.5), [5, 20, 33], [0.1 * 0.5 ** 0.5, 0.025, 0.1 * 0.5 ** 3.3]),
    # min_lr + (lr - min_lr) (1 + cos(pi t)) / 2: t = 0, 1/2, 1
    (spec.Cosine(name="cosine", min_lr=0.01), [0, 30, 60], [0.1, 0.055, 0.01]),
    (spec.Linear(name="linear", min_lr=0.02), [15, 60], [0.08, 0.02]),
])
def test_schedules_follow_their_formula(schedule, steps, expected):
    assert _lr_at(schedule, steps) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("optimizer, torch_class, expected", [
    (spec.SGD(name="sgd", lr=0.3, momentum=0.8, dampening=0.0, nesterov=True, weight_decay=1e-3),
     torch.optim.SGD, {"momentum": 0.8, "nesterov": True, "weight_decay": 1e-3, "dampening": 0.0}),
    (spec.Adam(name="adam", lr=0.3, betas=(0.8, 0.99), eps=1e-6, weight_decay=2e-4, amsgrad=True),
     torch.optim.Adam, {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 2e-4, "amsgrad": True}),
    (spec.AdamW(name="adamw", lr=0.3, betas=(0.85, 0.95), weight_decay=0.05),
     torch.optim.AdamW, {"betas": (0.85, 0.95), "weight_decay": 0.05}),
])
def test_optimizer_class_and_hyperparameters_reach_torch(optimizer, torch_class, expected):
    built = build_optimizer(optimizer, [torch.nn.Parameter(torch.zeros(2))], lr=0.02)  # 0.02: the LR finder's
    group = built.param_groups[0]
    assert type(built) is torch_class and group["lr"] == 0.02 and group["foreach"] is True
    assert {key: group[key] for key in expected} == expected


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_label_smoothing_mixes_the_uniform_target_into_the_loss(smoothing):
    """(1 - eps) * (-log p_y) + eps * mean_k(-log p_k), computed by hand for fixed logits."""
    from runner.lightning.objective import build_objective

    logits, labels = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]]), torch.tensor([0, 2])
    log_p = logits.log_softmax(dim=1)
    expected = ((1 - smoothing) * -log_p[[0, 1], labels] + smoothing * -log_p.mean(dim=1)).mean()
    loss = build_objective(spec.CrossEntropy(name="cross_entropy", label_smoothing=smoothing), 3)(logits, labels)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    if smoothing:  # and the loss really moved: these logits are confident and mostly right
        assert float(loss) > float(build_objective(spec.CrossEntropy(name="cross_entropy"), 3)(logits, labels))


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_gradient_clip_bounds_the_update(nnopt, write_recipe, tmp_path, clip):
    """One plain SGD step at lr 1 moves the weights by exactly the (clipped) gradient: with
    `gradient_clip: 1e-3` the whole update's norm is at most 1e-3; without it, far more. The starting
    weights are the model the run builds: the same architecture drawn right after seeding."""
    import pytorch_lightning as pl

    from runner.measure import named_weights
    from runner.modelio import load_model
    from runner.models.mlp import mlp
    from tests.conftest import synthetic_recipe

    recipe = synthetic_recipe(steps=1, epochs=None, allow_chance_accuracy=True,
                              optimizer={"name": "sgd", "lr": 1.0}, **({"gradient_clip": clip} if clip else {}))
    recipe["stages"].pop()  # no evaluate
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 0, err
    trained = named_weights(load_model(tmp_path / recipe["name"] / "01-train"))
    pl.seed_everything(recipe["seed"])
    start = named_weights(mlp(hidden=[32], in_features=32))
    update = float(torch.cat([(trained[name] - start[name]).flatten() for name in start]).norm())
    assert update <= 1e-3 * (1 + 1e-4) if clip else update > 0.05
