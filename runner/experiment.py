"""A recipe run once, or once per seed with every metric reported as mean ± std (Blalock et al. 2020 §4)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_only
from rich.console import Console

from runner.pipeline import run_recipe
from runner.report import seeds_table, write_seed_report
from runner.store import Store, claim, store_of
from runner.verdicts import Verdict, flat_metrics, judge, verdict_table


@dataclass
class Result:
    """What a recipe reached: metric means (a single run's values with one seed), their spread, verdicts."""

    values: dict[str, float]
    spread: dict[str, float] | None  # sample standard deviation per metric; None for a single run
    verdicts: list[Verdict]
    run_dirs: list[Path]

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)


def single_runs(recipe, run_dir: Path) -> list[tuple[object, Path]]:
    """(recipe with one seed, its run folder) per run: `run_dir` itself, or `run_dir/seed-<k>/` per seed."""
    if recipe.seeds is None:
        return [(recipe, Path(run_dir))]
    return [(recipe.model_copy(update={"seed": seed, "seeds": None}), Path(run_dir) / f"seed-{seed}")
            for seed in recipe.seeds]


def aggregate(per_seed: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample standard deviation (n - 1) of every metric that all runs report."""
    keys = [key for key in per_seed[0] if all(key in run for run in per_seed)]
    means = {key: statistics.fmean(run[key] for run in per_seed) for key in keys}
    spread = {key: statistics.stdev([run[key] for run in per_seed]) if len(per_seed) > 1 else 0.0 for key in keys}
    return means, spread


def run_experiment(recipe, run_dir: Path, console: Console, *, recipe_file: Path | None = None,
                   store: Store | None = None, **run_options) -> Result:
    """Run `recipe` into `run_dir`; with `seeds`, each seed into `run_dir/seed-<k>/` plus a summary in `run_dir`.

    The seeds share one stage store: `store`, by default `run_dir/.store` (a sweep passes its recipe's).
    With `recipe_file`, `run_dir` must belong to that file or to nobody yet (runner.store.claim; `force`
    takes it over). `run_options` go to every run_recipe call (force, start, only).
    """
    run_dir = Path(run_dir)
    if recipe_file is not None:
        claim(run_dir, recipe_file, take_over=run_options.get("force", False))
    store = store if store is not None else store_of(run_dir)
    if recipe.seeds is None:
        values = flat_metrics(run_recipe(recipe, run_dir.parent, console, run_dir=run_dir, store=store, **run_options))
        return Result(values, None, judge(recipe.expect, values), [run_dir])

    per_seed, run_dirs = [], []
    for single, folder in single_runs(recipe, run_dir):
        console.rule(f"{recipe.name}: seed {single.seed}")
        per_seed.append(flat_metrics(run_recipe(single, run_dir, console, run_dir=folder, store=store, **run_options)))
        run_dirs.append(folder)
    means, spread = aggregate(per_seed)
    verdicts = judge(recipe.expect, means, spread)
    if rank_zero_only.rank == 0:  # in a multi-process run the other ranks hold no metrics of stages they skip
        write_seed_report(run_dir, recipe, run_dirs, per_seed, means, spread, verdicts)
    console.print(seeds_table(recipe.name, recipe.seeds, means, spread, recipe.expect))
    if recipe.expect is not None:
        console.print(verdict_table(recipe.expect.source, verdicts, runs=len(recipe.seeds)))
    console.print(f"summary of {len(recipe.seeds)} seeds: {run_dir / 'report.md'}")
    return Result(means, spread, verdicts, run_dirs)
