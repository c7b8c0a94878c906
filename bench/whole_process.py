"""Whole-process time of a 10-epoch LeNet-300-100 run: `nnopt run recipes/train_lenet300.yaml --force` against a
plain PyTorch script doing the same work (import torch, load MNIST, 10 epochs of SGD with warmup + cosine at batch
128 on one thread, validation after each epoch, the test error at the end), each a fresh process, in turns.

Usage: python -m bench.whole_process [--repeats 3]      (the plain script alone: python -m bench.whole_process --plain)
"""

from __future__ import annotations

import argparse
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "train_lenet300.yaml"
EPOCHS, BATCH, LR, WARMUP_EPOCHS = 10, 128, 0.1, 1


def plain() -> None:
    import torch
    from torch import nn

    from runner.data.mnist import mnist

    torch.set_num_threads(1)
    torch.manual_seed(0)
    splits = mnist()
    (x, y), (val_x, val_y), (test_x, test_y) = splits.train, splits.val, splits.test
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=1e-4)
    per_epoch = math.ceil(len(x) / BATCH)
    steps, warmup = EPOCHS * per_epoch, WARMUP_EPOCHS * per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return 0.01 + 0.99 * step / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    loss_fn = nn.CrossEntropyLoss()

    def error(images, labels) -> float:
        model.eval()
        with torch.no_grad():
            wrong = sum(int((model(images[i:i + 1024]).argmax(1) != labels[i:i + 1024]).sum())
                        for i in range(0, len(images), 1024))
        model.train()
        return wrong / len(images)

    for _ in range(EPOCHS):
        order = torch.randperm(len(x))
        for i in range(0, len(x), BATCH):
            batch = order[i:i + BATCH]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()
            schedule.step()
        error(val_x, val_y)
    print(f"test error {error(test_x, test_y):.4f}")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _seconds(command: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one process (the CPU figure is what other jobs on the machine do not inflate)."""
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, _children_cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="run the plain script once, in this process")
    args = parser.parse_args()
    if args.plain:
        plain()
        return
    times: dict[str, list[tuple[float, float]]] = {"nnopt": [], "plain": []}
    with tempfile.TemporaryDirectory() as output:
        for _ in range(args.repeats):
            times["nnopt"].append(_seconds([sys.executable, "-m", "runner", "run", str(RECIPE), "--force", "-O", output]))
            times["plain"].append(_seconds([sys.executable, "-m", "bench.whole_process", "--plain"]))
    for index, kind in enumerate(("wall", "CPU")):
        ours, theirs = ([t[index] for t in times[name]] for name in ("nnopt", "plain"))
        ratio = statistics.median(b / a for a, b in zip(ours, theirs))
        print(f"{kind} s, nnopt run: {[round(t, 1) for t in ours]}; plain script: {[round(t, 1) for t in theirs]}; "
              f"speed of nnopt relative to the plain script (plain / nnopt, median of {args.repeats} turns): {ratio:.3f}")


if __name__ == "__main__":
    main()
