"""The quantize stage: int8 accuracy, real int8 storage, reload, weight sharing, QAT, residual networks, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from runner.modelio import MODEL_WEIGHTS, load_model, load_packed

from runner.data.mnist import mnist
from runner.models import MODELS
from runner.models.mlp import mlp
from tests.conftest import mnist_recipe, read_metrics
from tests.residual import residual_recipe

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
             "finetune": {"epochs": 1, "optimizer": {"name": "adam", "lr": 1e-4}}, "floats": "float16"}
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
    # floats: float16 rounded the codebooks and biases after fine-tuning, and the packer stored them so
    floats = {k: v for k, v in unpacked.state_dict().items() if v.is_floating_point()}
    assert floats and all(torch.equal(v.half().float(), v) for v in floats.values())
    assert quant["packed_breakdown"]["streams"]["biases"] <= 2 * (300 + 100 + 10) + 16
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
    assert code == 2 and message in " ".join(err.split()) and "recipe.yaml:" in err  # rich wraps long lines


def _int8_stage(method: str) -> dict:
    if method == "static_int8":
        return {"name": "int8", "kind": "quantize", "method": method, "calibration_batches": 4, "weights": "per_channel"}
    return {"name": "int8", "kind": "quantize", "method": method, "epochs": 1,
            "optimizer": {"name": "sgd", "lr": 0.005, "momentum": 0.9},
            "freeze_observers_after": {"epochs": 0.5}, "freeze_batchnorm_after": {"epochs": 0.5}}


def _check_residual_int8(run_dir, recipe: dict, convs: int, additions: int) -> dict:
    """Every conv runs int8 weights, each residual `+` is quantized::add_relu, the int8 model agrees with the
    float one on the calibration data, and both reload paths (folder, packed .dcz) give the stage's accuracy."""
    from torch.ao.nn import quantized as nnq

    from runner.data.synthetic import synthetic

    quant = read_metrics(run_dir, "02-int8")
    assert quant["val_acc_before"] > 0.5 and quant["val_acc_drop"] <= 0.04  # 4 classes: chance is 0.25
    model = load_model(run_dir / "02-int8")
    int8_convs = [m for m in model.modules() if isinstance(m, nnq.Conv2d)]
    assert len(int8_convs) == convs and all(m.weight().dtype == torch.qint8 for m in int8_convs)
    assert not [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]  # nothing left in float
    nodes = [node.target for node in model.graph.nodes]
    assert nodes.count(torch.ops.quantized.add_relu) == additions

    data = synthetic(**recipe["data"]["args"])
    images = data.train[0][:128]  # the calibration batches
    fp32 = load_model(run_dir / "01-train").eval()
    with torch.inference_mode():
        agreement = float((fp32(images).argmax(1) == model(images).argmax(1)).float().mean())
        assert agreement >= 0.9, agreement
        assert torch.equal(model(images), load_packed(run_dir / "02-int8" / "model.dcz")(images))
        val_images, val_labels = data.val
        assert float((model(val_images).argmax(1) == val_labels).float().mean()) == pytest.approx(quant["val_acc"])
    return quant


@pytest.mark.parametrize("method", ["static_int8", "qat"])
def test_int8_of_resnet20_runs_int8_kernels_and_reloads_exactly(nnopt, write_recipe, tmp_path, method):
    """FX graph mode: the residual additions that the eager path cannot quantize become int8 ops."""
    # onnxruntime adds the residuals in float after dequantizing, torch requantizes each sum: logits round apart
    export = {"name": "export", "kind": "export", "formats": ["onnx"], "tolerance": 0.5,
              "check_examples": 16}  # the whole test split
    recipe = residual_recipe(f"resnet20_{method}", [_int8_stage(method), export])
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 0, err
    quant = _check_residual_int8(tmp_path / recipe["name"], recipe, convs=21, additions=9)  # 19 + 2 projections
    if method == "qat":
        assert quant["observers_frozen_at_step"] == quant["batchnorm_frozen_at_step"] == round(0.5 * quant["steps"])
    exported = read_metrics(tmp_path / recipe["name"], "03-export")  # QuantizeLinear/DequantizeLinear around Conv
    assert exported["onnx_max_abs_diff"] <= 0.5 and exported["onnx_argmax_agreement"] >= 0.9


class _BranchesOnValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


def test_check_supported_names_what_stops_int8():
    from runner.compress import int8

    example = torch.randn(4, 3, 16, 16)
    assert int8.check_supported(MODELS.get("resnet20")(width=4), example, "static_int8") is None
    assert int8.check_supported(MODELS.get("resnet20")(width=4), example, "qat") is None
    reason = int8.check_supported(_BranchesOnValues(), torch.randn(4, 8), "static_int8")
    assert "FX cannot trace the model" in reason and "branches on tensor values" in reason
    reason = int8.check_supported(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8)), torch.randn(4, 8), "qat")
    assert reason == "int8 kernels exist for none of these layers: 1 (LayerNorm)"
    assert int8.check_supported(_BranchesOnValues(), torch.randn(4, 8), "dynamic_int8") is None


@pytest.mark.parametrize("model, shape", [
    (mlp(hidden=[16], in_features=8, batchnorm=True), [8]),  # fused Linear+BatchNorm (LinearBn1d)
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)), [1, 8, 8]),
    (MODELS.get("resnet20")(in_channels=1, width=4), [1, 8, 8]),  # FX: ConvBnReLU2d modules in a GraphModule
], ids=["linear_bn", "conv_bn", "resnet20"])
def test_freezing_batchnorm_stops_its_statistics(model, shape):
    from runner.compress import int8

    example = torch.randn(32, *shape)
    prepared, _ = int8.prepare(model, qat=True, weights="per_tensor", example=example)
    prepared.train()
    prepared(example)
    int8.freeze_batchnorm(prepared)
    before = {k: v.clone() for k, v in prepared.state_dict().items() if "running_mean" in k}
    assert before
    prepared(example * 3 + 1)
    after = {k: v for k, v in prepared.state_dict().items() if "running_mean" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_qat_ranges_stop_moving_at_the_freeze_point():
    """The fake quantizers' scales and zero points move while observers run and stay exactly fixed from
    the freeze step on (the step the callback records could be right while the freeze itself did nothing)."""
    import pytorch_lightning as pl
    from torch.ao.quantization import FakeQuantize
    from torch.utils.data import DataLoader, TensorDataset

    from runner.compress import int8
    from runner.lightning.qat import FreezeQuantization
    from runner.recipe.training import Moment

    class Batches(pl.LightningDataModule):  # inputs that grow batch after batch: running ranges must follow
        def train_dataloader(self):
            generator = torch.Generator().manual_seed(0)
            inputs = torch.cat([torch.randn(4, 16, generator=generator) * (1 + i) for i in range(8)])
            return DataLoader(TensorDataset(inputs, torch.randint(0, 3, (32,), generator=generator)), batch_size=4)

    class Fit(pl.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    class Ranges(pl.Callback):
        def __init__(self):
            self.after_step: list[list[torch.Tensor]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.after_step.append([t.clone() for m in pl_module.model.modules() if isinstance(m, FakeQuantize)
                                    for t in (m.scale, m.zero_point)])

    torch.manual_seed(0)
    prepared, _ = int8.prepare(mlp(hidden=[8], in_features=16, num_classes=3), qat=True, weights="per_tensor")
    ranges, freeze = Ranges(), FreezeQuantization(Moment(steps=4), None)
    trainer = pl.Trainer(max_steps=8, callbacks=[freeze, ranges], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(Fit(prepared), datamodule=Batches())
    assert freeze.observers_frozen_at == 4 and len(ranges.after_step) == 8
    same = [all(torch.equal(a, b) for a, b in zip(before, after))
            for before, after in zip(ranges.after_step, ranges.after_step[1:])]
    assert same == [False, False, False, True, True, True, True]  # steps 4..7 run with step 3's ranges
