"""Deep Compression weight sharing (Han et al. 2016 §3): per-layer k-means codebooks over the nonzero weights."""

from __future__ import annotations

import copy
import fnmatch

import torch
from torch import nn
from torch.nn.utils import parametrize

from runner.compress.int8 import bake_parametrizations
from runner.transforms import TRANSFORMS, record

_SHAREABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
PRUNED = -1  # assignment of a pruned position: it reads the constant 0, never a centroid


class SharedWeight(nn.Module):
    """weight = [0, c_1, ..., c_k][assignment + 1]; the codebook c is the stored (trainable) tensor.

    Indexing makes autograd give each centroid the sum of its members' gradients (Han 2016 §3.3,
    eq. 3), and pruned positions read the fixed 0, so they stay zero through fine-tuning.
    """

    def __init__(self, assignment: torch.Tensor, clusters: int):
        super().__init__()
        self.clusters = clusters
        self.register_buffer("assignment", assignment.to(torch.int16))

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        return torch.cat([codebook.new_zeros(1), codebook])[self.assignment.long() + 1]

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The codebook that reproduces `weight` best under the assignment: each cluster's mean."""
        index = self.assignment.long().flatten()
        members = index != PRUNED
        sums = torch.zeros(self.clusters, dtype=weight.dtype).index_add_(0, index[members], weight.flatten()[members])
        counts = torch.bincount(index[members], minlength=self.clusters).clamp(min=1)
        return sums / counts


def kmeans_1d(values: torch.Tensor, clusters: int, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means in one dimension with linear initialisation over [min, max] (Han 2016 §3.2, the best
    of the three inits they compare). Returns (assignment, centroids); centroids stay sorted."""
    centroids = torch.linspace(float(values.min()), float(values.max()), clusters, dtype=values.dtype)
    assignment = torch.full_like(values, -1, dtype=torch.long)
    for _ in range(iterations):
        new = torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)
        if torch.equal(new, assignment):
            break
        assignment = new
        counts = torch.bincount(assignment, minlength=clusters)
        sums = torch.zeros(clusters, dtype=values.dtype).index_add_(0, assignment, values)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)  # an empty cluster keeps its place
    return assignment, centroids


def bits_for(name: str, bits: int | dict[str, int]) -> int | None:
    """The bits of weight `name`: one value for all, or the first `{glob: bits}` pattern that matches it."""
    if isinstance(bits, int):
        return bits
    return next((b for pattern, b in bits.items() if fnmatch.fnmatch(name, pattern)), None)


def share_weights(model: nn.Module, bits: int | dict[str, int], iterations: int) -> tuple[nn.Module, dict]:
    """Cluster every Linear/Conv weight `bits` selects into 2^bits shared values; pruned zeros stay zero."""
    shared = bake_parametrizations(copy.deepcopy(model))
    layers, metrics = {}, {"layer_bits": {}, "kmeans_iterations": iterations}
    for module_name, module in shared.named_modules():
        name = f"{module_name}.weight"
        layer_bits = bits_for(name, bits) if isinstance(module, _SHAREABLE) else None
        if layer_bits is None:
            continue
        weight = module.weight.detach()
        kept = weight != 0
        assignment = torch.full(weight.shape, PRUNED, dtype=torch.long)
        if kept.any():
            clusters, _ = kmeans_1d(weight[kept], 2**layer_bits, iterations)
            assignment[kept] = clusters  # the codebook follows: SharedWeight.right_inverse = the cluster means
        parametrize.register_parametrization(module, "weight", SharedWeight(assignment, 2**layer_bits), unsafe=True)
        layers[module_name] = 2**layer_bits
        metrics["layer_bits"][name] = layer_bits
    record(shared, "weight_sharing", layers=layers)
    return shared, metrics


def round_floats_to_float16(model: nn.Module) -> None:
    """Every float parameter and buffer (codebooks, biases, BatchNorm) set to its nearest float16 value, in its
    own dtype: the packed artifact then stores each in 2 bytes, exactly (runner.compress.packed)."""
    largest = torch.finfo(torch.float16).max
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if not tensor.is_floating_point() or tensor.dtype == torch.float16:
                continue
            if tensor.numel() and float(tensor.abs().max()) > largest:
                raise ValueError(f"`{name}` holds values beyond float16's range (|x| > {largest:g})")
            tensor.copy_(tensor.to(torch.float16).to(tensor.dtype))


def distinct_values(model: nn.Module) -> dict[str, int]:
    """Distinct nonzero values per shared weight, as the forward pass sees them."""
    return {f"{name}.weight": int(torch.unique(module.weight.detach()[module.weight.detach() != 0]).numel())
            for name, module in model.named_modules()
            if parametrize.is_parametrized(module, "weight")
            and isinstance(module.parametrizations.weight[0], SharedWeight)}


@TRANSFORMS.register("weight_sharing")
def _replay(model: nn.Module, layers: dict[str, int]) -> nn.Module:
    """Codebooks of the recorded sizes on the recorded layers; load_state_dict fills codebooks and assignments."""
    model = bake_parametrizations(model)
    for module_name, clusters in layers.items():
        module = model.get_submodule(module_name)
        placeholder = torch.zeros(module.weight.shape, dtype=torch.long)
        parametrize.register_parametrization(module, "weight", SharedWeight(placeholder, clusters), unsafe=True)
    return model
