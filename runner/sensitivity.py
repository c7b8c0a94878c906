"""Per-layer sensitivity scans: validation accuracy with one layer alone pruned or quantized, without retraining."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from runner.compress.int8 import bake_parametrizations
from runner.compress.sharing import kmeans_1d
from runner.files import read_json, write_json

SCAN_FILE = "sensitivity.json"
PLOT_FILE = "sensitivity.png"


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Fraction of (x, y) the model classifies right, in batches of `batch_size`."""
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(dim=1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def _pruned(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The weight with its `sparsity` smallest magnitudes zeroed; zeros go first, so none comes back."""
    count = round(sparsity * weight.numel())
    keep = torch.ones(weight.numel(), dtype=torch.bool)
    keep[torch.sort(weight.abs().flatten(), stable=True).indices[:count]] = False
    return weight * keep.view(weight.shape)


def _shared(weight: torch.Tensor, bits: int, iterations: int) -> torch.Tensor:
    """The weight's nonzeros replaced by their k-means centroid (2^bits of them), as weight sharing stores it."""
    kept = weight != 0
    if not kept.any():
        return weight
    assignment, centroids = kmeans_1d(weight[kept], 2**bits, iterations)
    shared = torch.zeros_like(weight)
    shared[kept] = centroids[assignment]
    return shared


def _int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-tensor int8, the weight format of torch's dynamic int8 Linear."""
    scale = max(float(weight.abs().max()) / 127, 1e-12)
    return torch.fake_quantize_per_tensor_affine(weight, scale, 0, -128, 127)


def _quantize_input(module, inputs):
    """The layer's input quantized per batch to 7-bit unsigned affine, as torch's dynamic int8 kernels do
    (reduce_range on x86)."""
    x = inputs[0]
    low, high = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = max((high - low) / 127, 1e-12)
    zero_point = int(min(max(round(-low / scale), 0), 127))
    return (torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 127),) + tuple(inputs[1:])


def scan(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, names: list[str], sparsities: list[float],
         bits: list[int], int8: bool, kmeans_iterations: int, batch_size: int) -> dict:
    """Accuracy on (x, y) with each named weight alone pruned to each sparsity, shared at each bit width, and
    (with `int8`) run in simulated dynamic int8; every other layer stays as it is. The model is not changed.

    A level at or below a layer's present sparsity is skipped: pruning never revives a weight."""
    work = bake_parametrizations(copy.deepcopy(model)).eval()
    weights = dict(work.named_parameters())
    baseline = accuracy(work, x, y, batch_size)
    layers = {}
    for name in names:
        weight = weights[name]
        original = weight.detach().clone()
        present = float((original == 0).float().mean())
        entry: dict = {"size": original.numel(), "sparsity": round(present, 6), "pruned": [], "shared": []}

        def measure(value: torch.Tensor) -> float:
            with torch.no_grad():
                weight.copy_(value)
            try:
                return accuracy(work, x, y, batch_size)
            finally:
                with torch.no_grad():
                    weight.copy_(original)

        for level in sorted(sparsities):
            if level > present:
                entry["pruned"].append([level, measure(_pruned(original, level))])
        for width in sorted(bits):
            entry["shared"].append([width, measure(_shared(original, width, kmeans_iterations))])
        if int8:
            hook = work.get_submodule(name.rpartition(".")[0]).register_forward_pre_hook(_quantize_input)
            try:
                entry["int8"] = measure(_int8_weight(original))
            finally:
                hook.remove()
        layers[name] = entry
    return {"examples": len(x), "baseline_acc": baseline, "layers": layers}


def write(result: dict, folder: Path) -> None:
    write_json(Path(folder) / SCAN_FILE, result)


def read(folder: Path) -> dict:
    return read_json(Path(folder) / SCAN_FILE)


def plot(result: dict, path: Path, title: str) -> Path | None:
    """Accuracy against sparsity and against codebook bits, one curve per layer; None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    prune_axes, bits_axes = figure.subplots(1, 2)
    baseline = result["baseline_acc"]
    for name, entry in result["layers"].items():
        label = f"{name} ({entry['size']:,})"
        points = [[entry["sparsity"], baseline]] + entry["pruned"]
        prune_axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        if entry["shared"]:
            line, = bits_axes.plot([p[0] for p in entry["shared"]], [p[1] for p in entry["shared"]], marker="o",
                                   label=label)
            if "int8" in entry:
                bits_axes.scatter([8], [entry["int8"]], marker="s", color=line.get_color())
    for axes in (prune_axes, bits_axes):
        axes.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="unchanged")
        axes.set_ylabel(f"validation accuracy ({result['examples']} examples)")
        axes.grid(alpha=0.3)
    prune_axes.set_xlabel("sparsity of that layer alone (magnitude, no retraining)")
    prune_axes.set_title(f"{title}: pruning")
    bits_axes.set_xlabel("codebook bits of that layer alone (squares: int8)")
    bits_axes.set_title(f"{title}: weight sharing and int8")
    prune_axes.legend(fontsize=8)
    bits_axes.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
