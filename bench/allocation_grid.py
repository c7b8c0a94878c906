"""How much the per-layer allocation matters after fine-tuning: a recipe with `scope: auto` pruning run as it is,
with global magnitude, and with hand-set per-layer levels on a grid, all at the same total, on the same dense
models (reused from the store), compared on validation and test error per seed.

Usage: python -m bench.allocation_grid RECIPE --vary LAYER=KEPT,KEPT... [--vary ...] --rest LAYER
           [--seeds 0,1,2] [-o KEY=VALUE ...] [-O outputs]
e.g.   python -m bench.allocation_grid recipes/auto_prune_lenet300.yaml -o 'data.limit={}' -o stages.train.epochs=12 \
           --vary fc1.weight=6500,8000,9500,11000 --vary fc3.weight=350,650,950 --rest fc2.weight
Each grid point keeps the given numbers of weights in the --vary layers and the rest of the recipe's total in
the --rest layer (other pruned layers keep the sparsity auto chose). A flat table (every point within the
seeds' noise of the best) means no allocation, automatic or by hand, can beat another by more than noise there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import operator
import statistics
from pathlib import Path

from runner import api
from runner.errors import RecipeError

_TEST = "test_error"


def _per_seed(result) -> list[dict[str, float]]:
    """Test error and the validation error of the last fit before it, per seed folder of a run."""
    rows = []
    for run_dir in result.run_dirs:
        report = json.loads((Path(run_dir) / "report.json").read_text())
        fits = [stage["metrics"]["val_acc"] for stage in report["stages"] if "val_acc" in stage.get("metrics", {})]
        rows.append({"test": report["run_metrics"][_TEST], "val": 1.0 - fits[-1]})
    return rows


def _prune_stage(recipe):
    found = [stage for stage in recipe.stages if stage.kind == "prune" and stage.scope == "auto"]
    if len(found) != 1:
        raise SystemExit(f"{recipe.name}: expected one `prune` stage with `scope: auto`, found {len(found)}")
    return found[0]


def _auto_counts(result, stage_name: str) -> tuple[dict[str, int], dict[str, int]]:
    """(layer sizes, pruned counts) of the automatic allocation, from the first seed's prune stage."""
    folder = next(Path(result.run_dirs[0]).glob(f"[0-9][0-9]-{stage_name}"))
    pruned = json.loads((folder / "metrics.json").read_text())["allocation"]["pruned"]
    model = api.load(folder)
    return {name: operator.attrgetter(name)(model).numel() for name in sorted(pruned)}, pruned


def _summary(rows: list[dict[str, float]], key: str) -> str:
    values = [row[key] * 100 for row in rows]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {spread:.3f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--vary", action="append", required=True, metavar="LAYER=KEPT,KEPT")
    parser.add_argument("--rest", required=True, metavar="LAYER")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("-o", dest="overrides", action="append", default=[])
    parser.add_argument("-O", dest="output_dir", default="outputs")
    args = parser.parse_args()

    base = list(args.overrides) + [f"seeds=[{args.seeds}]"]
    recipe = api.validate(args.recipe, base)
    prune = _prune_stage(recipe)
    at = f"stages.{prune.name}"
    runs = {"auto": api.run(args.recipe, base, output_dir=args.output_dir)}
    sizes, auto_pruned = _auto_counts(runs["auto"], prune.name)
    runs["global"] = api.run(args.recipe, base + [f"name={recipe.name}_global", f"{at}.allocation=null",
                                                  f"{at}.scope=global"], output_dir=args.output_dir)
    kept_total = sum(sizes.values()) - sum(auto_pruned.values())
    varied = {name: [int(k) for k in kept.split(",")] for name, kept in (v.split("=", 1) for v in args.vary)}
    unknown = [name for name in [*varied, args.rest] if name not in sizes]
    if unknown:
        raise SystemExit(f"not a pruned layer: {', '.join(unknown)} (pruned: {', '.join(sizes)})")
    fixed = {name: sizes[name] - auto_pruned[name] for name in sizes if name not in varied and name != args.rest}
    for point in itertools.product(*varied.values()):
        kept = dict(zip(varied, point)) | fixed
        kept[args.rest] = kept_total - sum(kept.values())
        outside = [f"{name} would keep {kept[name]:,} of {sizes[name]:,}" for name in kept
                   if not 0 < kept[name] <= sizes[name]]
        if outside:
            print(f"skipped {point}: {'; '.join(outside)}")
            continue
        levels = ", ".join(f"{name}: {1 - kept[name] / sizes[name]!r}" for name in sizes)
        label = "grid " + " ".join(f"{name}={kept[name]}" for name in sizes)
        runs[label] = api.run(args.recipe, base + [f"name={recipe.name}_grid_{'_'.join(map(str, point))}",
                                                   f"{at}.allocation=null", f"{at}.scope=layer",
                                                   f"{at}.sparsity={{{levels}}}"], output_dir=args.output_dir)

    rows = {label: _per_seed(result) for label, result in runs.items()}
    reference = rows["global"]
    print(f"\n{recipe.name}: {kept_total:,} of {sum(sizes.values()):,} weights kept, seeds {args.seeds}; "
          "sorted by validation error (what a tuner could select on)")
    print(f"| allocation | val error | test error | test minus global, per seed (mean ± se) |\n|---|---|---|---|")
    for label, per_seed in sorted(rows.items(), key=lambda item: statistics.fmean(r["val"] for r in item[1])):
        differences = [(row["test"] - ref["test"]) * 100 for row, ref in zip(per_seed, reference)]
        error = statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else 0.0
        print(f"| {label} | {_summary(per_seed, 'val')} | {_summary(per_seed, 'test')} | "
              f"{statistics.fmean(differences):+.3f} ± {error:.3f} |")


if __name__ == "__main__":
    try:
        main()
    except RecipeError as err:  # a bad recipe or override: its located message, not a traceback
        raise SystemExit(str(err)) from None
