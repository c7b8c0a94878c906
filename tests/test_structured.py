"""Structured pruning: neurons and channels physically removed, parity with the masked model, reloads."""

from __future__ import annotations

import pytest
import torch

from runner.modelio import load_model
from tests.conftest import mnist_recipe, read_metrics, synthetic_recipe
from tests.residual import residual_recipe

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
    kept = trained.fc1.weight.detach().norm(dim=1).topk(150).indices.sort().values
    assert torch.equal(load_model(run_dir / "02-slim").fc1.weight, trained.fc1.weight[kept])
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
    recipe = synthetic_recipe(epochs=1, allow_chance_accuracy=True)  # one short epoch: parity is the point here
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


def _norms(rows: list[torch.Tensor], norm: str) -> torch.Tensor:
    """Each channel's norm over the output rows of every layer that writes it."""
    flat = torch.cat([r.detach().flatten(1) for r in rows], dim=1)
    return flat.abs().sum(dim=1) if norm == "l1" else flat.norm(dim=1)


def _largest(scores: torch.Tensor, fraction_removed: float) -> torch.Tensor:
    kept = len(scores) - round(fraction_removed * len(scores))
    return scores.topk(kept).indices.sort().values


@pytest.mark.parametrize("norm, sparsity", [
    ("l1", 0.3),  # every group
    ("l2", {"conv1": 0.3, "layers.*.conv1": 0.3}),  # the first stage's residual stream and each block's inner conv
])
def test_resnet20_channels_removed_through_the_dependency_graph(nnopt, write_recipe, tmp_path, norm, sparsity):
    """Channels added together across residual connections go as one group, ranked by the norm of all
    the weights that write them; the slimmed network equals the original with those channels zeroed."""
    recipe = residual_recipe("resnet20_slim", [
        {"name": "slim", "kind": "prune", "granularity": "neurons", "norm": norm, "sparsity": sparsity},
        {"name": "evaluate", "kind": "evaluate", "latency_repeats": 3}], train_epochs=1)
    run_dir, _ = run(nnopt, write_recipe, tmp_path, recipe)
    slim = read_metrics(run_dir, "02-slim")
    assert slim["parity_max_abs_diff"] <= 1e-4
    assert slim["coupled_layers"]["conv1"] == ["layers.0.conv2", "layers.1.conv2", "layers.2.conv2"]
    targeted = {"conv1", *(f"layers.{i}.conv1" for i in range(9))}
    if sparsity == 0.3:
        targeted |= {"layers.3.conv2", "layers.6.conv2"}  # the second and third stages' streams
    assert set(slim["widths_before"]) == targeted
    assert all(slim["widths_after"][n] == w - round(0.3 * w) for n, w in slim["widths_before"].items())
    assert slim["params_total"] < 0.8 * slim["params_total_before"]

    trained, slimmed = load_model(run_dir / "01-train"), load_model(run_dir / "02-slim")
    stem = _largest(_norms([trained.conv1.weight] + [trained.layers[i].conv2.weight for i in range(3)], norm), 0.3)
    inner = _largest(_norms([trained.layers[0].conv1.weight], norm), 0.3)
    assert torch.equal(slimmed.conv1.weight, trained.conv1.weight[stem])
    assert torch.equal(slimmed.layers[0].conv1.weight, trained.layers[0].conv1.weight[inner][:, stem])
    assert torch.equal(slimmed.layers[0].conv2.weight, trained.layers[0].conv2.weight[stem][:, inner])
    assert slimmed.layers[3].shortcut[0].in_channels == slimmed.layers[3].conv1.in_channels == len(stem)

    # the reloaded model is the one the next stage got in memory: the same test accuracy to the example
    from runner.data.synthetic import synthetic

    images, labels = synthetic(**recipe["data"]["args"]).test
    with torch.inference_mode():
        accuracy = float((slimmed.eval()(images).argmax(1) == labels).float().mean())
    assert accuracy == pytest.approx(read_metrics(run_dir, "03-evaluate")["test_acc"])


@pytest.mark.parametrize("builder", ["resnet18", "mobilenet_v2"])
def test_torchvision_networks_slim_and_replay(builder):
    """Projections, depthwise convolutions and inverted residuals: parity, then a fresh model rebuilt
    from the recorded transform loads the slimmed state dict strictly and computes the same."""
    import torchvision

    from runner.recipe.stages import PruneStage
    from runner.slimming import prune_neurons
    from runner.transforms import replay, transforms_of

    torch.manual_seed(0)
    model = getattr(torchvision.models, builder)(num_classes=4)
    example = torch.randn(2, 3, 32, 32)
    spec = PruneStage(name="slim", kind="prune", granularity="neurons", sparsity=0.5, norm="l2")
    metrics = prune_neurons(spec, model, example, torch.Generator().manual_seed(0))
    slimmed = metrics["model"].eval()
    assert metrics["parity_max_abs_diff"] <= 1e-4 and metrics["params_total"] < 0.4 * metrics["params_total_before"]
    fresh = replay(getattr(torchvision.models, builder)(num_classes=4), transforms_of(slimmed))
    fresh.load_state_dict(slimmed.state_dict())
    with torch.inference_mode():
        assert torch.equal(fresh.eval()(example), slimmed(example))


def test_unsupported_graphs_and_bad_targets_are_refused(nnopt, write_recipe, tmp_path):
    coupled = residual_recipe("coupled", [{"name": "slim", "kind": "prune", "granularity": "neurons",
                                           "sparsity": {"layers.1.conv2": 0.5}}], train_epochs=0)
    _, err = run(nnopt, write_recipe, tmp_path / "a", coupled, expect=1)
    assert "`layers.1.conv2` names `layers.1.conv2`, whose output channels are coupled to those of `conv1`" in err
    assert "target the group by its first layer, `conv1`" in err

    logits = residual_recipe("logits", [{"name": "slim", "kind": "prune", "granularity": "neurons",
                                         "sparsity": {"fc": 0.5}}], train_epochs=0)
    _, err = run(nnopt, write_recipe, tmp_path / "b", logits, expect=2)  # refused by validate, before training
    assert "`fc` matches no layer whose channels can be removed" in err and "`fc` produces the model's outputs" in err

    masked = residual_recipe("masked", [{"name": "weights", "kind": "prune", "sparsity": 0.5},
                                        {"name": "slim", "kind": "prune", "granularity": "neurons", "sparsity": 0.5}],
                             train_epochs=0)
    _, err = run(nnopt, write_recipe, tmp_path / "c", masked, expect=1)
    assert "structured pruning cannot follow this model: it carries pruning masks" in err

    outputs = synthetic_recipe()
    outputs["stages"] = [{"name": "slim", "kind": "prune", "granularity": "neurons", "sparsity": {"fc2": 0.5}}]
    _, err = run(nnopt, write_recipe, tmp_path / "d", outputs, expect=2)
    assert "`fc2` matches no layer whose neurons can be removed" in err and "`fc2` produces the model's outputs" in err

    everything = synthetic_recipe()
    everything["model"]["args"]["hidden"] = [2]
    everything["stages"] = [{"name": "slim", "kind": "prune", "granularity": "neurons", "sparsity": 0.9}]
    _, err = run(nnopt, write_recipe, tmp_path / "e", everything, expect=2)
    assert "would remove every neuron of `fc1` (2 of 2)" in err


def test_a_slimmed_resnet_quantizes_and_both_transforms_replay():
    """channels, then int8 through FX: a fresh resnet20 replays both and loads the int8 state dict strictly."""
    import io

    from runner.compress import int8
    from runner.models import MODELS
    from runner.recipe.stages import PruneStage
    from runner.slimming import prune_neurons
    from runner.transforms import replay, transforms_of

    torch.manual_seed(0)
    example = torch.randn(8, 3, 16, 16)
    spec = PruneStage(name="slim", kind="prune", granularity="neurons", sparsity=0.3)
    slimmed = prune_neurons(spec, MODELS.get("resnet20")(width=8, num_classes=4).eval(), example,
                            torch.Generator())["model"].eval()
    prepared, layout = int8.prepare(slimmed, qat=False, weights="per_channel", example=example)
    prepared(example)
    quantized = int8.finish_static(int8.convert(prepared, example), slimmed, method="static_int8",
                                   weights="per_channel", observer="minmax", layout=layout)
    assert [t["kind"] for t in transforms_of(quantized)] == ["channels", "int8"]
    saved = io.BytesIO()
    torch.save(quantized.state_dict(), saved)
    saved.seek(0)
    fresh = replay(MODELS.get("resnet20")(width=8, num_classes=4), transforms_of(quantized))
    fresh.load_state_dict(torch.load(saved, weights_only=True))
    assert fresh.conv1.weight().shape[0] == slimmed.conv1.out_channels == 8 - round(0.3 * 8)
    with torch.inference_mode():
        assert torch.equal(fresh(example), quantized(example))


@pytest.mark.parametrize("norm, kept", [(None, [0, 1, 2]), ("l1", [0, 1, 2]), ("l2", [1, 3, 5])])
def test_the_largest_rows_by_the_chosen_norm_stay(norm, kept):
    """Rows whose l1 and l2 rankings disagree: the kept rows are exactly the largest by the chosen norm
    (l1 when none is given), so keeping the smallest rows or mixing up the norms changes the selection."""
    from runner.models.mlp import mlp
    from runner.recipe.stages import PruneStage
    from runner.slimming import prune_neurons

    torch.manual_seed(0)
    model = mlp(hidden=[6, 5], in_features=4, num_classes=3)
    rows = torch.tensor([[1.0, 1.0, 1.0, 1.0],  # l1 4.0, l2 2.0
                         [3.0, 0.0, 0.0, 0.0],  # l1 3.0, l2 3.0
                         [0.9, 0.9, 0.9, 0.9],  # l1 3.6, l2 1.8
                         [0.0, -2.5, 0.0, 0.0],  # l1 2.5, l2 2.5
                         [0.1, 0.0, 0.0, 0.0],  # l1 0.1, l2 0.1
                         [0.0, 0.0, 2.2, 0.0]])  # l1 2.2, l2 2.2
    with torch.no_grad():
        model.fc1.weight.copy_(rows)
    fc2_before = model.fc2.weight.detach().clone()
    spec = PruneStage(name="slim", kind="prune", granularity="neurons", sparsity={"fc1": 0.5}, norm=norm)
    slimmed = prune_neurons(spec, model, torch.randn(8, 4), torch.Generator().manual_seed(0))["model"]
    assert torch.equal(slimmed.fc1.weight, rows[kept])
    assert torch.equal(slimmed.fc2.weight, fc2_before[:, kept])  # the next layer reads the same neurons
