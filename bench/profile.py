"""Where the microseconds of a training step go: each bench runner under cProfile, its time per step split
into torch kernels (C++ ops, autograd), torch's Python, Lightning, nnopt and the rest, plus the costliest Python
functions outside torch; and, unprofiled, each runner's CPU cost per step apart from its fixed cost per fit
(from fits of two lengths). `python -m bench.profile --model lenet_300_100 --steps 300`.

cProfile adds a little to every Python call, so the Python rows read high against the kernels; compare rows
between runners, not the total with the unprofiled bench.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import warnings

import torch

from bench import train

BUCKETS = ("torch kernels", "torch python", "lightning", "nnopt", "bench", "python and other")


def bucket(filename: str, function: str) -> str:
    """The part of the stack a profiled function belongs to, from its file (or, for built-ins, its name)."""
    if filename == "~":  # a built-in: torch ops show as `<built-in method torch...>` or `<method '...' of 'torch._C...'>`
        return "torch kernels" if "torch" in function else "python and other"
    if "/pytorch_lightning/" in filename or "/lightning_fabric/" in filename or "/lightning/" in filename:
        return "lightning"
    if "/torch/" in filename:
        return "torch python"
    if "/runner/" in filename:
        return "nnopt"
    if "/bench/" in filename:
        return "bench"
    return "python and other"


def profile_runner(name: str, model: str, data, steps: int) -> dict:
    """One profiled run of `steps` steps: microseconds per step per bucket, and the top Python functions."""
    profiler = cProfile.Profile()
    profiler.enable()
    train.RUNNERS[name](model, data, steps)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    per_bucket = dict.fromkeys(BUCKETS, 0.0)
    functions = []
    for (filename, line, function), (_, calls, self_seconds, _, _) in stats.items():
        part = bucket(filename, function)
        per_bucket[part] += self_seconds
        if part in ("lightning", "nnopt", "torch python", "python and other"):
            where = function if filename == "~" else f"{filename.split('site-packages/')[-1]}:{line}({function})"
            functions.append((self_seconds, calls, part, where))
    functions.sort(reverse=True)
    return {
        "us_per_step": {part: round(1e6 * seconds / steps, 1) for part, seconds in per_bucket.items()},
        "top_python": [{"us_per_step": round(1e6 * s / steps, 1), "calls_per_step": round(c / steps, 2), "part": p,
                        "function": f} for s, c, p, f in functions[:12]],
    }


def marginal_costs(names: list[str], model: str, data, short: int, long: int, repeats: int) -> dict:
    """CPU seconds per step (the slope between a `short` and a `long` fit, medians over interleaved repeats) and
    per fit (what is left of the short fit): a trainer's set-up and end-of-fit work apart from its steps."""
    seconds: dict = {(name, steps): [] for name in names for steps in (short, long)}
    for _ in range(repeats):
        for name in names:
            for steps in (short, long):
                seconds[name, steps].append(train.RUNNERS[name](model, data, steps)[0].cpu)
    out = {}
    for name in names:
        low, high = statistics.median(seconds[name, short]), statistics.median(seconds[name, long])
        per_step = (high - low) / (long - short)
        out[name] = {"us_per_step": round(1e6 * per_step, 1), "ms_per_fit": round(1e3 * (low - short * per_step), 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--model", default="lenet_300_100")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--runners", nargs="+", default=list(train.RUNNERS), choices=list(train.RUNNERS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--marginal-steps", nargs=2, type=int, metavar=("SHORT", "LONG"), default=[10, 310])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the unprofiled fits")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    data = train.load_mnist(args.batch_size)
    for name in args.runners:  # warm-up: imports and allocator growth out of the profile
        train.RUNNERS[name](args.model, data, 2)
    profiles = {name: profile_runner(name, args.model, data, args.steps) for name in args.runners}
    print(f"{args.model}, batch {args.batch_size}, {args.steps} steps under cProfile: microseconds per step")
    print(f"{'':>18}" + "".join(f"{name:>20}" for name in profiles))
    for part in BUCKETS + ("total",):
        cells = [p["us_per_step"][part] if part != "total" else sum(p["us_per_step"].values()) for p in profiles.values()]
        print(f"{part:>18}" + "".join(f"{cell:>20,.1f}" for cell in cells))
    for name, profile in profiles.items():
        print(f"\n{name}: costliest Python outside the kernels (self time)")
        for row in profile["top_python"]:
            print(f"  {row['us_per_step']:8.1f} us  {row['calls_per_step']:6.2f}/step  {row['part']:<16} {row['function']}")
    short, long = args.marginal_steps
    print(f"\nunprofiled, CPU time, fits of {short} and {long} steps, medians of {args.repeats} interleaved repeats:")
    for name, cost in marginal_costs(args.runners, args.model, data, short, long, args.repeats).items():
        print(f"  {name:<20} {cost['us_per_step']:10,.1f} us per step {cost['ms_per_fit']:10,.1f} ms per fit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
