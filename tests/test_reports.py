"""Reports that tell the truth: structured pruning shows widths and parameters removed, not a sparsity of 0."""

from __future__ import annotations

import json

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
        assert (run_dir / "plots" / "widths.png").stat().st_size > 0
