"""Gradual (AGP) pruning inside a training stage: the cubic schedule step by step, the end check, resume."""

from __future__ import annotations

import pytest
import torch

from runner.modelio import load_model
from runner.lightning.gradual import agp_sparsity
from runner.lightning.module import ClassifierModule
from runner.recipe.schema import Recipe
from tests.conftest import read_metrics, run_straight_and_resumed, synthetic_recipe, untimed_metrics

# synthetic_recipe: 512 examples / batch 32 = 16 steps per epoch, 3 epochs = 48 steps.
AGP = {"sparsity": 0.8, "start": {"steps": 4}, "end": {"epochs": 2}, "every": {"fraction": 0.125}}


def run(nnopt, write_recipe, tmp_path, recipe, expect: int = 0):
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert code == expect, err
    return tmp_path / "out" / recipe["name"], " ".join(err.split())


def test_agp_follows_the_cubic_schedule_and_ends_on_target(nnopt, write_recipe, tmp_path):
    run_dir, _ = run(nnopt, write_recipe, tmp_path, synthetic_recipe(gradual_pruning=AGP))
    report = read_metrics(run_dir, "01-train")["gradual_pruning"]
    # every 0.125 * 48 = 6 steps from step 4, and the end (epoch 2 = step 32) always included
    assert list(report["pruned_at_steps"]) == ["4", "10", "16", "22", "28", "32"]
    for step, reached in report["pruned_at_steps"].items():
        # Zhu & Gupta 2017 eq. 1 with s_i = 0, s_f = 0.8, t0 = 4, n dt = 28; layers round to whole weights
        assert reached == pytest.approx(0.8 * (1 - (1 - (int(step) - 4) / 28) ** 3), abs=2e-3)
    assert report["layer_sparsity"] == {"fc1.weight": 0.799805, "fc2.weight": 0.8}  # 1024 and 320 weights
    evaluate = read_metrics(run_dir, "02-evaluate")
    assert evaluate["layer_sparsity"] == report["layer_sparsity"] and evaluate["test_acc"] > 0.4
    model = load_model(run_dir / "01-train")  # masks reload from model.json + model.pt
    assert float((model.fc1.weight == 0).float().mean()) == pytest.approx(0.8, abs=1e-3)


def test_agp_formula_at_its_ends():
    assert agp_sparsity(10, 10, 50, 0.1, 0.9) == pytest.approx(0.1)
    assert agp_sparsity(30, 10, 50, 0.1, 0.9) == pytest.approx(0.9 - 0.8 * 0.5 ** 3)
    assert agp_sparsity(50, 10, 50, 0.1, 0.9) == agp_sparsity(70, 10, 50, 0.1, 0.9) == pytest.approx(0.9)


def test_window_outside_the_stage_fails_loudly(nnopt, write_recipe, tmp_path):
    """The data's size is known from the recipe, so `validate` resolves the window before anything trains."""
    recipe = synthetic_recipe(gradual_pruning={**AGP, "end": {"steps": 48}})  # after the last step (47)
    _, err = run(nnopt, write_recipe, tmp_path, recipe, expect=2)
    assert "the gradual pruning window ends at step 48, not inside the stage (the stage has 48 steps" in err


def test_schedule_cut_short_by_early_stopping_fails(nnopt, write_recipe, tmp_path):
    recipe = synthetic_recipe(epochs=3, gradual_pruning={**AGP, "end": {"steps": 40}},
                              early_stopping={"monitor": "val_loss", "patience": 1, "min_delta": 10.0})
    _, err = run(nnopt, write_recipe, tmp_path, recipe, expect=1)
    assert "before gradual pruning reached its final sparsity at step 40" in err


def test_checkpoint_of_a_masked_model_loads_into_a_fresh_module(nnopt, write_recipe, tmp_path):
    """What a mid-stage resume needs: a Lightning checkpoint's state dict names the masks, and a
    module around an unpruned model re-creates them before the strict load (ModelPruning loses them)."""
    run_dir, _ = run(nnopt, write_recipe, tmp_path, synthetic_recipe(gradual_pruning=AGP))
    recipe = Recipe.model_validate(synthetic_recipe(gradual_pruning=AGP))
    spec = recipe.stages[0]
    pruned = ClassifierModule(load_model(run_dir / "01-train"), spec, 10)
    checkpoint = {"state_dict": pruned.state_dict()}
    from runner.models import build_model

    fresh = ClassifierModule(build_model(recipe.model), spec, 10)
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    example = torch.randn(4, 32)
    assert torch.equal(fresh(example), pruned(example))
    assert float((fresh.model.fc1.weight == 0).float().mean()) == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize("agp, message", [
    ({**AGP, "every": {"steps": 0}}, "`every` must be a positive interval"),
    ({**AGP, "end": {"steps": 10, "epochs": 1}}, "exactly one of `epochs`, `steps` or `fraction`"),
    ({**AGP, "initial_sparsity": 0.9}, "must be at least `initial_sparsity`"),
    ({**AGP, "sparsity": {"fc7": 0.5}}, "`fc7` matches no prunable layer"),
    ({**AGP, "end": {"epochs": 3}}, "gradual_pruning.end: the gradual pruning window ends at step 48, not inside"),
    ({**AGP, "start": {"epochs": 2.5}}, "gradual_pruning.start: the gradual pruning window starts at step 40, not "
                                        "before its end (step 32)"),
])
def test_bad_gradual_specs_are_located_errors(nnopt, write_recipe, agp, message):
    code, _, err = nnopt("validate", write_recipe(synthetic_recipe(gradual_pruning=agp)))
    assert code == 2 and message in " ".join(err.split()), err


def test_interrupted_gradual_pruning_resumes_bit_identical(nnopt, write_recipe, tmp_path, monkeypatch):
    """Interrupted between two pruning steps, the resumed stage keeps its masks, knows which steps it has
    pruned at, and draws the same random scores: it ends exactly where an uninterrupted run ends."""
    recipe = synthetic_recipe(gradual_pruning={**AGP, "method": "random"})
    recipe["trainer"]["checkpoint"] = {"every_n_steps": 8}
    run = run_straight_and_resumed(nnopt, monkeypatch, write_recipe(recipe), tmp_path,
                                   checkpoints=2)  # step 16: pruned at 4, 10, 16 so far; 22, 28, 32 to come
    assert "resumes from its last checkpoint at step 16" in run.out
    straight, resumed = run.straight, run.resumed
    expected = untimed_metrics(straight, "01-train")
    assert untimed_metrics(resumed, "01-train") == expected
    assert list(expected["gradual_pruning"]["pruned_at_steps"]) == ["4", "10", "16", "22", "28", "32"]
    weights, reference = (torch.load(run / "01-train" / "model.pt", weights_only=True) for run in (resumed, straight))
    assert any(key.endswith(".mask") for key in weights)
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
