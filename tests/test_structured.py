"""Structured pruning: neurons and channels physically removed, parity with the masked model, reloads."""

from __future__ import annotations

import pytest
import torch

from runner.modelio import load_model
from tests.conftest import mnist_recipe, read_metrics, synthetic_recipe

SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9}


def run(nnopt, write_recipe, tmp_path, recipe, expect: int = 0):
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert code == expect, err
    return tmp_path / "out" / recipe["name"], " ".join(err.split())


def test_half_the_neurons_of_lenet300_removed_then_finetuned(nnopt, write_recipe, tmp_path):
    recipe = mnist_recipe([
        {"name": "train", "kind": "train", "epochs": 2, "optimizer": SGD},
        {"name": "slim", "kind": "prune", "granularity": "neurons", "norm": "l2", "sparsity": {"fc1": 0.5, "fc2": 0.5}},
        {"name": "finetune", "kind": "finetune", "epochs": 1, "optimizer": {**SGD, "lr": 0.01}},
        {"name": "evaluate", "kind": "evaluate", "latency_repeats": 3},
    ], train_limit=3000)
    run_dir, _ = run(nnopt, write_recipe, tmp_path, recipe)
    slim = read_metrics(run_dir, "02-slim")
    assert slim["widths_before"] == {"fc1": 300, "fc2": 100} and slim["widths_after"] == {"fc1": 150, "fc2": 50}
    assert slim["params_total"] == 784 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10  # really smaller
    assert slim["params_total_before"] == 266_610 and slim["model_bytes"] < 0.5 * slim["model_bytes_before"]
    assert slim["parity_max_abs_diff"] <= 1e-4
    assert slim["latency_ms_b1"] > 0 and slim["latency_ms_b256_before"] > 0
    # the kept neurons are the largest by L2 norm of their weight row
    trained = load_model(run_dir / "01-train")
    norms = trained.fc1.weight.detach().norm(dim=1)
    assert norms.topk(150).values.min() > norms.topk(150, largest=False).values.max() - 1e-6
    evaluate = read_metrics(run_dir, "04-evaluate")
    assert evaluate["test_acc"] > 0.8 and evaluate["params_total"] == slim["params_total"]
    model, example = load_model(run_dir / "04-evaluate"), torch.randn(7, 1, 28, 28)
    assert model.fc1.out_features == 150 and model.fc2.in_features == 150 and model.fc3.in_features == 50
    assert torch.equal(model(example), load_model(run_dir / "03-finetune")(example))


@pytest.mark.parametrize("model, shape", [
    ({"name": "mlp", "args": {"hidden": [48, 24], "in_features": 32, "batchnorm": True, "activation": "sigmoid"}}, [32]),
    ({"name": "lenet5"}, [1, 28, 28]),
])
def test_slimming_matches_the_masked_model(nnopt, write_recipe, tmp_path, model, shape):
    """BatchNorm shrinks along; a removed neuron's constant output (sigmoid(0), BN's shift) is folded into
    the next layer's bias; conv channels feeding a Linear through Flatten remove whole column blocks."""
    recipe = synthetic_recipe(epochs=1)
    recipe["model"] = model
    recipe["data"]["args"].update(shape=shape, num_train=256, num_test=64)  # 64: the probe batch it times
    recipe["stages"].insert(1, {"name": "slim", "kind": "prune", "granularity": "neurons", "sparsity": 0.4,
                                "parity_tolerance": 1e-5})
    run_dir, _ = run(nnopt, write_recipe, tmp_path, recipe)
    slim = read_metrics(run_dir, "02-slim")
    assert slim["parity_max_abs_diff"] <= 1e-5
    assert all(slim["widths_after"][n] == round(w * 0.6) for n, w in slim["widths_before"].items())
    assert slim["params_total"] < 0.7 * slim["params_total_before"]
    reloaded, example = load_model(run_dir / "02-slim"), torch.randn(3, *shape)
    assert torch.equal(reloaded.eval()(example), load_model(run_dir / "03-evaluate").eval()(example))


def test_unsupported_graphs_and_bad_targets_are_refused(nnopt, write_recipe, tmp_path):
    resnet = synthetic_recipe()
    resnet["model"] = {"name": "resnet20"}
    resnet["data"]["args"].update(shape=[3, 8, 8])
    resnet["stages"] = [{"name": "slim", "kind": "prune", "granularity": "neurons", "sparsity": 0.5}]
    _, err = run(nnopt, write_recipe, tmp_path / "a", resnet, expect=1)
    assert "structured pruning cannot follow this model: the model is a `ResNet`" in err
    assert "residual connections are not supported" in err

    outputs = synthetic_recipe()
    outputs["stages"] = [{"name": "slim", "kind": "prune", "granularity": "neurons", "sparsity": {"fc2": 0.5}}]
    _, err = run(nnopt, write_recipe, tmp_path / "b", outputs, expect=1)
    assert "`fc2` matches no layer whose neurons can be removed" in err and "`fc2` produces the model's outputs" in err

    everything = synthetic_recipe()
    everything["model"]["args"]["hidden"] = [2]
    everything["stages"] = [{"name": "slim", "kind": "prune", "granularity": "neurons", "sparsity": 0.9}]
    _, err = run(nnopt, write_recipe, tmp_path / "c", everything, expect=1)
    assert "would remove every neuron of `fc1` (2 of 2)" in err
