"""The fastest correct way to run a model artifact on this CPU: candidate paths, checked against eager, timed."""

from __future__ import annotations

import copy
import warnings
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from runner.measure import paired_latency_ms

SPARSE_FROM = 0.7  # Linear layers at least this sparse run as CSR; denser ones lose to the dense GEMM


class CsrLinear(nn.Module):
    """A Linear whose weight is a CSR matrix: the work scales with the nonzeros (MKL sparse GEMM).

    With 92% of LeNet-300-100's weights pruned this is about 2.4x faster than the dense GEMM at
    batch 256 and slower at batch 1, where call overhead dominates; `fastest_path` decides."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        with warnings.catch_warnings():  # torch's "CSR support is in beta" notice, printed once per run, tells a user nothing
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.weight = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def _baked(model: nn.Module) -> nn.Module:
    """A copy with masks (and other parametrizations) replaced by the weights they produce."""
    from runner.compress.int8 import bake_parametrizations

    return bake_parametrizations(copy.deepcopy(model)).eval()


def _sparse(model: nn.Module) -> nn.Module | None:
    """A baked copy whose highly sparse float Linear layers are CsrLinear; None if no layer qualifies."""
    model = _baked(model)
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.is_floating_point():
                density = float(torch.count_nonzero(child.weight)) / child.weight.numel()
                if 1 - density >= SPARSE_FROM:
                    setattr(parent, name, CsrLinear(child))
                    replaced += 1
    return model if replaced else None


def _torchscript(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """Traced and frozen: no Python per layer, weights inlined as constants (works for eager int8 too)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(_baked(model), example, check_trace=False)
        return torch.jit.freeze(traced.eval())


def candidates(model: nn.Module, example: torch.Tensor) -> dict[str, Callable]:
    """Every path worth timing for this model, by name; a path that cannot be built is left out."""
    paths: dict[str, Callable] = {"eager": model}
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        paths["baked_masks"] = _baked(model)
    builders = {"torchscript": lambda: _torchscript(model, example), "sparse_csr": lambda: _sparse(model)}
    for name, build in builders.items():
        try:
            path = build()
        except Exception:  # noqa: BLE001 - a layer the tracer or CSR conversion cannot take: not a candidate
            continue
        if path is not None:
            paths[name] = path
    return paths


@torch.inference_mode()
def fastest_path(model: nn.Module, example: torch.Tensor, repeats: int, warmup: int) -> tuple[str, Callable, float]:
    """(name, runnable, median ms) of the fastest path whose outputs match eager's on `example`.

    A path must agree with eager to within 1e-4 of the output scale: baking masks, tracing and CSR
    change the order of floating-point sums, never the math. The paths take turns on every repeat
    (runner.measure.paired_latency_ms), so a load change on a shared machine hits them alike."""
    model.eval()
    reference = model(example)
    tolerance = 1e-4 * max(1.0, float(reference.abs().max()))
    paths = {name: path for name, path in candidates(model, example).items()
             if name == "eager" or torch.allclose(path(example), reference, rtol=0, atol=tolerance)}
    times = paired_latency_ms(list(paths.values()), example, repeats, warmup)
    name, ms = min(zip(paths, times), key=lambda pair: pair[1])
    return name, paths[name], ms
