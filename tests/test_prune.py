"""One-shot pruning and fine-tuning on an MNIST subset: exact sparsity, masks that hold, artifacts that reload."""

from __future__ import annotations

import pytest
import torch

from runner.modelio import load_model
from runner.measure import named_weights
from tests.conftest import mnist_recipe, read_metrics, synthetic_recipe

SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9}


def run(nnopt, write_recipe, tmp_path, recipe, expect: int = 0):
    code, out, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert code == expect, err
    return tmp_path / "out" / recipe["name"], err


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    """train -> prune 92% global magnitude -> finetune (momentum, weight decay, L1) -> evaluate, run once."""
    import yaml

    from runner.cli import main

    tmp = tmp_path_factory.mktemp("pruned")
    recipe = mnist_recipe([
        {"name": "train", "kind": "train", "epochs": 2, "optimizer": SGD},
        {"name": "prune", "kind": "prune", "scope": "global", "sparsity": 0.92},
        # Users name parameters as they know them (`fc1.weight`), even once a mask parametrizes them.
        {"name": "finetune", "kind": "finetune", "epochs": 1, "optimizer": {**SGD, "lr": 0.01, "weight_decay": 5e-4},
         "regularization": [{"l1": 1e-5, "params": ["fc1.weight"]}]},
        {"name": "evaluate", "kind": "evaluate", "latency_repeats": 3},
    ], train_limit=4000)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "-O", str(tmp / "out")]) == 0
    return tmp / "out" / recipe["name"]


def test_global_magnitude_prune_reaches_the_target_exactly(pruned_run):
    metrics = read_metrics(pruned_run, "02-prune")
    assert metrics["sparsity_before"] == 0.0
    assert metrics["sparsity_after"] == pytest.approx(0.92, abs=1e-6)  # 266,200 weights: exact to one weight
    layers = metrics["layer_sparsity_after"]
    assert set(layers) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    # Global ranking prunes the big first layer hardest (Han et al. 2015 find the same order).
    assert layers["fc1.weight"] > layers["fc2.weight"] > layers["fc3.weight"]
    # The smallest kept weight is at least the largest pruned one: it really is magnitude order.
    train, pruned = load_model(pruned_run / "01-train"), load_model(pruned_run / "02-prune")
    before = torch.cat([named_weights(train)[n].flatten() for n in layers]).abs()
    after = torch.cat([named_weights(pruned)[n].flatten() for n in layers])
    assert before[after != 0].min() >= before[after == 0].max()


def test_finetune_keeps_pruned_weights_exactly_zero(pruned_run):
    pruned, tuned = load_model(pruned_run / "02-prune"), load_model(pruned_run / "03-finetune")
    for name in ("fc1", "fc2", "fc3"):
        mask = pruned.get_submodule(name).parametrizations.weight[0].mask
        stored = tuned.get_submodule(name).parametrizations.weight.original
        assert torch.equal(tuned.get_submodule(name).parametrizations.weight[0].mask, mask)
        assert not stored[~mask].any()  # the stored weights too: weight decay and momentum revived none
        assert not torch.equal(stored, pruned.get_submodule(name).parametrizations.weight.original)  # it trained
    assert read_metrics(pruned_run, "03-finetune")["layer_sparsity"] == read_metrics(pruned_run, "02-prune")[
        "layer_sparsity_after"]


def test_pruned_and_finetuned_model_is_accurate_and_reloads(pruned_run):
    metrics = read_metrics(pruned_run, "04-evaluate")
    assert metrics["test_acc"] > 0.90  # 8% of the weights, 4000 training images
    assert metrics["compression_rate"] > 10
    assert metrics["params_nonzero"] == round(266_200 * 0.08) + 410  # kept weights + dense biases
    model, example = load_model(pruned_run / "04-evaluate"), torch.randn(5, 1, 28, 28)
    again = load_model(pruned_run / "03-finetune")
    assert torch.equal(model(example), again(example))
    assert set(named_weights(model)) == {f"fc{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")}


def with_prune(**prune) -> dict:
    recipe = synthetic_recipe()
    recipe["stages"].insert(1, {"name": "prune", "kind": "prune", **prune})
    return recipe


def test_per_layer_targets_and_random_baseline(nnopt, write_recipe, tmp_path):
    recipe = with_prune(method="random", sparsity={"fc*": 0.5, "fc2": 0.25})  # later patterns override
    run_dir, _ = run(nnopt, write_recipe, tmp_path, recipe)
    layers = read_metrics(run_dir, "02-prune")["layer_sparsity_after"]
    assert layers == {"fc1.weight": 0.5, "fc2.weight": 0.25}  # 32x32 and 10x32: both exact
    trained, pruned = load_model(run_dir / "01-train"), load_model(run_dir / "02-prune")
    kept = named_weights(pruned)["fc1.weight"] != 0
    magnitude = named_weights(trained)["fc1.weight"].abs()
    assert magnitude[kept].min() < magnitude[~kept].max()  # random, not magnitude order


@pytest.mark.parametrize("prune, message", [
    ({"sparsity": 1.0}, "stages[1].sparsity: sparsity must be in [0, 1)"),
    ({"sparsity": {"fc1": -0.1}}, "sparsity of `fc1` must be in [0, 1)"),
    ({"sparsity": {"fc9": 0.5}}, "`fc9` matches no prunable layer"),
    ({"sparsity": 0.5, "params": ["*.wieght"]}, "`*.wieght` matches no parameter"),
    ({"sparsity": {"fc1": 0.5}, "scope": "global"}, "need `scope: layer`"),
    ({"sparsity": 0.5, "norm": "l2"}, "`norm` ranks neurons"),
])
def test_bad_prune_specs_are_located_errors(nnopt, write_recipe, prune, message):
    code, _, err = nnopt("validate", write_recipe(with_prune(**prune)))
    assert code == 2 and message in " ".join(err.split()), err
    assert "recipe.yaml:" in err


def test_pruning_below_existing_sparsity_fails_the_stage(nnopt, write_recipe, tmp_path):
    recipe = with_prune(sparsity=0.8)
    recipe["stages"].insert(2, {"name": "prune-less", "kind": "prune", "sparsity": 0.5})
    run_dir, err = run(nnopt, write_recipe, tmp_path, recipe, expect=2)  # validate refuses it before training
    assert "stages[2].sparsity: sparsity 0.5 is not above the 0.8 stage `prune` left" in " ".join(err.split())
    assert not run_dir.exists()


def test_finetune_after_evaluate_trains_in_train_mode(nnopt, write_recipe, tmp_path, recwarn):
    """evaluate leaves the model in eval mode; fine-tuning it so would switch dropout off and freeze BatchNorm."""
    recipe = with_prune(sparsity=0.5)
    recipe["model"]["args"].update(dropout=0.2, batchnorm=True)
    recipe["stages"].append({"name": "finetune", "kind": "finetune", "epochs": 1, "optimizer": SGD})
    run(nnopt, write_recipe, tmp_path, recipe)
    assert not [w for w in recwarn if "eval mode" in str(w.message)]
