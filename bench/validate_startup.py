"""`python -m bench.validate_startup`: `nnopt validate` of the flagship recipes as fresh processes, cold (an empty
facts cache: torch imported, the model dry-built) and warm (the recipe validated before: runner.recipe.facts_cache
answers, torch is not imported), interleaved with `import torch` and a bare interpreter; medians of wall and CPU."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.__main__ import _children_cpu, interleaved

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ["recipes/han2015_lenet300.yaml", "recipes/prune_then_quant.yaml", "recipes/resnet18_image_folder.yaml"]
# resnet18_image_folder reads a generated image folder and the weights resnet18_shapes trains
NEEDS = {"recipes/resnet18_image_folder.yaml": ("outputs/shapes", "outputs/resnet18_shapes/01-train",
                                                "python -m runner.data.make_image_folder outputs/shapes && "
                                                "nnopt run recipes/resnet18_shapes.yaml --only train")}
FLOORS = {"python -c pass": ["-c", "pass"], "python -c 'import torch'": ["-c", "import torch"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.validate_startup", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--out", type=Path, help="also write the samples as JSON here")
    args = parser.parse_args(argv)
    missing = {r: NEEDS[r][2] for r in args.recipes if r in NEEDS and not all((ROOT / p).exists() for p in NEEDS[r][:2])}
    for recipe, command in missing.items():
        print(f"skipped {recipe}: make its inputs first: {command}")
    recipes = [r for r in args.recipes if r not in missing]
    caches = Path(tempfile.mkdtemp(prefix="nnopt-validate-cache-"))
    commands = dict(FLOORS)
    for recipe in recipes:
        commands[f"{recipe} cold"] = ["-m", "runner", "validate", recipe]
        commands[f"{recipe} warm"] = ["-m", "runner", "validate", recipe]
    cpu: dict[str, list[float]] = {name: [] for name in commands}
    fresh = itertools.count()

    def task(name: str) -> float:
        # cold: a cache folder never used; warm: the one folder every warm run of this recipe shares (primed below)
        cache = caches / (f"cold-{next(fresh)}" if name.endswith("cold") else name.replace("/", "_"))
        before, start = _children_cpu(), time.perf_counter()
        done = subprocess.run([sys.executable, *commands[name]], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "NNOPT_VALIDATE_CACHE": str(cache)})
        cpu[name].append(_children_cpu() - before)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stdout}{done.stderr}")
        return time.perf_counter() - start

    for recipe in recipes:  # prime the warm caches
        task(f"{recipe} warm")
    cpu = {name: [] for name in commands}
    print(f"validate startup: {len(commands)} commands x {args.repeats} repeats, interleaved", flush=True)
    wall = interleaved({name: (lambda name=name: task(name)) for name in commands}, args.repeats, warmup=False)
    print("\n| command | median wall s | median CPU s |\n|---|---:|---:|")
    for name in commands:
        print(f"| `{name}` | {statistics.median(wall[name]):.2f} | {statistics.median(cpu[name]):.2f} |")
    if args.out:
        args.out.write_text(json.dumps({"wall_seconds": wall, "cpu_seconds": cpu}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
