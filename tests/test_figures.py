"""bench.figures: README rows from a run folder, with the command that reproduces the run (checked by rerunning it)."""

from __future__ import annotations

import json
import re
import shlex
import statistics

import pytest
import yaml

from bench.figures import main as figures
from runner.cli import main
from tests.conftest import read_metrics, synthetic_recipe


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory):
    """A two-seed run of a tiny recipe with an `expect` block, run with one override (once for this module)."""
    root = tmp_path_factory.mktemp("figures")
    recipe = synthetic_recipe(epochs=1)
    recipe["expect"] = {"source": "a made-up paper", "metrics": {"test_acc": {"at_least": 0.5}}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code = main(["run", str(path), "-o", "stages.train.optimizer.lr=0.04", "--seeds", "0,1", "-O", str(root / "out")])
    assert code == 0
    return path, root / "out" / "tiny"


def test_rows_carry_the_run_figures_and_a_command_that_reproduces_it(seeded_run, nnopt, capsys, monkeypatch):
    path, run_dir = seeded_run
    monkeypatch.chdir(path.parent)
    assert figures([str(run_dir), "--metric", "train.val_acc"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `tiny`")]
    assert len(rows) == 2
    reproduction, measured = ([cell.strip() for cell in row.strip("|").split(" | ")] for row in rows)

    report = json.loads((run_dir / "report.json").read_text())
    test_acc = report["metrics"]["test_acc"]["values"]
    assert reproduction[1] == "a made-up paper: test_acc >= 0.5"
    assert reproduction[2] == (f"test_acc {100 * statistics.fmean(test_acc):.2f}% ± "
                               f"{100 * statistics.stdev(test_acc):.2f} points ({100 * test_acc[0]:.2f}%, "
                               f"{100 * test_acc[1]:.2f}%)")
    assert reproduction[3] == ("PASS (1/1)" if report["expect"]["passed"] else "FAIL (0/1)")
    assert "for 2 seeds" in reproduction[4] and "thread(s), torch" in reproduction[4]
    val_acc = [read_metrics(run_dir / f"seed-{seed}", "01-train")["val_acc"] for seed in (0, 1)]
    assert measured[1].startswith(f"{100 * statistics.fmean(val_acc):.2f}% ± ")

    command = shlex.split(reproduction[5].strip("`"))
    threads = json.loads((run_dir / "seed-0" / "run.json").read_text())["threads"]  # the recipe leaves it unset
    assert command == ["nnopt", "run", "recipe.yaml", "-o", f"trainer.threads={threads}",
                       "-o", "stages.train.optimizer.lr=0.04", "--seeds", "0,1", "-O", "out"]
    code, out, err = nnopt(*command[1:])  # the same run: every stage of both seeds reused
    assert code == 0, err
    plan = re.findall(r"^  (run|reuse|skip) +\w+ \(", out, re.MULTILINE)
    assert plan == ["reuse"] * 4, out


def test_a_metric_no_stage_wrote_is_refused(seeded_run, capsys):
    _, run_dir = seeded_run
    assert figures([str(run_dir), "--metric", "train.no_such_metric"]) == 1
    captured = capsys.readouterr()
    assert "| `tiny`" in captured.out and "measured no number named `train.no_such_metric`" in captured.err


def test_a_folder_whose_recipe_file_changed_gives_no_row(seeded_run, capsys):
    path, run_dir = seeded_run
    text = path.read_text()
    path.write_text(text.replace("name: train", "name: fit"))
    try:
        assert figures([str(run_dir)]) == 1
    finally:
        path.write_text(text)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "the recipe file's stages (fit, evaluate) are not the run's (train, evaluate)" in captured.err
