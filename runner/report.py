"""The run's summary: run.json and report.json for machines, report.md and plots for people, rich tables for the terminal."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytorch_lightning
import torch
from rich.table import Table

from runner import __version__, plots
from runner.files import write_json, write_text
from runner.outcome import StageOutcome
from runner.summary import HEADLINE, measured_columns, stage_cells, summary_table  # noqa: F401  (pipeline prints the summary)
from runner.verdicts import Verdict, flat_metrics, judge, run_metrics, verdict_lines

def versions() -> dict:
    return {"nnopt": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "pytorch_lightning": pytorch_lightning.__version__, "platform": platform.platform()}


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _final(outcomes: list[StageOutcome], key: str) -> dict:
    """A per-layer mapping (layer_sparsity, layer_bits) as the last stage reporting it left it."""
    for outcome in reversed(outcomes):
        if isinstance(outcome.metrics.get(key), dict):
            return outcome.metrics[key]
    return {}


def _plots(run_dir: Path, outcomes: list[StageOutcome], layers: dict[str, dict]) -> tuple[list[str], str | None]:
    """Training curves per training stage and per-layer bars; (relative paths, notice if skipped)."""
    notice = plots.missing_notice()
    if notice is not None:
        return [], notice
    drawn = []
    for o in outcomes:
        log = Path(o.folder) / "logs" / "metrics.csv"
        if log.is_file():
            drawn.append(plots.training_curves(log, run_dir / "plots" / f"{Path(o.folder).name}-curves.png",
                                               f"{o.name} ({o.kind})"))
    for key, label in (("layer_sparsity", "sparsity"), ("layer_bits", "bits")):
        # a dense or slimmed model has no zeros to show: an all-zero sparsity plot says nothing
        if any(layers[key].values()):
            drawn.append(plots.layer_bars(layers[key], run_dir / "plots" / f"{key}.png", f"{label} per layer", label))
    if sum(1 for o in outcomes if o.status != "skipped") > 1:
        stages = [(o.name, Path(o.folder) / "logs" / "metrics.csv", o.metrics) for o in outcomes if o.status != "skipped"]
        drawn.append(plots.pipeline_curves(stages, run_dir / "plots" / "pipeline.png",
                                           f"{run_dir.name}: every stage on one step axis"))
    slimmed = _slimmed(outcomes)
    if slimmed is not None:
        drawn.append(plots.widths(slimmed.metrics["widths_before"], slimmed.metrics["widths_after"],
                                  run_dir / "plots" / "widths.png", f"{slimmed.name}: neurons per layer"))
    return [str(path.relative_to(run_dir)) for path in drawn if path is not None], None


def _slimmed(outcomes: list[StageOutcome]) -> StageOutcome | None:
    """The last stage that removed neurons (structured pruning), if any."""
    return next((o for o in reversed(outcomes) if isinstance(o.metrics.get("widths_after"), dict)), None)


def _structure_lines(outcomes: list[StageOutcome]) -> list[str]:
    """Widths before and after structured pruning, and the parameters it removed: the model is smaller,
    not sparser, so the sparsity columns alone would say nothing happened."""
    slimmed = _slimmed(outcomes)
    if slimmed is None:
        return []
    before, after = slimmed.metrics["widths_before"], slimmed.metrics["widths_after"]
    lines = [f"## Structure (`{slimmed.name}` removed neurons)", "", "| layer | before | after | removed |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {before[name]} | {after.get(name, 0)} | {1 - after.get(name, 0) / before[name]:.1%} |"
              for name in before]
    total_before, total_after = slimmed.metrics.get("params_total_before"), slimmed.metrics.get("params_total")
    if total_before and total_after:
        lines += ["", f"Parameters: {total_before:,} -> {total_after:,} ({total_after / total_before:.1%} of the model "
                      f"before; {total_before - total_after:,} removed)."]
    return lines + [""]


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not isinstance(v, dict)}


def _chosen_lines(outcomes: list[StageOutcome]) -> list[str]:
    """What stages chose automatically (per-layer sparsity, codebook bits), as the plain recipe fields that
    reproduce it."""
    chosen = [(o.name, o.metrics["allocation"]["reproduce"]) for o in outcomes
              if isinstance(o.metrics.get("allocation"), dict) and "reproduce" in o.metrics["allocation"]]
    if not chosen:
        return []
    return (["## Chosen automatically", "", "Put these fields in the stage (without the budget that chose "
             "them: `allocation`, `max_accuracy_drop`) to reproduce the choice without a search:", ""] + [f"- `{name}`: `{text}`" for name, text in chosen] + [""])


def write_reports(run_dir: Path, recipe, outcomes: list[StageOutcome], started: str, finished: str) -> list[Verdict]:
    """run.json (provenance), report.json and report.md (results, expect verdicts, plots); returns the verdicts."""
    write_json(run_dir / "run.json", {
        "recipe": recipe.model_dump(mode="json", by_alias=True),
        "seed": recipe.seed,
        "versions": versions(),
        "threads": torch.get_num_threads(),
        "started": started,
        "finished": finished,
        # wall times mean little on a shared machine without it: the 1, 5 and 15 minute averages as the run ends
        "load_average": [round(load, 2) for load in os.getloadavg()],
        "stages": [o.to_json() for o in outcomes],
        # legal but suspicious settings `validate` found (runner.recipe.semantics), as they were printed
        "warnings": [str(issue) for issue in getattr(recipe, "warnings", [])],
    })
    derived = run_metrics(outcomes)
    verdicts = judge(recipe.expect, flat_metrics(outcomes))
    layers = {key: _final(outcomes, key) for key in ("layer_sparsity", "layer_bits")}
    drawn, notice = _plots(run_dir, outcomes, layers)
    write_json(run_dir / "report.json", {
        "name": recipe.name, "seed": recipe.seed, "started": started, "finished": finished,
        "stages": [{"name": o.name, "kind": o.kind, "status": o.status, "seconds": o.seconds,
                    "metrics": _scalars(o.metrics),
                    **{key: o.metrics[key] for key in ("layer_sparsity", "layer_bits", "allocation") if key in o.metrics}}
                   for o in outcomes],
        "run_metrics": derived,
        "layers": layers,
        "expect": None if recipe.expect is None else {
            "source": recipe.expect.source, "passed": all(v.passed for v in verdicts),
            "verdicts": [v.to_json() for v in verdicts]},
        "plots": drawn,
        "plots_notice": notice,
    })
    columns = measured_columns(outcomes)
    lines = [f"# {recipe.name}", "", recipe.description, "",
             f"Run {started} -> {finished}; nnopt {__version__}, torch {torch.__version__}, "
             f"Lightning {pytorch_lightning.__version__}, seed {recipe.seed}, {torch.get_num_threads()} torch "
             "thread(s) (results depend on the count: it is part of every stage's fingerprint).", "",
             "## Stages", "",
             "| " + " | ".join(["stage", "kind", "status", "time"] + [c.header for c in columns]) + " |",
             "|---|---|---|" + "---:|" * (1 + len(columns))]
    lines += ["| " + " | ".join(stage_cells(o, columns)) + " |" for o in outcomes]
    lines += ["", "## Run", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {_cell(value)} |" for key, value in derived.items()]
    final = next((o.metrics for o in reversed(outcomes) if "params_total" in o.metrics), {})
    lines += [f"| {key} | {_cell(final[key])} |" for key in ("params_total", "params_nonzero", "model_bytes", "packed_bytes")
              if key in final]
    lines.append("")
    if recipe.expect is not None:
        lines += verdict_lines(recipe.expect.source, verdicts)
    lines += _structure_lines(outcomes)
    if layers["layer_sparsity"] or layers["layer_bits"]:
        names = list(dict.fromkeys([*layers["layer_sparsity"], *layers["layer_bits"]]))
        lines += ["## Layers (final model)", "", "| layer | sparsity | kept | bits |", "|---|---|---|---|"]
        for name in names:
            sparsity = layers["layer_sparsity"].get(name)
            kept = None if sparsity is None else round(1 - sparsity, 6)
            lines.append(f"| {name} | {_cell(sparsity)} | {_cell(kept)} | {_cell(layers['layer_bits'].get(name))} |")
        lines.append("")
    lines += _chosen_lines(outcomes)
    lines += ["## Plots", ""] + ([f"![{path}]({path})" for path in drawn] if notice is None else [notice])
    lines += ["", "Every metric of every stage is in `report.json`, in the stage folder's `metrics.json` and in "
              "`run.json`.", ""]
    write_text(run_dir / "report.md", "\n".join(lines))
    return verdicts


def seed_order(means: dict[str, float], spread: dict[str, float], expect=None) -> list[str]:
    """What a reader of many seeds looks for first: the `expect` metrics, then those that vary across seeds,
    then the constants (std 0: settings and counts that no seed changes)."""
    expected = [key for key in (expect.metrics if expect is not None else {}) if key in means]
    rest = [key for key in means if key not in expected]
    return expected + [k for k in rest if spread[k] > 0] + [k for k in rest if spread[k] == 0]


def _headline_keys(means: dict[str, float], spread: dict[str, float], expect=None) -> list[str]:
    """Run-level and each stage's headline metrics, in seed_order: what the terminal shows of many seeds."""
    expected = set(expect.metrics) if expect is not None else set()
    return [k for k in seed_order(means, spread, expect)
            if k in expected or "." not in k or k.partition(".")[2] in HEADLINE]


def seeds_table(recipe_name: str, seeds: list[int], means: dict[str, float], spread: dict[str, float],
                expect=None) -> Table:
    table = Table(title=f"nnopt run: {recipe_name}, seeds {', '.join(map(str, seeds))} (mean ± std)")
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("std", justify="right")
    for key in _headline_keys(means, spread, expect):
        table.add_row(key, _cell(means[key]), _cell(spread[key]))
    return table


def write_seed_report(run_dir: Path, recipe, run_dirs: list[Path], per_seed: list[StageOutcome], means: dict[str, float],
                      spread: dict[str, float], verdicts: list[Verdict]) -> None:
    """report.json and report.md over the seeds: every numeric metric's mean, std and per-seed values."""
    seeds = list(recipe.seeds)
    write_json(run_dir / "report.json", {
        "name": recipe.name, "seeds": seeds, "runs": [str(path.relative_to(run_dir)) for path in run_dirs],
        "std": "sample standard deviation (n - 1); 0 for one seed",
        "metrics": {key: {"mean": means[key], "std": spread[key], "values": [run[key] for run in per_seed]}
                    for key in means},
        "expect": None if recipe.expect is None else {
            "source": recipe.expect.source, "checked_on": "mean over seeds",
            "passed": all(v.passed for v in verdicts), "verdicts": [v.to_json() for v in verdicts]},
    })
    lines = [f"# {recipe.name}: {len(seeds)} seeds", "", recipe.description, "",
             f"Seeds {', '.join(map(str, seeds))}; each run's own report is in "
             + ", ".join(f"[{path.name}]({path.name}/report.md)" for path in run_dirs)
             + ". Std is the sample standard deviation (n - 1).", ""]
    if recipe.expect is not None:
        lines += verdict_lines(recipe.expect.source + ", checked on the mean", verdicts)
    lines += ["## Metrics", "", "The `expect` metrics first, then those that vary across seeds, then the constants (std 0).",
              "", "| metric | mean | std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|---|---|" + "---|" * len(seeds)]
    for key in seed_order(means, spread, recipe.expect):
        lines.append(f"| {key} | {_cell(means[key])} | {_cell(spread[key])} | "
                     + " | ".join(_cell(run[key]) for run in per_seed) + " |")
    write_text(run_dir / "report.md", "\n".join(lines + [""]))
