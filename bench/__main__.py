"""`python -m bench`: training throughput, recipe wall time and artifact latency, measured
interleaved in one process (each repeat runs every variant, in rotating order, so machine noise
hits them alike); writes medians and per-repeat ratios to bench/results.json and runner/CONTRIBUTING.md."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch

from bench import inference, recipes, train
from bench.report import write_readme

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STEPS = {"lenet_300_100": 300, "lenet5": 20}
DEFAULT_RECIPES = ["recipes/train_lenet300.yaml", "recipes/prune_then_quant.yaml"]


def interleaved(tasks: dict[str, Callable[[], float]], repeats: int, warmup: bool = True) -> dict[str, list[float]]:
    """Each repeat runs every task once, starting one later each time; returns each task's samples."""
    names = list(tasks)
    if warmup:
        for name in names:
            tasks[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            samples[name].append(tasks[name]())
    return samples


def ratio(samples: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over repeats of numerator/denominator taken within the same repeat."""
    return statistics.median(a / b for a, b in zip(samples[numerator], samples[denominator]))


def bench_train(steps_by_model: dict[str, int], batch_size: int, repeats: int) -> dict:
    data = train.load_mnist(batch_size)
    out = {}
    for model, steps in steps_by_model.items():
        for run in train.RUNNERS.values():  # warm-up: first calls pay for imports and allocator growth
            run(model, data, 2)
        tasks = {name: (lambda run=run, model=model, steps=steps: run(model, data, steps)[0])
                 for name, run in train.RUNNERS.items()}
        print(f"train {model}: {steps} steps x {len(tasks)} variants x {repeats} repeats", flush=True)
        clocks = interleaved(tasks, repeats, warmup=False)
        entry = out[model] = {"steps": steps, "batch_size": batch_size}
        for kind in ("wall", "cpu"):
            seconds = {k: [getattr(c, kind) for c in v] for k, v in clocks.items()}
            entry[kind] = {
                "seconds": seconds,
                "samples_per_second": {k: round(steps * batch_size / statistics.median(v), 1) for k, v in seconds.items()},
                # speed relative to the plain loop: its seconds over theirs, repeat by repeat
                "speed_vs_plain_loop": {k: round(ratio(seconds, "plain_loop", k), 3) for k in seconds},
            }
    return out


def bench_recipes(paths: list[Path], repeats: int, keep: Path) -> dict:
    out_roots = {path: keep / path.stem for path in paths}

    def task(path: Path) -> float:
        shutil.rmtree(out_roots[path], ignore_errors=True)
        return recipes.run_recipe(path, out_roots[path])

    print(f"recipes: {', '.join(p.name for p in paths)} x {repeats} repeats", flush=True)
    seconds = interleaved({str(p.relative_to(ROOT)): (lambda p=p: task(p)) for p in paths}, repeats, warmup=False)
    return {name: {"seconds": v, "median_seconds": round(statistics.median(v), 2)} for name, v in seconds.items()}


def bench_inference(run_dirs: list[Path], batch_sizes: list[int], repeats: int, forwards: int) -> dict:
    images = train.load_mnist(128).test[0]
    out = {}
    for run_dir in run_dirs:
        models = inference.find_artifacts(run_dir)
        reference = next(iter(models))  # the first stage's model: the dense fp32 one a recipe starts from
        for batch_size in batch_sizes:
            example = images[:batch_size].contiguous()
            chosen = inference.runnables(models, example, forwards)
            tasks = {}
            for name, (model, _, runnable) in chosen.items():
                tasks[f"{name}|eager"] = lambda m=model: inference.time_once(m, example, forwards)
                tasks[f"{name}|fastest"] = lambda m=runnable: inference.time_once(m, example, forwards)
            print(f"latency {run_dir.name} b{batch_size}: {len(models)} artifacts x 2 paths x {repeats} repeats",
                  flush=True)
            ms = interleaved(tasks, repeats)
            for name, (_, path, _) in chosen.items():
                entry = out.setdefault(name, {"reference": reference})
                entry[f"path_b{batch_size}"] = path
                for how in ("eager", "fastest"):
                    entry[f"{how}_ms_b{batch_size}"] = round(statistics.median(ms[f"{name}|{how}"]), 4)
                    # speed-up over the dense fp32 artifact run the same way, repeat by repeat
                    entry[f"{how}_speedup_b{batch_size}"] = round(ratio(ms, f"{reference}|{how}", f"{name}|{how}"), 3)
    return out


def conditions(args) -> dict:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "torch": torch.__version__, "pytorch_lightning": pl.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "repeats": args.repeats,
    }


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--sections", nargs="+", choices=["train", "recipes", "inference"],
                        default=["train", "recipes", "inference"])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats for train and latency")
    parser.add_argument("--steps", nargs="+", metavar="MODEL=STEPS",
                        default=[f"{k}={v}" for k, v in DEFAULT_STEPS.items()])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--recipes", nargs="+", type=Path, default=[ROOT / p for p in DEFAULT_RECIPES],
                        help="recipes timed end to end; missing files are skipped and reported")
    parser.add_argument("--recipe-repeats", type=int, default=1)
    parser.add_argument("--artifacts", nargs="*", type=Path, default=[],
                        help="run folders (outputs/<recipe>) whose artifacts to time; default: the recipes just run")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 256])
    parser.add_argument("--forwards", type=int, default=50, help="forward passes per latency sample")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (pinned: the machine is shared)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--readme", type=Path, default=ROOT / "runner" / "CONTRIBUTING.md",
                        help="the page whose bench table to rewrite (default: runner/CONTRIBUTING.md); `-` for none")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    results: dict = {"conditions": conditions(args)}
    keep = Path(tempfile.mkdtemp(prefix="nnopt-bench-"))
    try:
        if "train" in args.sections:
            steps = {k: int(v) for k, v in (item.split("=", 1) for item in args.steps)}
            results["train"] = bench_train(steps, args.batch_size, args.repeats)
        run_dirs = list(args.artifacts)
        if "recipes" in args.sections:
            present = [p.resolve() for p in args.recipes if p.is_file()]
            results["recipes_missing"] = [str(p) for p in args.recipes if not p.is_file()]
            results["recipes"] = bench_recipes(present, args.recipe_repeats, keep)
            results["recipes_threads"] = torch.get_num_threads()
            if not run_dirs:
                run_dirs = [d for p in present for d in (keep / p.stem).iterdir() if d.is_dir()]
        if "inference" in args.sections and run_dirs:
            results["inference"] = bench_inference(run_dirs, args.batch_sizes, args.repeats, args.forwards)
        torch.set_num_threads(args.threads)  # a recipe may have changed it
        results["conditions"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(keep, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    if str(args.readme) != "-":
        write_readme(args.readme, results)
        print(f"updated the bench table in {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
