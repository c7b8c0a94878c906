"""The quantize stage on MNIST subsets: int8 accuracy, real int8 storage, reload, weight sharing, QAT, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from runner.modelio import MODEL_WEIGHTS, load_model, load_packed

from runner.data.mnist import mnist
from runner.models.mlp import mlp
from tests.conftest import mnist_recipe, read_metrics

TRAIN = {"name": "train", "kind": "train", "epochs": 2, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}}
EVALUATE = {"name": "evaluate", "kind": "evaluate", "latency_batch_sizes": [1, 64], "latency_repeats": 3,
            "latency_warmup": 1}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    """One output folder for the module: recipes sharing the `train` stage reuse its artifact."""
    return tmp_path_factory.mktemp("runs")


def _run(nnopt, write_recipe, out_dir, stages, train=TRAIN, **top):
    recipe = mnist_recipe([train, *stages], train_limit=3000, **top)
    code, out, err = nnopt("run", write_recipe(recipe), "-O", out_dir)
    return code, out_dir / recipe["name"], err


def _test_images(count=200):
    return mnist().test[0][:count]


def _int8_weights(state: dict) -> list[torch.Tensor]:
    return [v[0] for k, v in state.items() if k.endswith("_packed_params._packed_params")]


def test_dynamic_int8_keeps_accuracy_stores_int8_and_reloads_exactly(nnopt, write_recipe, out_dir):
    code, run_dir, err = _run(nnopt, write_recipe, out_dir, [{"name": "int8", "kind": "quantize",
                                                              "method": "dynamic_int8"}, EVALUATE])
    assert code == 0, err
    quant = read_metrics(run_dir, "02-int8")
    assert quant["val_acc_before"] > 0.85 and abs(quant["val_acc_drop"]) <= 0.01
    state = torch.load(run_dir / "02-int8" / MODEL_WEIGHTS, weights_only=True)
    weights = _int8_weights(state)
    assert len(weights) == 3 and all(w.dtype == torch.qint8 for w in weights)
    fp32 = (run_dir / "01-train" / MODEL_WEIGHTS).stat().st_size
    assert (run_dir / "02-int8" / MODEL_WEIGHTS).stat().st_size < 0.3 * fp32
    assert quant["packed_bytes"] == (run_dir / "02-int8" / "model.dcz").stat().st_size
    assert quant["size_ratio"] == pytest.approx(quant["dense_fp32_bytes"] / quant["packed_bytes"], rel=1e-3)

    reloaded, unpacked = load_model(run_dir / "02-int8"), load_packed(run_dir / "02-int8" / "model.dcz")
    images = _test_images()
    assert torch.equal(reloaded(images), unpacked(images))
    evaluation = read_metrics(run_dir, "03-evaluate")
    assert {"latency_ms_b1", "latency_fp32_ms_b1", "latency_ratio_b1", "latency_ratio_b64"} <= evaluation.keys()
    assert evaluation["params_total"] == 266610  # int8 layers are counted, not skipped


def test_static_int8_on_lenet5_per_channel_histogram(nnopt, write_recipe, out_dir):
    static = {"name": "int8", "kind": "quantize", "method": "static_int8", "calibration_batches": 8,
              "observer": "histogram", "weights": "per_channel"}
    train = dict(TRAIN, optimizer={"name": "sgd", "lr": 0.02, "momentum": 0.9})
    code, run_dir, err = _run(nnopt, write_recipe, out_dir, [static], train=train, name="lenet5_static",
                              model={"name": "lenet5"})
    assert code == 0, err
    quant = read_metrics(run_dir, "02-int8")
    assert quant["val_acc_before"] > 0.85 and abs(quant["val_acc_drop"]) <= 0.01
    assert quant["calibration_examples"] == 8 * 64
    state = torch.load(run_dir / "02-int8" / MODEL_WEIGHTS, weights_only=True)
    conv = state["module.conv1.weight"]
    assert conv.dtype == torch.qint8 and conv.qscheme() == torch.per_channel_affine
    assert conv.q_per_channel_scales().numel() == 20 and not conv.q_per_channel_zero_points().any()  # symmetric
    model = load_model(run_dir / "02-int8")
    images = _test_images()
    assert torch.equal(model(images), load_packed(run_dir / "02-int8" / "model.dcz")(images))


def test_weight_sharing_bounds_distinct_values_and_packs_smaller(nnopt, write_recipe, out_dir):
    share = {"name": "share", "kind": "quantize", "method": "weight_sharing", "bits": {"fc1.*": 4, "fc*": 5},
             "finetune": {"epochs": 1, "optimizer": {"name": "adam", "lr": 1e-4}}}
    code, run_dir, err = _run(nnopt, write_recipe, out_dir, [share, EVALUATE], name="shared")
    assert code == 0, err
    quant = read_metrics(run_dir, "02-share")
    assert quant["layer_bits"] == {"fc1.weight": 4, "fc2.weight": 5, "fc3.weight": 5}
    assert quant["distinct_values"]["fc1.weight"] <= 16
    assert quant["distinct_values"]["fc2.weight"] <= 32 and quant["distinct_values"]["fc3.weight"] <= 32
    assert abs(quant["val_acc_drop"]) <= 0.02
    # 4-5 bit indices, Huffman-coded: at least 6x below the dense fp32 artifact
    assert quant["size_ratio"] > 6
    images = _test_images()
    unpacked = load_packed(run_dir / "02-share" / "model.dcz")
    assert torch.equal(unpacked(images), load_model(run_dir / "02-share")(images))
    assert read_metrics(run_dir, "03-evaluate")["packed_bytes"] == quant["packed_bytes"]


def test_qat_freezes_observers_and_converts_to_int8(nnopt, write_recipe, out_dir):
    qat = {"name": "qat", "kind": "quantize", "method": "qat", "epochs": 1,
           "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}, "freeze_observers_after": {"epochs": 0.5}}
    code, run_dir, err = _run(nnopt, write_recipe, out_dir, [qat], name="qat")
    assert code == 0, err
    quant = read_metrics(run_dir, "02-qat")
    assert quant["observers_frozen_at_step"] == round(0.5 * quant["steps"])
    assert quant["val_acc_drop"] <= 0.01
    weights = _int8_weights(torch.load(run_dir / "02-qat" / MODEL_WEIGHTS, weights_only=True))
    assert len(weights) == 3 and all(w.dtype == torch.qint8 for w in weights)


@pytest.mark.parametrize("stage, message", [
    ({"method": "weight_sharing", "bits": 9}, "less than or equal to 8"),
    ({"method": "static_int8"}, "missing required field `calibration_batches`"),
    ({"method": "weight_sharing", "bits": {"conv*": 4}}, "`conv*` matches no parameter"),
    ({"method": "int4"}, "unknown method `int4`"),
])
def test_bad_quantize_settings_are_located(nnopt, write_recipe, stage, message):
    recipe = mnist_recipe([{"name": "q", "kind": "quantize", **stage}])
    code, _, err = nnopt("validate", write_recipe(recipe))
    assert code == 2 and message in err and "recipe.yaml:" in err


@pytest.mark.parametrize("method", ["static_int8", "qat"])
def test_int8_of_a_residual_network_fails_clearly(nnopt, write_recipe, tmp_path, method):
    stage = {"name": "q", "kind": "quantize", "method": method}
    stage.update({"calibration_batches": 1} if method == "static_int8" else
                 {"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01}})
    recipe = {"name": "res", "model": {"name": "resnet20", "args": {"width": 4}},
              "data": {"name": "synthetic", "batch_size": 8,
                       "args": {"shape": [3, 8, 8], "num_train": 16, "num_val": 8, "num_test": 8}},
              "trainer": {"progress_bar": False}, "stages": [stage]}
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 1
    assert f"{method} cannot quantize this model" in err and "aten::add" in err
    assert not (tmp_path / "res" / "01-q" / "logs").exists()  # QAT failed before any training


@pytest.mark.parametrize("model", [
    mlp(hidden=[16], in_features=8, batchnorm=True),  # fused Linear+BatchNorm (LinearBn1d)
    nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)),
], ids=["linear_bn", "conv_bn"])
def test_freezing_batchnorm_stops_its_statistics(model):
    from runner.compress import int8

    prepared, _ = int8.prepare(model, qat=True, weights="per_tensor")
    prepared.train()
    example = torch.randn(32, 8) if isinstance(model[1], nn.Linear) else torch.randn(32, 1, 8, 8)
    prepared(example)
    int8.freeze_batchnorm(prepared)
    before = {k: v.clone() for k, v in prepared.state_dict().items() if "running_mean" in k}
    assert before
    prepared(example * 3 + 1)
    after = {k: v for k, v in prepared.state_dict().items() if "running_mean" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
