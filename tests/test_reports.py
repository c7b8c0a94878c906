"""Reports that tell the truth: structured pruning shows widths and parameters removed, not a sparsity of 0."""

from __future__ import annotations

import json

import pytest

from tests.conftest import synthetic_recipe


def test_structured_pruning_report_shows_widths_and_no_empty_sparsity_plot(nnopt, write_recipe, tmp_path):
    recipe = synthetic_recipe(epochs=1)
    recipe["stages"].insert(1, {"name": "slim", "kind": "prune", "granularity": "neurons", "sparsity": {"fc1": 0.5}})
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 0, err
    run_dir = tmp_path / "tiny"
    report = (run_dir / "report.md").read_text()
    assert "## Structure (`slim` removed neurons)" in report
    assert "| fc1 | 32 | 16 | 50.0% |" in report
    slim = json.loads((run_dir / "02-slim" / "metrics.json").read_text())
    before, after = slim["params_total_before"], slim["params_total"]
    assert before == 32 * 32 + 32 + 32 * 10 + 10 and after == 32 * 16 + 16 + 16 * 10 + 10
    assert f"Parameters: {before:,} -> {after:,}" in report
    drawn = json.loads((run_dir / "report.json").read_text())["plots"]
    if drawn:  # matplotlib installed
        assert "plots/widths.png" in drawn and "plots/layer_sparsity.png" not in drawn
        assert "plots/pipeline.png" in drawn  # every stage on one step axis
        assert (run_dir / "plots" / "widths.png").stat().st_size > 0


def test_int8_report_shows_bits_per_layer_under_stable_names(nnopt, write_recipe, tmp_path):
    recipe = synthetic_recipe(epochs=1)
    recipe["stages"][1:1] = [{"name": "prune", "kind": "prune", "sparsity": 0.5},
                             {"name": "quantize", "kind": "quantize", "method": "static_int8", "calibration_batches": 4}]
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 0, err
    run_dir = tmp_path / "tiny"
    report = (run_dir / "report.md").read_text()
    # the same layer names as before quantization (not `module.fc1.weight`), with 8 bits and the pruned half
    assert "| fc1.weight | 0.5 | 0.5 | 8 |" in report and "| fc2.weight | 0.5 | 0.5 | 8 |" in report
    pruned = json.loads((run_dir / "02-prune" / "metrics.json").read_text())
    evaluated = json.loads((run_dir / "04-evaluate" / "metrics.json").read_text())
    assert set(evaluated["layer_sparsity"]) == set(pruned["layer_sparsity_after"]) == {"fc1.weight", "fc2.weight"}
    drawn = json.loads((run_dir / "report.json").read_text())["plots"]
    if drawn:
        assert "plots/layer_bits.png" in drawn


def test_objective_parts_are_logged_apart(nnopt, write_recipe, tmp_path):
    import csv

    recipe = synthetic_recipe(epochs=2, regularization=[{"l1": 0.001, "params": ["fc1.weight"]}])
    recipe["trainer"]["log_every_n_steps"] = 4
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 0, err
    with open(tmp_path / "tiny" / "01-train" / "logs" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train_penalty")]
    assert rows
    for row in rows:  # the objective is the data loss plus the L1 term, each logged over the same window
        total, data, penalty = float(row["train_loss"]), float(row["train_data_loss"]), float(row["train_penalty"])
        assert penalty > 0 and total == pytest.approx(data + penalty, rel=1e-5)


def test_pipeline_curve_joins_stages_and_tracks_gradual_sparsity(tmp_path):
    from pathlib import Path

    from runner import plots

    if plots.missing_notice() is not None:
        pytest.skip("matplotlib is not installed")
    log = tmp_path / "metrics.csv"
    log.write_text("epoch,step,train_loss,val_acc\n0,9,1.0,\n0,9,,0.5\n1,19,0.5,\n1,19,,0.7\n")
    stages = [("train", log, {}), ("prune", None, {"sparsity_after": 0.5}),
              ("finetune", log, {"gradual_pruning": {"pruned_at_steps": {"5": 0.6, "15": 0.8}}}),
              ("evaluate", Path(tmp_path / "none.csv"), {"sparsity": 0.7})]
    assert plots.pipeline_curves(stages, tmp_path / "pipeline.png", "t").stat().st_size > 0
    assert plots.pipeline_curves([("quantize", None, {})], tmp_path / "empty.png", "t") is None  # nothing to draw
