"""Int8 with layers left in float: named in `skip`, or chosen under an accuracy-drop budget (the most sensitive
layers back to float one by one, each step measured); a plain recipe with the chosen `skip` reproduces the model;
residual networks through FX; dynamic int8."""

from __future__ import annotations

import pytest
import torch
import torch.ao.nn.intrinsic as nni
from torch import nn
from torch.ao.nn import quantized as nnq
from torch.ao.nn.quantized import dynamic as nnqd

from runner.modelio import load_model, load_packed
from tests.conftest import read_metrics, synthetic_recipe
from tests.residual import residual_recipe

# Per-tensor min/max ranges from one batch: coarse enough that int8 costs this small MLP some accuracy.
STATIC = {"name": "int8", "kind": "quantize", "method": "static_int8", "calibration_batches": 1, "observer": "minmax",
          "weights": "per_tensor"}


def _float_layers(model: nn.Module) -> list[str]:
    """Float Linear/Conv layers by the float model's names (a fused Linear+ReLU holds its Linear as child `0`)."""
    fused = {name for name, module in model.named_modules() if isinstance(module, nni._FusedModule)}
    return [name.removesuffix(".0") if name.removesuffix(".0") in fused else name
            for name, module in model.named_modules() if type(module) in (nn.Linear, nn.Conv2d)]


def _recipe(int8: dict) -> dict:
    recipe = synthetic_recipe(epochs=3)
    recipe["model"]["args"]["hidden"] = [64, 32]
    scan = {"name": "scan", "kind": "sensitivity", "examples": 128, "sparsities": [0.5], "bits": [2]}
    recipe["stages"] = [recipe["stages"][0], scan, {**STATIC, **int8}]
    return recipe


def test_a_drop_budget_leaves_the_most_sensitive_layers_in_float_and_skip_reproduces_it(nnopt, write_recipe, tmp_path):
    path = write_recipe(_recipe({"max_accuracy_drop": 0.0}))
    code, _, err = nnopt("run", path, "-O", tmp_path)
    assert code == 0, err
    run_dir = tmp_path / "tiny"
    metrics = read_metrics(run_dir, "03-int8")
    chosen = metrics["allocation"]
    assert chosen["steps"][0] == {"float": [], "drop": pytest.approx(2 / 128)}  # all in int8: over the budget
    alone = chosen["drop_with_alone_in_float"]  # measured here: one model per layer with it alone in float
    assert set(alone) == {"fc1", "fc2", "fc3"} and chosen["sensitivity"] == "measured here"
    order = sorted(alone, key=alone.get)
    assert [step["float"] for step in chosen["steps"][1:]] == [order[:k] for k in range(1, len(chosen["steps"]))]
    assert chosen["measured_drop"] == chosen["steps"][-1]["drop"] == metrics["val_acc_drop"] <= 0.0
    assert all(step["drop"] > 0 for step in chosen["steps"][:-1])  # it stopped at the first step within budget
    assert chosen["float_layers"] == chosen["steps"][-1]["float"]
    model = load_model(run_dir / "03-int8")
    assert _float_layers(model) == chosen["float_layers"]
    assert len([m for m in model.modules() if isinstance(m, nnq.Linear)]) == 3 - len(chosen["float_layers"])
    assert f"`int8`: `{chosen['reproduce']}`" in (run_dir / "report.md").read_text()

    # the plain recipe's `skip` makes the same model without a search
    skip = "[" + ",".join(chosen["float_layers"]) + "]"
    code, _, err = nnopt("run", path, "-O", tmp_path / "plain", "-o", "stages.int8.max_accuracy_drop=null",
                         "-o", f"stages.int8.skip={skip}")
    assert code == 0, err
    plain = read_metrics(tmp_path / "plain" / "tiny", "03-int8")
    assert "allocation" not in plain and plain["val_acc"] == metrics["val_acc"]
    auto_state = torch.load(run_dir / "03-int8" / "model.pt", weights_only=True)
    plain_state = torch.load(tmp_path / "plain" / "tiny" / "03-int8" / "model.pt", weights_only=True)
    assert auto_state.keys() == plain_state.keys()
    for key, value in auto_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value.dequantize() if value.is_quantized else value,
                               plain_state[key].dequantize() if value.is_quantized else plain_state[key]), key

def test_skipped_layers_of_a_residual_network_stay_float_and_reload_exactly(nnopt, write_recipe, tmp_path):
    skip = ["conv1", "layers.3.shortcut.0", "fc"]  # the stem, a projection shortcut, the classifier
    recipe = residual_recipe("resnet20_mixed", [{**STATIC, "calibration_batches": 4, "skip": skip}])
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 0, err
    run_dir = tmp_path / recipe["name"]
    metrics = read_metrics(run_dir, "02-int8")
    assert metrics["val_acc_before"] > 0.5 and metrics["val_acc_drop"] <= 0.04
    model = load_model(run_dir / "02-int8")
    assert sorted(_float_layers(model)) == sorted(skip)
    assert len([m for m in model.modules() if isinstance(m, nnq.Conv2d)]) == 21 - 2
    from runner.data.synthetic import synthetic

    images, labels = synthetic(**recipe["data"]["args"]).val
    with torch.inference_mode():
        assert torch.equal(model(images), load_packed(run_dir / "02-int8" / "model.dcz")(images))
        assert float((model(images).argmax(1) == labels).float().mean()) == pytest.approx(metrics["val_acc"])


@pytest.mark.slow
def test_a_sensitivity_scan_gives_the_order_layers_go_back_to_float(nnopt, write_recipe, tmp_path):
    """The scan's int8 accuracies order the layers instead of one measurement per layer: the largest
    simulated drop first."""
    code, _, err = nnopt("run", write_recipe(_recipe({"max_accuracy_drop": 0.0, "sensitivity": "scan"})), "-O", tmp_path)
    assert code == 0, err
    ordered = read_metrics(tmp_path / "tiny", "03-int8")["allocation"]
    drops = ordered["int8_drop_alone"]
    scan = read_metrics(tmp_path / "tiny", "02-scan")
    assert drops == {layer: pytest.approx(scan["val_acc"] - scan["int8_acc"][f"{layer}.weight"]) for layer in drops}
    assert ordered["sensitivity"] == "scan" and "drop_with_alone_in_float" not in ordered
    assert ordered["steps"][1]["float"] == [max(drops, key=drops.get)] and ordered["measured_drop"] <= 0.0


def test_dynamic_int8_leaves_skipped_linear_layers_in_float(nnopt, write_recipe, tmp_path):
    recipe = synthetic_recipe(epochs=2)
    recipe["model"]["args"]["hidden"] = [64, 32]
    recipe["stages"] = [recipe["stages"][0], {"name": "int8", "kind": "quantize", "method": "dynamic_int8",
                                              "skip": ["fc1"]}]
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 0, err
    model = load_model(tmp_path / "tiny" / "02-int8")
    assert _float_layers(model) == ["fc1"]
    assert [n for n, m in model.named_modules() if isinstance(m, nnqd.Linear)] == ["fc2", "fc3"]


@pytest.mark.parametrize("int8, message", [
    ({"sensitivity": "scan"}, "set `max_accuracy_drop` or drop `sensitivity`"),
    ({"max_accuracy_drop": 0.01, "sensitivity": "train"}, "stage `train` is a train stage, not a sensitivity stage"),
    ({"max_accuracy_drop": 0.01, "sensitivity": "scna"}, "stages[2].sensitivity: the recipe has no stage `scna`"),
    ({"skip": ["fc1", "fc1"]}, "`skip` names a layer twice"),
])
def test_mixed_precision_mistakes_are_located_validate_errors(nnopt, write_recipe, int8, message):
    code, _, err = nnopt("validate", write_recipe(_recipe(int8)))
    assert code == 2
    assert message in " ".join(err.split()) and "recipe.yaml:" in err


def test_skipping_a_layer_the_model_lacks_is_refused_before_training_with_the_close_names(nnopt, write_recipe,
                                                                                          tmp_path):
    recipe = _recipe({"skip": ["fc4"]})
    del recipe["stages"][1]
    path = write_recipe(recipe)
    code, _, err = nnopt("run", path, "-O", tmp_path)
    assert code == 2 and not (tmp_path / "tiny").exists()  # the dry build found it: nothing trained
    assert (f"{path}:" in err and "stages[1].skip[0]: `fc4` is no layer of the model that static_int8 quantizes"
            in " ".join(err.split()) and "did you mean `fc3`, `fc2` or `fc1`?" in err)


@pytest.mark.slow
def test_a_drop_budget_on_a_torchvision_resnet18(nnopt, write_recipe, tmp_path):
    stage = {**STATIC, "calibration_batches": 4, "weights": "per_channel", "skip": ["conv1"], "max_accuracy_drop": 0.0}
    recipe = residual_recipe("resnet18_mixed", [stage], model={"torchvision": "resnet18", "args": {"num_classes": 4}},
                             shape=[3, 32, 32])
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 0, err
    run_dir = tmp_path / recipe["name"]
    metrics = read_metrics(run_dir, "02-int8")
    chosen = metrics["allocation"]
    assert chosen["steps"][0]["float"] == ["conv1"] and chosen["float_layers"][0] == "conv1"
    assert chosen["measured_drop"] == metrics["val_acc_drop"] <= 0.0
    model = load_model(run_dir / "02-int8")
    assert sorted(_float_layers(model)) == sorted(chosen["float_layers"])
    from runner.data.synthetic import synthetic

    images, _ = synthetic(**recipe["data"]["args"]).val
    with torch.inference_mode():
        assert torch.equal(model(images), load_packed(run_dir / "02-int8" / "model.dcz")(images))
