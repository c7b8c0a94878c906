"""Forward latency of fp32 vs dynamic int8 vs static int8 (torch.ao eager, x86 engine), one thread.

Usage: python -m bench.int8_latency [--repeats 200]     (from the repository root; ~30 s idle)
The models take turns on every repeat (runner.measure.paired_latency_ms), so machine load hits all
alike; the figures are medians. Weights are random: latency does not depend on their values.
"""

from __future__ import annotations

import argparse

import torch

from runner.compress import int8
from runner.measure import paired_latency_ms
from runner.models import MODELS


def variants(name: str) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    model = MODELS.get(name)().eval()
    prepared, groups = int8.prepare(model, qat=False, weights="per_channel", observer="histogram")
    calibration = torch.rand(256, 1, 28, 28)
    prepared(calibration)
    return {"fp32": model, "dynamic_int8": int8.dynamic_int8(model),
            "static_int8": int8.convert(prepared, calibration[:2])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, engine {int8.ENGINE}, 1 thread, median of {args.repeats} interleaved repeats")
    print("| model | batch | fp32 ms | dynamic int8 ms | static int8 ms | dynamic/fp32 | static/fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name in ("lenet_300_100", "lenet5"):
        models = variants(name)
        for batch in (1, 256):
            example = torch.rand(batch, 1, 28, 28)
            fp32, dynamic, static = paired_latency_ms(list(models.values()), example, args.repeats, warmup=10)
            print(f"| {name} | {batch} | {fp32:.4f} | {dynamic:.4f} | {static:.4f} | {dynamic / fp32:.2f} | "
                  f"{static / fp32:.2f} |")


if __name__ == "__main__":
    main()
