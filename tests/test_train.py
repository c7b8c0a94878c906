"""The train and evaluate stages on real (small) data: numbers a broken stage would miss."""

from __future__ import annotations

import csv

import pytest
import torch

from runner.measure import named_weights
from runner.modelio import load_model
from tests.conftest import mnist_recipe, read_metrics, synthetic_recipe


def run(nnopt, write_recipe, tmp_path, recipe, *extra):
    code, out, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out", *extra)
    assert code == 0, err
    return tmp_path / "out" / recipe["name"]


def lr_by_step(run_dir, folder="01-train") -> dict[int, float]:
    with open(run_dir / folder / "logs" / "metrics.csv") as handle:
        return {int(row["step"]): float(row["lr-SGD"]) for row in csv.DictReader(handle) if row.get("lr-SGD")}


def test_mnist_subset_learns_far_above_chance(nnopt, write_recipe, tmp_path):
    recipe = mnist_recipe([
        {"name": "train", "kind": "train", "epochs": 2, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
        {"name": "evaluate", "kind": "evaluate", "latency_repeats": 3},
    ])
    run_dir = run(nnopt, write_recipe, tmp_path, recipe)
    metrics = read_metrics(run_dir, "02-evaluate")
    assert metrics["test_acc"] > 0.90  # chance is 0.10
    assert metrics["test_examples"] == 2000
    assert metrics["params_total"] == 266_610 and metrics["params_nonzero"] > 266_000
    assert metrics["model_bytes"] > 266_610 * 4
    assert metrics["latency_ms_b1"] > 0 and metrics["latency_ms_b256"] > metrics["latency_ms_b1"]
    assert (run_dir / "report.md").read_text().count("| evaluate |") == 1
    # The artifact rebuilds the model without pickled code and gives the same predictions.
    model = load_model(run_dir / "02-evaluate")
    assert set(named_weights(model)) == {f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}


def test_same_seed_gives_identical_metrics(nnopt, write_recipe, tmp_path):
    first = run(nnopt, write_recipe, tmp_path / "a", synthetic_recipe())
    second = run(nnopt, write_recipe, tmp_path / "b", synthetic_recipe())
    a, b = read_metrics(first, "01-train"), read_metrics(second, "01-train")
    assert a["val_loss"] == b["val_loss"] and a["train_loss"] == b["train_loss"]
    other = run(nnopt, write_recipe, tmp_path / "c", {**synthetic_recipe(), "seed": 1})
    assert read_metrics(other, "01-train")["val_loss"] != a["val_loss"]


def test_synthetic_training_beats_chance_and_untrained(nnopt, write_recipe, tmp_path):
    run_dir = run(nnopt, write_recipe, tmp_path, synthetic_recipe())
    assert read_metrics(run_dir, "02-evaluate")["test_acc"] > 0.5  # 10 classes: chance is 0.1


def test_piecewise_schedule_is_followed_per_step(nnopt, write_recipe, tmp_path):
    """512 examples / batch 32 = 16 steps per epoch; lr 0.05 for epoch 0, 0.01 for 1, 0.001 after."""
    recipe = synthetic_recipe(schedule={"name": "piecewise", "boundaries": [1, 2], "values": [0.05, 0.01, 0.001]})
    recipe["trainer"]["log_every_n_steps"] = 1
    lrs = lr_by_step(run(nnopt, write_recipe, tmp_path, recipe))
    assert lrs[0] == pytest.approx(0.05) and lrs[15] == pytest.approx(0.05)
    assert lrs[16] == pytest.approx(0.01) and lrs[31] == pytest.approx(0.01)
    assert lrs[32] == pytest.approx(0.001) and lrs[47] == pytest.approx(0.001)


def test_warmup_then_cosine(nnopt, write_recipe, tmp_path):
    recipe = synthetic_recipe(schedule={"name": "cosine"}, warmup={"steps": 8, "start_factor": 0.1})
    recipe["trainer"]["log_every_n_steps"] = 1
    lrs = lr_by_step(run(nnopt, write_recipe, tmp_path, recipe))
    assert lrs[0] == pytest.approx(0.005)  # 0.1 * 0.05
    assert lrs[4] == pytest.approx(0.05 * (0.1 + 0.9 * 4 / 8))
    assert lrs[8] == pytest.approx(0.05)  # warmup done, cosine starts at the top
    assert lrs[47] < 0.001  # and ends near zero after 48 steps


def test_onecycle_cycles_lr_and_momentum(nnopt, write_recipe, tmp_path):
    recipe = synthetic_recipe(schedule={"name": "onecycle", "max_lr": 0.2, "pct_start": 0.25})
    recipe["trainer"]["log_every_n_steps"] = 1
    run_dir = run(nnopt, write_recipe, tmp_path, recipe)
    lrs = lr_by_step(run_dir)
    peak = max(lrs, key=lrs.get)
    assert lrs[peak] == pytest.approx(0.2, rel=0.05) and 8 <= peak <= 14
    assert lrs[0] == pytest.approx(0.2 / 25, rel=0.05)
    with open(run_dir / "01-train" / "logs" / "metrics.csv") as handle:
        momenta = {int(r["step"]): float(r["lr-SGD-momentum"]) for r in csv.DictReader(handle) if r.get("lr-SGD-momentum")}
    assert momenta[peak] == pytest.approx(0.85, abs=0.01) and momenta[0] == pytest.approx(0.95, abs=0.01)


def test_caffe_inv_schedule(nnopt, write_recipe, tmp_path):
    recipe = synthetic_recipe(schedule={"name": "inv", "gamma": 0.1, "power": 0.75})
    recipe["trainer"]["log_every_n_steps"] = 1
    lrs = lr_by_step(run(nnopt, write_recipe, tmp_path, recipe))
    assert lrs[10] == pytest.approx(0.05 * (1 + 0.1 * 10) ** -0.75)


def test_l1_term_shrinks_the_weights(nnopt, write_recipe, tmp_path):
    plain = load_model(run(nnopt, write_recipe, tmp_path / "a", synthetic_recipe()) / "01-train")
    l1 = load_model(run(nnopt, write_recipe, tmp_path / "b",
                        synthetic_recipe(regularization=[{"l1": 0.01, "params": ["fc1.weight"]}])) / "01-train")
    assert l1.fc1.weight.abs().sum() < 0.7 * plain.fc1.weight.abs().sum()
    # fc2 was not penalized: its norm stays in the same range
    assert l1.fc2.weight.abs().sum() > 0.5 * plain.fc2.weight.abs().sum()


@pytest.mark.parametrize("optimizer", [
    {"name": "adam", "lr": 0.01}, {"name": "adamw", "lr": 0.01}, {"name": "rmsprop", "lr": 0.003},
    {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
])
def test_every_optimizer_trains(nnopt, write_recipe, tmp_path, optimizer):
    run_dir = run(nnopt, write_recipe, tmp_path, synthetic_recipe(optimizer=optimizer))
    assert read_metrics(run_dir, "02-evaluate")["test_acc"] > 0.5


def test_mse_loss_and_label_smoothing_train(nnopt, write_recipe, tmp_path):
    # MSE on softmax outputs has small gradients (the seed article's Keras loss); it needs a larger lr.
    for i, (loss, lr) in enumerate([({"name": "mse"}, 1.0), ({"name": "cross_entropy", "label_smoothing": 0.1}, 0.05)]):
        recipe = synthetic_recipe(loss=loss, epochs=5, optimizer={"name": "sgd", "lr": lr, "momentum": 0.9})
        run_dir = run(nnopt, write_recipe, tmp_path / str(i), recipe)
        assert read_metrics(run_dir, "02-evaluate")["test_acc"] > 0.4


def test_steps_duration_and_early_stopping(nnopt, write_recipe, tmp_path):
    run_dir = run(nnopt, write_recipe, tmp_path / "a", synthetic_recipe(epochs=None, steps=20))
    assert read_metrics(run_dir, "01-train")["steps"] == 20
    stopped = synthetic_recipe(epochs=50, early_stopping={"monitor": "val_loss", "patience": 1, "min_delta": 10.0})
    metrics = read_metrics(run(nnopt, write_recipe, tmp_path / "b", stopped), "01-train")
    assert metrics["epochs"] < 50


def test_plateau_schedule_reduces_lr(nnopt, write_recipe, tmp_path):
    recipe = synthetic_recipe(epochs=6, schedule={"name": "reduce_on_plateau", "patience": 0, "factor": 0.5,
                                                  "threshold": 10.0})
    assert read_metrics(run(nnopt, write_recipe, tmp_path, recipe), "01-train")["final_lr"] < 0.05


def test_lr_finder_and_batch_size_finder(nnopt, write_recipe, tmp_path):
    recipe = synthetic_recipe(lr_finder={"num_steps": 20}, batch_size_finder={"max_trials": 2, "steps_per_trial": 1})
    metrics = read_metrics(run(nnopt, write_recipe, tmp_path, recipe), "01-train")
    assert 1e-6 <= metrics["lr_found"] <= 1.0
    assert metrics["batch_size_found"] > 32  # grown from the recipe's 32 (no memory limit on CPU)


def test_rerun_reuses_finished_stages(nnopt, write_recipe, tmp_path):
    recipe = synthetic_recipe()
    run_dir = run(nnopt, write_recipe, tmp_path, recipe)
    before = (run_dir / "01-train" / "model.pt").stat().st_mtime_ns
    code, out, _ = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert code == 0 and "reuse train" in out
    assert (run_dir / "01-train" / "model.pt").stat().st_mtime_ns == before
    torch.testing.assert_close(load_model(run_dir / "01-train").fc1.weight, load_model(run_dir / "02-evaluate").fc1.weight)


@pytest.mark.slow
def test_compiled_forward_trains_the_same_model(nnopt, write_recipe, tmp_path):
    """trainer.compile is an opt-in speed switch: same math, plain model in the artifact."""
    eager = synthetic_recipe(epochs=1)
    compiled = synthetic_recipe(epochs=1)
    compiled["trainer"]["compile"] = True
    a = run(nnopt, write_recipe, tmp_path / "a", eager)
    b = run(nnopt, write_recipe, tmp_path / "b", compiled)
    assert read_metrics(b, "01-train")["val_loss"] == pytest.approx(read_metrics(a, "01-train")["val_loss"], rel=1e-4)
    weights_a = torch.load(a / "01-train" / "model.pt", weights_only=True)
    weights_b = torch.load(b / "01-train" / "model.pt", weights_only=True)
    assert weights_a.keys() == weights_b.keys()  # no torch.compile wrapper in the saved model
    assert all(torch.allclose(weights_a[k], weights_b[k], atol=1e-4) for k in weights_a)


def test_fused_optimizer_only_rounds_differently(nnopt, write_recipe, tmp_path):
    """`implementation: fused` is the same update as the default foreach one, up to float rounding
    (tests/test_bench.py checks that foreach equals torch's default bit for bit)."""
    weights = {}
    for implementation in ("foreach", "fused"):
        optimizer = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4,
                     "implementation": implementation}
        run_dir = run(nnopt, write_recipe, tmp_path / implementation, synthetic_recipe(optimizer=optimizer))
        weights[implementation] = torch.load(run_dir / "01-train" / "model.pt", weights_only=True)
    assert all(torch.allclose(weights["foreach"][k], weights["fused"][k], atol=1e-4) for k in weights["foreach"])
