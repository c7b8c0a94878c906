"""bench.readme: README's tables written from real runs, row by row as a manifest lists them; no run, no figure."""

from __future__ import annotations

import json
import shlex
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from bench.figures import figure
from bench.readme import main as readme
from runner.cli import main as nnopt
from tests.conftest import synthetic_recipe

BEFORE = "# A project\n\nProse before, with a | pipe and `code`.\n\n<!-- bench.readme: reproductions -->\n"
BETWEEN = "<!-- /bench.readme -->\n\nProse between the tables.\n\n<!-- bench.readme: measured -->\n"
AFTER = "<!-- /bench.readme -->\n\n## Later\n\nText after, no newline at the end"
STALE = "\n| an old row | 1.23% | by hand |\n\n"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A repository copy: a recipe (pinned to one thread, with an `expect` block), run once as shipped and once
    as an override run over two seeds, into its outputs/."""
    root = tmp_path_factory.mktemp("project")
    recipe = synthetic_recipe(epochs=1)
    recipe["trainer"]["threads"] = 1
    recipe["expect"] = {"source": "a made-up paper", "metrics": {"test_acc": {"at_least": 0.5}}}
    (root / "recipes").mkdir()
    (root / "recipes" / "tiny.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    outputs = str(root / "outputs")
    assert nnopt(["run", str(root / "recipes" / "tiny.yaml"), "-O", outputs]) == 0
    assert nnopt(["run", str(root / "recipes" / "tiny.yaml"), "-o", "name=tiny_fast", "-o",
                  "stages.train.optimizer.lr=0.1", "--seeds", "0,1", "-O", outputs]) == 0
    return root


def write(root: Path, manifest: dict) -> list[str]:
    """A fresh README with stale tables and the manifest: the arguments that point bench.readme at them."""
    (root / "README.md").write_text(BEFORE + STALE + BETWEEN + STALE + AFTER)
    (root / "rows.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return ["--readme", str(root / "README.md"), "--manifest", str(root / "rows.yaml")]


def table_rows(text: str, table: str) -> list[list[str]]:
    start = text.index(f"<!-- bench.readme: {table} -->")
    region = text[start:text.index("<!-- /bench.readme -->", start)]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in region.splitlines()[4:] if line]


def seed_values(run_dir: Path, metric: str) -> list[float]:
    return json.loads((run_dir / "report.json").read_text())["metrics"][metric]["values"]


def test_rows_hold_the_runs_figures_and_commands_and_nothing_else_changes(project, capsys):
    tiny = json.loads((project / "outputs" / "tiny" / "report.json").read_text())
    manifest = {
        "reproductions": [
            {"recipe": "recipes/tiny.yaml", "label": "the tiny recipe"},
            {"recipe": "recipes/tiny.yaml", "overrides": ["name=tiny_fast", "stages.train.optimizer.lr=0.1"],
             "seeds": [0, 1], "metrics": [{"metric": "train.val_acc", "label": "val"}, "train.steps"]}],
        "measured": [{"recipe": "recipes/tiny.yaml",
                      "metrics": ["evaluate.test_loss", {"metric": "train.steps", "label": "steps", "as": "count"}]}],
    }
    args = write(project, manifest)
    assert readme(args) == 0
    text = (project / "README.md").read_text()
    assert text.startswith(BEFORE) and text.endswith(AFTER) and BETWEEN in text and "an old row" not in text

    shipped, override = table_rows(text, "reproductions")
    assert shipped[:4] == ["the tiny recipe", "a made-up paper: test_acc >= 0.5",
                           f"test_acc {100 * tiny['run_metrics']['test_acc']:.2f}%",
                           "PASS (1/1)" if tiny["expect"]["passed"] else "FAIL (0/1)"]
    assert shipped[4].startswith("seed 0; ") and "1 thread(s)" in shipped[4] and "load " in shipped[4]
    assert shipped[5] == "`nnopt run recipes/tiny.yaml --check`"

    fast = project / "outputs" / "tiny_fast"
    acc, val = seed_values(fast, "test_acc"), seed_values(fast, "train.val_acc")
    steps = seed_values(fast, "train.steps")  # the same count in each seed: a whole mean, spread 0
    assert override[0] == "`tiny_fast`"
    assert override[2] == (f"test_acc {100 * statistics.fmean(acc):.2f}% ± {100 * statistics.stdev(acc):.2f} points "
                           f"({100 * acc[0]:.2f}%, {100 * acc[1]:.2f}%); val {100 * statistics.fmean(val):.2f}% ± "
                           f"{100 * statistics.stdev(val):.2f} points ({100 * val[0]:.2f}%, {100 * val[1]:.2f}%); "
                           f"train.steps {steps[0]:,} ± 0 ({steps[0]:,}, {steps[1]:,})")
    assert override[4].startswith("seeds 0, 1; ") and " for 2 seeds" in override[4]
    assert shlex.split(override[5].strip("`")) == ["nnopt", "run", "recipes/tiny.yaml", "-o", "name=tiny_fast",
                                                   "-o", "stages.train.optimizer.lr=0.1", "--seeds", "0,1", "--check"]

    [measured] = table_rows(text, "measured")
    stage = next(s for s in tiny["stages"] if s["name"] == "evaluate")["metrics"]
    steps = next(s for s in tiny["stages"] if s["name"] == "train")["metrics"]["steps"]
    assert measured[:2] == ["`tiny` evaluate.test_loss, train.steps",
                            f"evaluate.test_loss {stage['test_loss']:.4g}; steps {steps:,}"]
    assert measured[3] == "`nnopt run recipes/tiny.yaml`"

    capsys.readouterr()
    assert readme(args + ["--check"]) == 0  # README now is what the runs give
    assert "3 of 3 rows measured" in capsys.readouterr().err


def test_a_row_without_its_run_reads_not_measured_and_fails_the_check(project, capsys):
    manifest = {"reproductions": [{"recipe": "recipes/tiny.yaml", "overrides": ["name=never_run"]}],
                "measured": [{"recipe": "recipes/tiny.yaml", "metrics": ["test_acc"]}]}
    args = write(project, manifest)
    assert readme(args + ["--check"]) == 1
    assert (project / "README.md").read_text() == BEFORE + STALE + BETWEEN + STALE + AFTER  # --check writes nothing
    err = capsys.readouterr().err
    assert "not measured: reproductions row 0 (`never_run`): no run at outputs/never_run" in err
    assert "1 of 2 rows measured" in err and "differ from what the runs give" in err

    assert readme(args) == 0
    [row] = table_rows((project / "README.md").read_text(), "reproductions")
    assert row == ["`never_run`", "a made-up paper: test_acc >= 0.5", "not measured (no run at outputs/never_run)",
                   "-", "-", "`nnopt run recipes/tiny.yaml -o name=never_run --check`"]
    assert readme(args + ["--check"]) == 1  # written, and still a row without a run


def test_counts_over_seeds_read_in_whole_units():
    """Parameters or bytes over seeds: a whole mean and spread, like each seed's value, not `20,853.0 ± 127.3`;
    a spread under one unit keeps a decimal."""
    assert figure("evaluate.params_nonzero", [20726, 20853, 20980]) == "20,853 ± 127 (20,726, 20,853, 20,980)"
    assert figure("evaluate.size_bytes", [2, 3]) == "2.5 ± 0.7 (2, 3)"
    assert figure("train.steps", [1.0, 2.0, 2.0], "count") == "1.7 ± 0.6 (1, 2, 2)"


def test_a_run_of_another_command_gives_no_figure(project, capsys):
    (project / "recipes" / "copy.yaml").write_text((project / "recipes" / "tiny.yaml").read_text())
    older = project / "outputs" / "tiny_older"  # the run as an nnopt without `trainer.progress_bar` recorded it
    if not older.exists():
        shutil.copytree(project / "outputs" / "tiny", older, symlinks=True)
        record = json.loads((older / "run.json").read_text())
        record["recipe"]["name"] = "tiny_older"
        del record["recipe"]["trainer"]["progress_bar"]
        (older / "run.json").write_text(json.dumps(record))
    manifest = {"reproductions": [
        {"recipe": "recipes/tiny.yaml", "overrides": ["stages.train.optimizer.lr=0.2"]},  # outputs/tiny ran 0.05
        {"recipe": "recipes/tiny.yaml", "seeds": [0, 1]},  # outputs/tiny is one seed's run
        {"recipe": "recipes/copy.yaml"},  # the same recipe, another file
        {"recipe": "recipes/tiny.yaml", "overrides": ["name=tiny_fast"], "seeds": [0, 1]},  # its lr was overridden
        {"recipe": "recipes/tiny.yaml", "overrides": ["name=tiny_older"]},
    ], "measured": [{"recipe": "recipes/tiny.yaml", "metrics": ["evaluate.test_los"]}]}  # the run's, a wrong name
    args = write(project, manifest)
    assert readme(args) == 0
    rows = table_rows((project / "README.md").read_text(), "reproductions")
    assert [row[2] for row in rows] == [f"not measured (the run at outputs/{name} does not match this command)"
                                        for name in ("tiny", "tiny", "tiny", "tiny_fast", "tiny_older")]
    err = capsys.readouterr().err
    assert "at stages[0].optimizer.lr the row's command gives 0.2, the run had 0.05" in err
    assert "the run is of seeds [0], the row's command of [0, 1]" in err
    assert f"it was made from {project / 'recipes' / 'tiny.yaml'}, not recipes/copy.yaml" in err
    assert "at stages[0].optimizer.lr the row's command gives 0.05, the run had 0.1" in err
    assert "an older nnopt's run: `trainer.progress_bar` (now False) did not exist when it ran; rerun it" in err
    [measured] = table_rows((project / "README.md").read_text(), "measured")
    assert measured[1:3] == ["not measured (the run at outputs/tiny lacks this row's figures)", "-"]
    assert "measured no number named `evaluate.test_los`; did you mean `evaluate.test_loss`" in err


def test_a_bad_manifest_or_readme_is_refused_where_it_is_wrong(project, capsys):
    args = write(project, {"reproductions": [{"recipe": "recipes/tiny.yaml", "colour": "red"}], "measured": []})
    assert readme(args) == 2
    assert "rows.yaml:3:3: reproductions[0].colour: unknown field `colour`" in capsys.readouterr().err

    args = write(project, {"reproductions": [{"recipe": "recipes/tiny.yaml", "overrides": ["stages.nope.epochs=1"]}],
                           "measured": []})
    assert readme(args) == 2
    assert "rows.yaml:2:3: reproductions[0].recipe: the row's command does not load" in capsys.readouterr().err

    args = write(project, {"reproductions": [], "measured": []})
    (project / "README.md").write_text(BEFORE + STALE + AFTER)  # no measured table
    assert readme(args) == 2
    assert "needs exactly one line `<!-- bench.readme: measured -->` (found 0)" in capsys.readouterr().err
    (project / "README.md").write_text(BEFORE + STALE + BETWEEN.replace("<!-- /bench.readme -->\n", ""))
    assert readme(args) == 2
    assert "README.md:5: `<!-- bench.readme: reproductions -->` has no `<!-- /bench.readme -->` line after it" \
        in capsys.readouterr().err


def test_the_shipped_manifest_loads_and_fits_readme(tmp_path, capsys):
    readme_file = Path(__file__).parents[1] / "README.md"
    before = readme_file.read_bytes()
    assert readme(["--readme", str(readme_file), "--outputs", str(tmp_path), "--check"]) == 1  # no runs there
    assert readme_file.read_bytes() == before
    err = capsys.readouterr().err
    rows = len(yaml.safe_load((Path(__file__).parents[1] / "bench" / "readme_rows.yaml").read_text())["reproductions"])
    assert f"not measured: reproductions row {rows - 1} " in err and " 0 of " in err
