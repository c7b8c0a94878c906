"""Reproducing published figures: expect blocks, seeds, sweeps, reports and plots, on synthetic data."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import mnist_recipe, read_metrics, synthetic_recipe


def recipe_with(expect: dict | None = None, **top) -> dict:
    recipe = synthetic_recipe()
    recipe["trainer"]["log_every_n_steps"] = 4  # enough rows in the CSV log for step curves
    if expect is not None:
        recipe["expect"] = expect
    recipe.update(top)
    return recipe


def test_expect_pass_and_fail_on_a_real_run(nnopt, write_recipe, tmp_path):
    expect = {"source": "a made-up paper, Table 1", "metrics": {
        "test_error": {"at_most": 0.5, "paper": 0.3},
        "evaluate.test_acc": {"at_most": 0.05},  # below chance, which a trained run never is: must FAIL
        "weights_kept": {"within": {"value": 1.0, "tolerance": 1e-9}},
        # bounds may name another metric of the run
        "evaluate.params_nonzero": {"within": {"value": "evaluate.params_total", "tolerance": 0}},
        "evaluate.sparsity": {"at_least": "weights_kept"},  # 0 >= 1: must FAIL
    }}
    path = write_recipe(recipe_with(expect))

    code, out, err = nnopt("run", path, "-O", tmp_path)
    assert code == 0, err  # without --check a FAIL is reported, not an exit status
    assert "PASS" in out and "FAIL" in out and "a made-up paper" in out

    report = json.loads((tmp_path / "tiny" / "report.json").read_text())
    verdicts = {v["metric"]: v for v in report["expect"]["verdicts"]}
    evaluated = read_metrics(tmp_path / "tiny", "02-evaluate")
    assert verdicts["test_error"]["value"] == evaluated["test_error"] and verdicts["test_error"]["passed"]
    assert verdicts["test_error"]["paper"] == 0.3
    assert verdicts["evaluate.test_acc"]["value"] == evaluated["test_acc"] and not verdicts["evaluate.test_acc"]["passed"]
    assert verdicts["weights_kept"]["value"] == evaluated["params_nonzero"] / evaluated["params_total"] == 1.0
    assert verdicts["evaluate.params_nonzero"]["passed"] and verdicts["evaluate.params_nonzero"]["paper"] is None
    assert not verdicts["evaluate.sparsity"]["passed"] and verdicts["evaluate.sparsity"]["rule"] == ">= weights_kept (1)"
    assert report["expect"]["passed"] is False
    row, = [line for line in (tmp_path / "tiny" / "report.md").read_text().splitlines()
            if line.startswith("| evaluate.test_acc |")]
    assert "| <= 0.05 |" in row and row.endswith("| FAIL |")

    code, _, err = nnopt("run", path, "-O", tmp_path, "--check")  # stages reused; the verdicts are the same
    assert code == 3 and "evaluate.test_acc" in err


def test_expect_reads_pruned_models_and_nested_metrics(nnopt, write_recipe, tmp_path):
    recipe = recipe_with({"source": "x", "metrics": {
        "evaluate.layer_sparsity.fc1.weight": {"within": {"value": 0.75, "tolerance": 0.001}},
        "weights_kept": {"within": {"value": (0.25 * 32 * 32 + 10 * 32 + 32 + 10) / (32 * 32 + 32 + 32 * 10 + 10),
                                    "tolerance": 1e-4}},
        "prune.sparsity_after": {"at_least": 0.75}}})
    recipe["stages"].insert(1, {"name": "prune", "kind": "prune", "sparsity": {"fc1": 0.75}})
    code, out, err = nnopt("run", write_recipe(recipe), "-O", tmp_path, "--check")
    assert code == 0, err + out
    report = json.loads((tmp_path / "tiny" / "report.json").read_text())
    assert report["layers"]["layer_sparsity"]["fc1.weight"] == pytest.approx(0.75, abs=1e-3)
    assert [v["passed"] for v in report["expect"]["verdicts"]] == [True, True, True]


def test_check_passes_when_every_figure_is_met(nnopt, write_recipe, tmp_path):
    path = write_recipe(recipe_with({"source": "x", "metrics": {"test_acc": {"at_least": 0.6}}}))
    code, out, err = nnopt("run", path, "-O", tmp_path, "--check")
    assert code == 0, err
    assert "PASS" in out and "FAIL" not in out


def test_a_metric_no_stage_can_produce_is_refused_before_running(nnopt, write_recipe, tmp_path):
    # A known run metric, but it compares two latency measurements and this recipe times only once.
    recipe = recipe_with({"source": "x", "metrics": {"latency_ratio": {"at_most": 1}}})
    code, out, err = nnopt("run", write_recipe(recipe), "-O", tmp_path, "--check")
    assert code == 2 and not (tmp_path / "tiny").exists()
    assert "expect.metrics.latency_ratio" in err and "only stage `evaluate` measures latency" in err


@pytest.mark.parametrize("metrics, where, line_of, message", [
    ({"test_eror": {"at_most": 0.1}}, "expect.metrics.test_eror", "test_eror:", "did you mean `test_error`?"),
    ({"evalute.test_acc": {"at_least": 0.9}}, "expect.metrics.evalute.test_acc", "evalute.test_acc:", "no stage `evalute`"),
    ({"evaluate.val_acc": {"at_least": 0.9}}, "expect.metrics.evaluate.val_acc", "evaluate.val_acc:",
     "does not report `val_acc`"),
    ({"test_error": {"at_most": 0.1, "at_least": 0.0}}, "expect.metrics.test_error", "test_error:", "exactly one of"),
    ({"test_error": {"within": {"value": 0.1}}}, "expect.metrics.test_error.within.tolerance", "within:", "missing"),
    ({"test_error": {"below": 0.1}}, "expect.metrics.test_error.below", "below:", "unknown field"),
    ({"test_error": {"at_most": "evaluate.tset_error"}}, "expect.metrics.test_error.at_most", "at_most:",
     "did you mean `test_error`?"),
])
def test_bad_expect_blocks_are_located(nnopt, write_recipe, metrics, where, line_of, message):
    path = write_recipe(recipe_with({"source": "x", "metrics": metrics}))
    code, _, err = nnopt("validate", path)
    assert code == 2
    err = " ".join(err.split())  # rich wraps long lines
    assert message in err and where in err
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if line_of in text)
    assert f"{path}:{line}:" in err


def test_seed_and_seeds_together_are_ambiguous(nnopt, write_recipe):
    code, _, err = nnopt("validate", write_recipe(recipe_with(seeds=[0, 1])))  # synthetic_recipe sets seed: 0
    assert code == 2 and "give `seed` or `seeds`, not both" in err


def test_seeds_report_mean_and_std(nnopt, write_recipe, tmp_path):
    recipe = recipe_with({"source": "x", "metrics": {"test_acc": {"at_least": 0.3}}})
    del recipe["seed"]
    recipe["data"]["args"]["noise"] = 3.0  # hard enough that seeds disagree
    code, out, err = nnopt("run", write_recipe(recipe), "-O", tmp_path, "--seeds", "0,1", "--check")
    assert code == 0, err
    run_dir = tmp_path / "tiny"
    accs = [read_metrics(run_dir / f"seed-{k}", "02-evaluate")["test_acc"] for k in (0, 1)]
    seed_runs = [json.loads((run_dir / f"seed-{k}" / "run.json").read_text())["seed"] for k in (0, 1)]
    assert seed_runs == [0, 1] and accs[0] != accs[1]

    report = json.loads((run_dir / "report.json").read_text())
    acc = report["metrics"]["evaluate.test_acc"]
    assert acc["values"] == accs
    assert acc["mean"] == pytest.approx(sum(accs) / 2)
    assert acc["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)  # sample std of two values
    assert report["expect"]["verdicts"][0]["value"] == pytest.approx(acc["mean"])
    assert "± " in (run_dir / "report.md").read_text() and "mean of 2 seeds" in out


def test_run_report_has_layers_and_plots(nnopt, write_recipe, tmp_path):
    code, _, err = nnopt("run", write_recipe(recipe_with()), "-O", tmp_path)
    assert code == 0, err
    run_dir = tmp_path / "tiny"
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["layers"]["layer_sparsity"]) == {"fc1.weight", "fc2.weight"}
    assert report["run_metrics"]["weights_kept"] == 1.0
    assert [s["name"] for s in report["stages"]] == ["train", "evaluate"]
    # A dense model: no all-zero sparsity plot, but the curves and the pipeline-wide view.
    assert report["plots"] == ["plots/01-train-curves.png", "plots/pipeline.png"]
    for plot in report["plots"]:
        assert (run_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (run_dir / "report.md").read_text()
    assert "![plots/01-train-curves.png]" in markdown and "| fc1.weight | 0 | 1 |" in markdown


def test_plots_are_skipped_with_a_notice_without_matplotlib(nnopt, write_recipe, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    code, _, err = nnopt("run", write_recipe(recipe_with()), "-O", tmp_path)
    assert code == 0, err
    run_dir = tmp_path / "tiny"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["plots"] == [] and "nnopt[plots]" in report["plots_notice"]
    assert not (run_dir / "plots").exists()
    assert "matplotlib is not installed" in (run_dir / "report.md").read_text()


def test_sweep_runs_the_grid_and_draws_the_tradeoff(nnopt, write_recipe, tmp_path):
    path = write_recipe(recipe_with())
    code, out, err = nnopt("sweep", path, "-O", tmp_path, "-s", "model.args.hidden=[4],[32]")
    assert code == 0, err
    sweep_dir = tmp_path / "tiny" / "sweep"
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert [p["overrides"] for p in summary["points"]] == [["model.args.hidden=[4]"], ["model.args.hidden=[32]"]]
    for point in summary["points"]:
        evaluated = read_metrics(sweep_dir / point["folder"], "02-evaluate")
        assert point["test_acc"] == evaluated["test_acc"] and point["bytes"] == evaluated["packed_bytes"]
        assert point["compression_ratio"] == pytest.approx(evaluated["dense_fp32_bytes"] / evaluated["packed_bytes"])
    small, large = summary["points"]
    assert small["bytes"] < large["bytes"]
    assert (sweep_dir / "tradeoff.png").read_bytes()[:4] == b"\x89PNG" and summary["plot"] == "tradeoff.png"
    assert "hidden=\\[4\\]" in (sweep_dir / "sweep.md").read_text()


def test_sweep_points_share_finished_stages(nnopt, write_recipe, tmp_path):
    # Points differ only in the evaluate stage: the second copies the first point's training.
    code, out, err = nnopt("sweep", write_recipe(recipe_with()), "-O", tmp_path,
                           "-s", "stages.evaluate.latency_repeats=3,4")
    assert code == 0, err
    sweep_dir = tmp_path / "tiny" / "sweep"
    first, second = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    stages = json.loads((sweep_dir / second["folder"] / "run.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["reused", "ran"]
    assert read_metrics(sweep_dir / second["folder"], "01-train") == read_metrics(sweep_dir / first["folder"], "01-train")


def test_sweep_values_are_validated_like_overrides(nnopt, write_recipe):
    code, _, err = nnopt("sweep", write_recipe(recipe_with()), "-s", "stages.train.epochs=2,-1")
    assert code == 2 and "stages[0].epochs" in err and "set by override `stages.train.epochs=-1`" in err
    code, _, err = nnopt("sweep", write_recipe(recipe_with()), "-s", "stages.train.epochs")
    assert code == 2 and "not `key.path=v1,v2,...`" in err


@pytest.mark.slow
def test_han_style_reproduction_on_an_mnist_subset(nnopt, write_recipe, tmp_path):
    """The shape of recipes/han2015_lenet300.yaml on 5k MNIST images: train, prune per layer, retrain, check."""
    sgd = {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    recipe = mnist_recipe([
        {"name": "train", "kind": "train", "epochs": 3, "optimizer": sgd},
        {"name": "prune", "kind": "prune", "sparsity": {"fc1": 0.92, "fc2": 0.91, "fc3": 0.74}},
        {"name": "retrain", "kind": "finetune", "epochs": 2, "optimizer": {**sgd, "lr": 0.01}},
        {"name": "evaluate", "kind": "evaluate", "latency_repeats": 3},
    ], expect={"source": "Han et al. 2015 shape, subset", "metrics": {
        "test_error": {"at_most": 0.08},
        "weights_kept": {"within": {"value": 0.0832, "tolerance": 0.001}},
        "evaluate.compression_rate": {"within": {"value": 12, "tolerance": 0.5}}}})
    code, out, err = nnopt("run", write_recipe(recipe), "-O", tmp_path, "--check")
    assert code == 0, err + out
    report = json.loads((tmp_path / "mnist_small" / "report.json").read_text())
    kept = {name: 1 - s for name, s in report["layers"]["layer_sparsity"].items()}
    assert kept == pytest.approx({"fc1.weight": 0.08, "fc2.weight": 0.09, "fc3.weight": 0.26}, abs=1e-3)
    assert (tmp_path / "mnist_small" / "plots" / "03-retrain-curves.png").is_file()
