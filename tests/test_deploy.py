"""Fast inference paths: every candidate computes what eager computes; evaluate reports the fastest."""

from __future__ import annotations

import torch

from runner.modelio import load_model
from runner.deploy import CsrLinear, candidates
from tests.conftest import read_metrics, synthetic_recipe


def pruned_then_int8_run(nnopt, write_recipe, tmp_path):
    recipe = synthetic_recipe()
    recipe["model"]["args"]["hidden"] = [64, 32]
    recipe["stages"][1:1] = [{"name": "prune", "kind": "prune", "method": "magnitude", "scope": "global",
                              "sparsity": 0.9},
                             {"name": "quantize", "kind": "quantize", "method": "dynamic_int8"}]
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 0, err
    return tmp_path / recipe["name"]


def test_fast_paths_match_eager_and_evaluate_reports_the_fastest(nnopt, write_recipe, tmp_path):
    run_dir = pruned_then_int8_run(nnopt, write_recipe, tmp_path)
    example = torch.randn(32, 32)

    pruned = load_model(run_dir / "02-prune").eval()
    paths = candidates(pruned, example)
    assert set(paths) == {"eager", "baked_masks", "torchscript", "sparse_csr"}
    assert any(isinstance(m, CsrLinear) for m in paths["sparse_csr"].modules())
    with torch.inference_mode():
        expected = pruned(example)
        for name, path in paths.items():
            assert torch.allclose(path(example), expected, atol=1e-5), name

    int8 = load_model(run_dir / "03-quantize").eval()
    paths = candidates(int8, example)
    assert "torchscript" in paths
    with torch.inference_mode():
        assert torch.equal(paths["torchscript"](example), int8(example))  # the same int8 kernels

    metrics = read_metrics(run_dir, "04-evaluate")
    for batch_size in (1, 32):
        assert metrics[f"deploy_path_b{batch_size}"] in {"eager", "torchscript"}  # int8: no masks, no float Linear
        assert metrics[f"deploy_latency_ms_b{batch_size}"] > 0
        assert metrics[f"deploy_latency_ratio_b{batch_size}"] == round(
            metrics[f"deploy_latency_ms_b{batch_size}"] / metrics[f"deploy_latency_fp32_ms_b{batch_size}"], 3)
