"""`import nnopt`: run and validate a recipe from Python, load the artifacts it wrote."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

import nnopt
from tests.conftest import synthetic_recipe


def test_validate_takes_a_dict_with_overrides_and_reports_fields():
    recipe = nnopt.validate(synthetic_recipe(), overrides={"stages.train.epochs": 1})
    assert recipe.stages[0].epochs == 1
    with pytest.raises(nnopt.RecipeError) as error:
        nnopt.validate(synthetic_recipe(), overrides=["stages.train.epochs=0"])
    assert any(issue.field == "stages[0].epochs" for issue in error.value.issues)


def test_run_then_load_every_stage(tmp_path):
    recipe = synthetic_recipe(epochs=1)
    recipe["stages"].insert(1, {"name": "prune", "kind": "prune", "sparsity": 0.5})
    result = nnopt.run(recipe, output_dir=tmp_path, console=Console(quiet=True))
    run_dir = tmp_path / "tiny"
    assert result.run_dirs == [run_dir] and 0.3 < result.values["test_acc"] <= 1
    trained = nnopt.load(run_dir / "01-train")
    pruned = nnopt.load(run_dir / "02-prune")
    assert isinstance(trained, torch.nn.Module) and not trained.training
    # the masks are rebuilt from data: half of fc1's weights are exactly zero, as the prune stage left them
    assert (pruned.fc1.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert (trained.fc1.weight == 0).sum().item() == 0
    x = torch.randn(4, 32)
    assert pruned(x).shape == (4, 10)  # logits, one per class
    # a second run reuses the finished stages and returns the same figures
    again = nnopt.run(recipe, output_dir=tmp_path, console=Console(quiet=True))
    assert again.values["test_acc"] == result.values["test_acc"]
