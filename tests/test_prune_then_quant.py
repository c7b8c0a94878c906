"""The shipped prune_then_quant recipe end to end on full MNIST, with shortened training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from runner.modelio import load_model, load_packed

from runner.data.mnist import mnist
from tests.conftest import read_metrics, synthetic_recipe


@pytest.mark.slow
def test_prune_then_quant_recipe_keeps_zeros_and_packs_20x(nnopt, tmp_path):
    # Shorter training than the recipe's 10 + 12 epochs; the full run's figures are in README.
    code, _, err = nnopt("run", Path("recipes/prune_then_quant.yaml"), "-O", tmp_path,
                         "-o", "stages.train.epochs=3", "-o", "stages.finetune.epochs=2")
    assert code == 0, err
    run_dir = tmp_path / "prune_then_quant"
    evaluation = read_metrics(run_dir, "05-evaluate")
    assert evaluation["test_error"] <= 0.025
    assert evaluation["sparsity"] == pytest.approx(0.92, abs=0.002)  # biases are dense
    assert evaluation["size_ratio"] >= 20
    assert evaluation["latency_fp32_ms_b256"] > 0 and "latency_ratio_b1" in evaluation

    pruned, quantized = load_model(run_dir / "03-finetune"), load_model(run_dir / "04-quantize")
    _check_zeros(pruned, quantized, read_metrics(run_dir, "04-quantize"), ("fc1", "fc2", "fc3"))
    images = mnist().test[0][:500]
    assert torch.equal(load_packed(run_dir / "04-quantize" / "model.dcz")(images), quantized(images))
    export = read_metrics(run_dir, "06-export")
    assert export["onnx_max_abs_diff"] <= export["onnx_tolerance"] and export["onnx_argmax_agreement"] >= 0.99


def _check_zeros(pruned, quantized, metrics: dict, layers) -> None:
    """Every pruned zero stays an int8 zero; survivors that round to int8 zero are counted as `zeros_new`."""
    new = 0
    for name in layers:
        float_zeros = pruned.get_submodule(name).weight == 0
        int8_zeros = quantized.get_submodule(f"module.{name}").weight().int_repr() == 0
        assert not (float_zeros & ~int8_zeros).any(), name
        new += int((int8_zeros & ~float_zeros).sum())
    assert metrics["zeros_lost"] == 0 and metrics["zeros_new"] == new


def test_random_pruning_leaves_small_survivors_that_int8_zeroes(nnopt, write_recipe, tmp_path):
    """Random pruning keeps tiny weights; per-tensor int8 rounds some to zero: they are new zeros, reported
    apart, while every pruned zero stays zero."""
    recipe = synthetic_recipe(epochs=1)
    recipe["stages"][1:1] = [
        {"name": "prune", "kind": "prune", "method": "random", "sparsity": 0.5},
        {"name": "quantize", "kind": "quantize", "method": "static_int8", "calibration_batches": 2,
         "weights": "per_tensor"}]
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 0, err
    run_dir = tmp_path / recipe["name"]
    metrics = read_metrics(run_dir, "03-quantize")
    _check_zeros(load_model(run_dir / "02-prune"), load_model(run_dir / "03-quantize"), metrics, ("fc1", "fc2"))
    assert metrics["zeros_new"] > 0
