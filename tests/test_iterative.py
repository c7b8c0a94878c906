"""Iterative prune-retrain rounds: the geometric sparsity ladder, LR and lottery-ticket rewinding, re-init control."""

from __future__ import annotations

import pytest
import torch

from runner.modelio import load_model
from runner.measure import named_weights
from tests.conftest import read_metrics, synthetic_recipe

SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9}


def run(nnopt, write_recipe, tmp_path, recipe, expect: int = 0):
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert code == expect, err
    return tmp_path / "out" / recipe["name"], " ".join(err.split())


def with_iterative(epochs: int = 1, **iterative) -> dict:
    recipe = synthetic_recipe(epochs=1)
    recipe["stages"].insert(1, {"name": "rounds", "kind": "iterative_prune",
                                "retrain": {"epochs": epochs, "optimizer": SGD}, **iterative})
    return recipe


def test_rounds_prune_a_fraction_of_what_remains(nnopt, write_recipe, tmp_path):
    recipe = with_iterative(rounds=3, fraction=0.5, scope="global")
    run_dir, _ = run(nnopt, write_recipe, tmp_path, recipe)
    rounds = read_metrics(run_dir, "02-rounds")["rounds"]
    assert [r["sparsity"] for r in rounds] == [0.5, 0.75, 0.875]  # 1 - 0.5^k over 1344 weights: exact
    assert all(r["steps"] == 16 and r["val_acc"] > 0.3 for r in rounds)
    evaluate = read_metrics(run_dir, "03-evaluate")
    assert evaluate["params_nonzero"] == 1344 // 8 + 42  # kept weights + the dense biases
    model, example = load_model(run_dir / "02-rounds"), torch.randn(4, 32)
    assert torch.equal(model(example), load_model(run_dir / "03-evaluate")(example))


def test_lottery_ticket_rewinds_survivors_to_theta0(nnopt, write_recipe, tmp_path):
    """A linear schedule ends at lr 0; without LR rewinding the rounds retrain at that lr, so the survivors
    must still hold exactly their θ0 values (the weights the stage started from) under the final mask."""
    recipe = with_iterative(rounds=2, fraction={"fc1": 0.5, "fc2": 0.2}, rewind="init", rewind_lr=False)
    recipe["stages"][1]["retrain"]["schedule"] = {"name": "linear"}
    run_dir, _ = run(nnopt, write_recipe, tmp_path, recipe)
    metrics = read_metrics(run_dir, "02-rounds")
    assert metrics["dense"]["final_lr"] == 0 and [r["final_lr"] for r in metrics["rounds"]] == [0, 0]
    assert metrics["rounds"][-1]["layer_sparsity"] == {"fc1.weight": 0.75, "fc2.weight": 0.359375}  # 1-0.8^2=.36
    theta0 = named_weights(load_model(run_dir / "01-train"))
    ticket = named_weights(load_model(run_dir / "02-rounds"))
    for name in ("fc1.weight", "fc2.weight", "fc1.bias"):
        assert torch.equal(ticket[name], theta0[name] * (ticket[name] != 0))
    assert float((ticket["fc1.weight"] == 0).float().mean()) == 0.75


@pytest.mark.parametrize("control", [{"reinit": True}, {"rewind": {"steps": 5}}])
def test_reinit_control_and_late_rewinding_start_rounds_elsewhere(nnopt, write_recipe, tmp_path, control):
    """At lr 0 the round keeps what it started from: late rewinding must have restarted it from the dense
    round's step-5 weights (recorded in rewind_point.pt), not from θ0 nor from the dense round's end."""
    recipe = with_iterative(rounds=1, fraction=0.5, rewind_lr=False, **control)
    recipe["stages"][1]["retrain"]["schedule"] = {"name": "linear"}
    recipe["stages"][1]["retrain"]["allow_chance_accuracy"] = True  # a re-initialized net at lr 0 only guesses
    run_dir, _ = run(nnopt, write_recipe, tmp_path, recipe)
    theta0 = named_weights(load_model(run_dir / "01-train"))["fc1.weight"]
    survivors = named_weights(load_model(run_dir / "02-rounds"))["fc1.weight"]
    kept = survivors != 0
    assert float(kept.float().mean()) == 0.5
    assert not torch.equal(survivors[kept], theta0[kept])  # neither θ0 ...
    if "reinit" in control:  # ... and a fresh draw of the same initializer (same scale as θ0)
        assert survivors[kept].abs().max() <= 1 / 32 ** 0.5 + 1e-6
        assert not (run_dir / "02-rounds" / "rewind_point.pt").exists()
    else:  # ... but exactly the dense round's weights at step 5 under the mask
        metrics = read_metrics(run_dir, "02-rounds")
        assert metrics["rewind_step"] == 5 and metrics["dense"]["steps"] > 5
        rewind_point = torch.load(run_dir / "02-rounds" / "rewind_point.pt")
        assert not torch.equal(rewind_point["fc1.weight"], theta0)  # five steps moved it
        assert torch.equal(survivors, rewind_point["fc1.weight"] * kept)


@pytest.mark.parametrize("iterative, message", [
    ({"rounds": 2, "fraction": 0.5, "rewind": "init", "reinit": True}, "choose one"),
    ({"rounds": 2, "fraction": {"fc1": 0.5}, "scope": "global"}, "need `scope: layer`"),
    ({"rounds": 0, "fraction": 0.5}, "greater than 0"),
    ({"rounds": 2, "fraction": {"conv1": 0.5}}, "`conv1` matches no prunable layer"),
])
def test_bad_iterative_specs_are_located_errors(nnopt, write_recipe, iterative, message):
    code, _, err = nnopt("validate", write_recipe(with_iterative(**iterative)))
    assert code == 2 and message in " ".join(err.split()), err
