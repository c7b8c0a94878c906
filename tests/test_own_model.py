"""Your own model and data, end to end: a torchvision ResNet-18 trained on an image folder, then loaded from
its weights, channel-pruned, fine-tuned with augmentation, quantized to static int8, evaluated and exported."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runner.data.make_image_folder import make_image_folder
from runner.modelio import load_model, load_packed

from conftest import read_metrics

RECIPES = Path(__file__).parent.parent / "recipes"
# 16-pixel images, one thread, no resume checkpoints (a ResNet-18's take seconds each epoch; tests/test_resume
# covers resuming), latency timed at batch size 1 only (no figure of it is checked here)
SMALL = ["-o", "data.transforms.train=[{RandomCrop: {size: 16, padding: 2}}, RandomHorizontalFlip]",
         "-o", "trainer.threads=1", "-o", "trainer.checkpoint=null"]


@pytest.mark.slow
def test_resnet18_from_weights_pruned_int8_and_exported(nnopt, tmp_path):
    shapes = make_image_folder(tmp_path / "shapes", per_class=24, size=16)
    out = tmp_path / "out"
    code, _, err = nnopt("run", RECIPES / "resnet18_shapes.yaml", "-O", out, "-o", f"data.args.root={shapes}",
                         "-o", "stages.train.epochs=6", "-o", "stages.evaluate.latency_repeats=3",
                         "-o", "stages.evaluate.latency_batch_sizes=[1]", *SMALL)
    assert code == 0, err
    trained = read_metrics(out / "resnet18_shapes", "02-evaluate")
    assert trained["test_acc"] > 0.5  # 4 classes: chance is 0.25

    code, out_text, err = nnopt(
        "run", RECIPES / "resnet18_image_folder.yaml", "-O", out, "-o", f"data.args.root={shapes}",
        "-o", f"model.weights={out / 'resnet18_shapes' / '01-train'}", "-o", "stages.finetune.epochs=3",
        "-o", "stages.loaded.latency_repeats=3", "-o", "stages.evaluate.latency_repeats=3",
        "-o", "stages.loaded.latency_batch_sizes=[1]", "-o", "stages.evaluate.latency_batch_sizes=[1]",
        "-o", "stages.int8.calibration_batches=2", "-o", "stages.export.check_examples=24", *SMALL)
    assert code == 0, err
    run = out / "resnet18_image_folder"
    loaded, pruned = read_metrics(run, "01-loaded"), read_metrics(run, "02-prune")
    final, exported = read_metrics(run, "05-evaluate"), read_metrics(run, "06-export")
    assert loaded["test_acc"] == trained["test_acc"]  # the loaded weights, not a random init
    assert pruned["params_total"] < 0.8 * loaded["params_total"]
    assert all(after < before for before, after in zip(pruned["widths_before"].values(), pruned["widths_after"].values()))
    assert final["test_acc"] >= loaded["test_acc"] - 0.15 and final["test_acc"] > 0.5
    assert exported["onnx_argmax_agreement"] >= 0.9

    # FX graph mode: every conv int8 (17 + 3 projections), nothing left in float, each of the 8 residual `+`
    # a quantized add_relu; the packed artifact reloads to the same outputs
    model = load_model(run / "04-int8")
    int8_convs = [m for m in model.modules() if isinstance(m, torch.ao.nn.quantized.Conv2d)]
    assert len(int8_convs) == 20 and all(conv.weight().dtype == torch.qint8 for conv in int8_convs)
    assert not [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert [node.target for node in model.graph.nodes].count(torch.ops.quantized.add_relu) == 8
    images = torch.rand(8, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(model(images), load_packed(run / "04-int8" / "model.dcz")(images))
