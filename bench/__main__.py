"""`python -m bench`: startup, training throughput, the streaming data path, scale, bf16, recipe wall time and
artifact latency, measured
interleaved in one process (each repeat runs every variant, in rotating order, so machine noise
hits them alike); writes medians and per-repeat ratios to bench/results.json and runner/CONTRIBUTING.md."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch

from bench import inference, recipes, streaming, train
from bench.report import write_readme
from runner.data.make_image_folder import SHAPES

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STEPS = {"lenet_300_100": 300, "lenet5": 20}
DEFAULT_RECIPES = ["recipes/train_lenet300.yaml", "recipes/prune_then_quant.yaml"]
STARTUP_COMMANDS = {"nnopt validate recipes/prune_then_quant.yaml": ["-m", "runner", "validate", "recipes/prune_then_quant.yaml"],
                    "nnopt list": ["-m", "runner", "list"], "nnopt schema": ["-m", "runner", "schema"],
                    "python -c 'import torch' (the floor)": ["-c", "import torch"]}
SECTIONS = ["startup", "train", "streaming", "scale", "bf16", "recipes", "inference"]


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
        out[model] = _clock_entry(clocks, "plain_loop", steps, batch_size)
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench_startup(commands: dict[str, list[str]], repeats: int) -> dict:
    """Each command as a fresh process: wall seconds and the child's CPU seconds (which other jobs do not inflate)."""
    cpu: dict[str, list[float]] = {name: [] for name in commands}

    def task(name: str) -> float:
        before, start = _children_cpu(), time.perf_counter()
        subprocess.run([sys.executable, *commands[name]], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        cpu[name].append(_children_cpu() - before)
        return time.perf_counter() - start

    print(f"startup: {len(commands)} commands x {repeats} repeats", flush=True)
    wall = interleaved({name: (lambda name=name: task(name)) for name in commands}, repeats, warmup=False)
    return {name: {"wall_seconds": wall[name], "cpu_seconds": [round(c, 3) for c in cpu[name]],
                   "median_wall_seconds": round(statistics.median(wall[name]), 2),
                   "median_cpu_seconds": round(statistics.median(cpu[name]), 2)} for name in commands}


def _clock_entry(clocks: dict[str, list], reference: str, steps: int, batch_size: int) -> dict:
    """Per variant: seconds, samples per second, and speed relative to `reference` (wall and CPU)."""
    entry: dict = {"steps": steps, "batch_size": batch_size}
    for kind in ("wall", "cpu"):
        seconds = {k: [getattr(c, kind) for c in v] for k, v in clocks.items()}
        entry[kind] = {"seconds": seconds,
                       "samples_per_second": {k: round(steps * batch_size / statistics.median(v), 1)
                                              for k, v in seconds.items()},
                       "speed_vs_" + reference: {k: round(ratio(seconds, reference, k), 3) for k in seconds}}
    return entry


def bench_streaming(folder: Path, per_class: int, image_size: int, batch_size: int, steps: int, workers,
                    repeats: int) -> dict:
    root = streaming.make_folder(folder / "images", per_class, image_size)
    tasks = streaming.streaming_tasks(root, image_size, batch_size, steps, workers)
    print(f"streaming resnet18 {image_size}px: {steps} steps x {len(tasks)} variants x {repeats} repeats", flush=True)
    entry = _clock_entry(interleaved(tasks, repeats), "pre_decoded", steps, batch_size)
    entry.update(image_size=image_size, train_images=per_class * len(SHAPES), workers=workers)
    return entry


def bench_bf16(folder: Path, per_class: int, image_size: int, batch_size: int, steps: dict[str, int],
               repeats: int) -> dict:
    root = streaming.make_folder(folder / "images", per_class, image_size)
    tasks, accuracies = streaming.bf16_tasks(train.load_mnist(128), root, image_size, batch_size, steps)
    print(f"bf16: {len(tasks)} variants x {repeats} repeats", flush=True)
    clocks = interleaved(tasks, repeats)
    out = {}
    for model in steps:
        pair = {precision: clocks[f"{model}|{precision}"] for precision in ("32-true", "bf16-mixed")}
        out[model] = _clock_entry(pair, "32-true", steps[model], 128 if model == "lenet5" else batch_size)
        out[model]["test_accuracy"] = {precision: statistics.median(accuracies[f"{model}|{precision}"])
                                       for precision in pair}
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
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats for train and latency")
    parser.add_argument("--steps", nargs="+", metavar="MODEL=STEPS",
                        default=[f"{k}={v}" for k, v in DEFAULT_STEPS.items()])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=64, help="streaming and bf16: generated image side")
    parser.add_argument("--images-per-class", type=int, default=96, help="streaming: training images per class (4)")
    parser.add_argument("--image-batch-size", type=int, default=32)
    parser.add_argument("--stream-steps", type=int, default=10, help="streaming: steps per run (under one epoch)")
    parser.add_argument("--workers", default="auto", help="streaming and scale: loader workers (auto: cores less one)")
    parser.add_argument("--scale-factors", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--scale-per-class", type=int, default=8, help="scale: training images per class at 1x")
    parser.add_argument("--scale-image-size", type=int, default=32)
    parser.add_argument("--bf16-steps", nargs="+", metavar="MODEL=STEPS", default=["lenet5=20", "resnet18=4"])
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
        workers = args.workers if args.workers == "auto" else int(args.workers)
        if "startup" in args.sections:
            results["startup"] = bench_startup(STARTUP_COMMANDS, args.repeats)
        if "train" in args.sections:
            steps = {k: int(v) for k, v in (item.split("=", 1) for item in args.steps)}
            results["train"] = bench_train(steps, args.batch_size, args.repeats)
        if "streaming" in args.sections:
            results["streaming"] = bench_streaming(keep, args.images_per_class, args.image_size, args.image_batch_size,
                                                   args.stream_steps, workers, args.repeats)
        if "scale" in args.sections:
            results["scale"] = streaming.bench_scale(keep / "scale", args.scale_factors, args.scale_per_class,
                                                     args.scale_image_size, args.image_batch_size, workers, args.threads)
        if "bf16" in args.sections:
            steps = {k: int(v) for k, v in (item.split("=", 1) for item in args.bf16_steps)}
            results["bf16"] = bench_bf16(keep, args.images_per_class, args.image_size, args.image_batch_size, steps,
                                         args.repeats)
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
