"""Forward latency of fp32 vs int8 (torch.ao, x86 engine, fbgemm kernels): the LeNets and torchvision's ResNet-18.

Usage: python -m bench.int8_latency [--repeats 200] [--resnet-repeats 10] [--only lenet|resnet18]
(from the repository root; ~30 s idle for the LeNets, a few minutes for ResNet-18 at 224x224).
LeNets: dynamic and static int8 on the eager path, one thread. ResNet-18: static int8 through FX graph
mode (residual additions run quantized::add_relu), batch 1 and 32, one and two threads.
The models take turns on every repeat (runner.measure.paired_latency_ms), so machine load hits all
alike; the figures are medians. Weights are random: latency does not depend on their values.
"""

from __future__ import annotations

import argparse
import os

import torch

from runner.compress import int8
from runner.measure import paired_latency_ms
from runner.models import MODELS


def static_int8(model: torch.nn.Module, calibration: torch.Tensor, observer: str) -> torch.nn.Module:
    prepared, _ = int8.prepare(model, qat=False, weights="per_channel", observer=observer, example=calibration[:1])
    with torch.inference_mode():
        prepared(calibration)
    return int8.convert(prepared, calibration[:1])


def lenets(repeats: int) -> None:
    torch.set_num_threads(1)
    print(f"\nLeNets: 1 thread, median of {repeats} interleaved repeats")
    print("| model | batch | fp32 ms | dynamic int8 ms | static int8 ms | dynamic/fp32 | static/fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name in ("lenet_300_100", "lenet5"):
        torch.manual_seed(0)
        model = MODELS.get(name)().eval()
        models = [model, int8.dynamic_int8(model), static_int8(model, torch.rand(256, 1, 28, 28), "histogram")]
        for batch in (1, 256):
            example = torch.rand(batch, 1, 28, 28)
            fp32, dynamic, static = paired_latency_ms(models, example, repeats, warmup=10)
            print(f"| {name} | {batch} | {fp32:.4f} | {dynamic:.4f} | {static:.4f} | {dynamic / fp32:.2f} | "
                  f"{static / fp32:.2f} |")


def resnet18(repeats: int) -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000).eval()
    quantized = static_int8(model, torch.rand(8, 3, 224, 224), "minmax")
    print(f"\ntorchvision resnet18, 224x224: median of {repeats} interleaved repeats")
    print("| threads | batch | fp32 ms | static int8 ms | int8/fp32 |")
    print("|---|---|---|---|---|")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch in (1, 32):
            example = torch.rand(batch, 3, 224, 224)
            fp32, static = paired_latency_ms([model, quantized], example, repeats, warmup=2)
            print(f"| {threads} | {batch} | {fp32:.1f} | {static:.1f} | {static / fp32:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=200, help="interleaved repeats for the LeNets")
    parser.add_argument("--resnet-repeats", type=int, default=10, help="interleaved repeats for ResNet-18")
    parser.add_argument("--only", choices=["lenet", "resnet18"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, engine {int8.ENGINE}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    if args.only in (None, "lenet"):
        lenets(args.repeats)
    if args.only in (None, "resnet18"):
        resnet18(args.resnet_repeats)


if __name__ == "__main__":
    main()
