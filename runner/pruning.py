"""Pruning masks as parametrizations, unstructured magnitude/random selection, and the `masks` transform."""

from __future__ import annotations

import fnmatch

import torch
from torch import nn
from torch.nn.utils import parametrize

from runner.errors import StageError
from runner.measure import named_tensors
from runner.transforms import TRANSFORMS, record

PRUNABLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Mask(nn.Module):
    """weight -> weight * mask. The mask is a buffer, so every state dict (artifact, checkpoint) carries it."""

    def __init__(self, shape: torch.Size):
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def _split(name: str) -> tuple[str, str]:
    module_name, _, attr = name.rpartition(".")
    return module_name, attr


def mask_module(model: nn.Module, name: str) -> Mask | None:
    """The Mask on parameter `name` (e.g. `fc1.weight`), or None when it has none."""
    module_name, attr = _split(name)
    module = model.get_submodule(module_name)
    if not parametrize.is_parametrized(module, attr):
        return None
    return next((p for p in module.parametrizations[attr] if isinstance(p, Mask)), None)


def _register(model: nn.Module, name: str) -> None:
    module_name, attr = _split(name)
    module = model.get_submodule(module_name)
    parametrize.register_parametrization(module, attr, Mask(getattr(module, attr).shape))


def add_masks(model: nn.Module, names: list[str]) -> list[str]:
    """Give each named parameter an all-ones Mask if it has none; record the new ones for reloading."""
    added = [name for name in names if mask_module(model, name) is None]
    for name in added:
        _register(model, name)
    if added:
        record(model, "masks", params=added)
    return added


@TRANSFORMS.register("masks")
def _replay_masks(model: nn.Module, params: list[str]) -> nn.Module:
    for name in params:
        _register(model, name)
    return model


def add_masks_from_state_dict(model: nn.Module, state_dict: dict, prefix: str = "") -> list[str]:
    """Create the masks a saved state dict holds, so `load_state_dict(strict=True)` restores them.

    Lightning's own ModelPruning loses masks on resume; a checkpoint of ours names them.
    """
    marker = ".parametrizations."
    names = set()
    for key in state_dict:
        if key.startswith(prefix) and marker in key and key.endswith(".mask"):
            module_name, _, rest = key[len(prefix):].partition(marker)
            names.add(f"{module_name}.{rest.split('.')[0]}")
    return add_masks(model, sorted(names))


def current_mask(model: nn.Module, name: str) -> torch.Tensor:
    found = mask_module(model, name)
    return found.mask.clone() if found is not None else torch.ones_like(named_tensors(model)[name], dtype=torch.bool)


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Install keep-masks and zero the stored weights they remove, so momentum or weight decay cannot revive them."""
    add_masks(model, list(masks))
    for name, mask in masks.items():
        module_name, attr = _split(name)
        mask_module(model, name).mask.copy_(mask)
        model.get_submodule(module_name).parametrizations[attr].original.mul_(mask)


def prunable_names(model: nn.Module, params: list[str] | None = None) -> list[str]:
    """Default: the weights of Linear and Conv layers (biases and BatchNorm excluded); else glob patterns."""
    names = list(named_tensors(model))
    if params is None:
        return [n for n in names if n.endswith(".weight")
                and isinstance(model.get_submodule(_split(n)[0]), PRUNABLE_LAYERS)]
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in params)]


def unmatched_patterns(patterns, names: list[str]) -> list[str]:
    """Patterns that match neither a parameter name nor its module's name."""
    return [p for p in patterns if not any(_matches(p, n) for n in names)]


def _matches(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(_split(name)[0], pattern)


def layer_targets(names: list[str], sparsity: float | dict[str, float]) -> dict[str, float]:
    """Per-parameter target sparsity. In a mapping, later patterns override earlier ones (as in CSS);
    parameters no pattern matches are left alone."""
    if not isinstance(sparsity, dict):
        return {n: sparsity for n in names}
    targets = {}
    for pattern, value in sparsity.items():
        targets.update({n: value for n in names if _matches(pattern, n)})
    return {n: targets[n] for n in names if n in targets}


def _scores(weight: torch.Tensor, mask: torch.Tensor, method: str, generator: torch.Generator) -> torch.Tensor:
    """Lower score = pruned first; already-pruned entries score below everything, so they stay pruned."""
    if method == "magnitude":
        score = weight.detach().abs().float()
    else:  # random: the baseline the pruning literature compares against
        score = torch.rand(weight.shape, generator=generator)
    return torch.where(mask, score, torch.full_like(score, -1.0))


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """A keep-mask removing exactly `count` lowest scores (a stable sort breaks ties by position)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.sort(scores.flatten(), stable=True).indices[:count]] = False
    return keep.view(scores.shape)


def select_masks(model: nn.Module, targets: dict[str, float], scope: str, method: str,
                 generator: torch.Generator, strict: bool = True) -> dict[str, torch.Tensor]:
    """New keep-masks reaching the targets exactly: per layer, or one global ranking (one shared target).

    Pruning never revives: a layer (or the whole set) already sparser than asked raises ValueError when
    `strict`, else stays as it is (a gradual schedule that starts below the model's sparsity).
    """
    weights = named_tensors(model)
    scores = {n: _scores(weights[n], current_mask(model, n), method, generator) for n in targets}
    if scope == "layer":
        groups = [([n], targets[n]) for n in targets]
    else:
        groups = [(list(targets), next(iter(targets.values())))]
    masks = {}
    for names, target in groups:
        flat = torch.cat([scores[n].flatten() for n in names])
        count = round(target * flat.numel())
        already = int((flat < 0).sum())
        if already > count and not strict:
            count = already
        if already > count:
            where = f"`{names[0]}` is" if len(names) == 1 else "the pruned parameters are"
            raise ValueError(f"{where} already {already / flat.numel():.2%} sparse, above the target {target:.2%}; "
                             "pruning never revives weights")
        keep = _lowest(flat, count)
        offset = 0
        for n in names:
            size = scores[n].numel()
            masks[n] = keep[offset:offset + size].view(scores[n].shape)
            offset += size
    return masks


def sparsity_of(model: nn.Module, names: list[str]) -> tuple[float, dict[str, float]]:
    """(overall, per parameter) fraction of exact zeros among the named parameters as the forward pass sees them."""
    weights = named_tensors(model)
    zeros = {n: int((weights[n] == 0).sum()) for n in names}
    total = sum(weights[n].numel() for n in names)
    overall = sum(zeros.values()) / total if total else 0.0
    return round(overall, 6), {n: round(zeros[n] / weights[n].numel(), 6) for n in names}


def masked_names(model: nn.Module) -> list[str]:
    """Parameters that carry a Mask, by plain name."""
    return [n for n in named_tensors(model) if "." in n and mask_module(model, n) is not None]


def revived(model: nn.Module, before: dict[str, torch.Tensor]) -> list[str]:
    """Parameters where a weight pruned in `before` is back: its mask reopened, or its stored value nonzero."""
    bad = []
    for name, old in before.items():
        module_name, attr = _split(name)
        original = model.get_submodule(module_name).parametrizations[attr].original
        if bool((current_mask(model, name) & ~old).any()) or bool(original.detach()[~old].any()):
            bad.append(name)
    return bad


# ---- what pruning stages and callbacks share: targets from the spec, the prune, the promise check ----


def resolve_targets(stage: str, model, sparsity, params: list[str] | None) -> dict[str, float]:
    """Which parameters get which target; patterns that match nothing are errors, never ignored."""
    names = prunable_names(model, params)
    if not names:
        raise StageError(stage, "the model has nothing to prune" + (f" matching {params}" if params else ""),
                         "by default the weights of Linear and Conv layers are pruned; set `params` to choose others")
    unmatched = unmatched_patterns(params or [], list(named_tensors(model)))
    if isinstance(sparsity, dict):
        unmatched += unmatched_patterns(list(sparsity), names)
    if unmatched:
        raise StageError(stage, f"`{unmatched[0]}` matches no prunable parameter or layer",
                         "prunable: " + ", ".join(names))
    return layer_targets(names, sparsity)


def prune_weights(stage: str, model, targets: dict[str, float], scope: str, method: str,
                  generator: torch.Generator, strict: bool = True) -> dict:
    """Mask the targets' weights; returns the sparsity before and after, overall and per parameter."""
    names = list(targets)
    before, layers_before = sparsity_of(model, names)
    try:
        masks = select_masks(model, targets, scope, method, generator, strict)
    except ValueError as err:
        raise StageError(stage, str(err), "raise the target or prune from a less pruned model") from None
    apply_masks(model, masks)
    after, layers_after = sparsity_of(model, names)
    return {"sparsity_before": before, "sparsity_after": after,
            "layer_sparsity_before": layers_before, "layer_sparsity_after": layers_after}


def check_reached(stage: str, model, targets: dict[str, float], scope: str, tolerance: float) -> None:
    """The stage's promise: each target (or the one global target) reached to within `tolerance`
    plus half a weight (targets are rounded to whole weights)."""
    overall, layers = sparsity_of(model, list(targets))
    sizes = {n: t.numel() for n, t in named_tensors(model).items() if n in targets}
    if scope == "global":
        reached = {"all pruned parameters": (overall, next(iter(targets.values())), sum(sizes.values()))}
    else:
        reached = {n: (layers[n], targets[n], sizes[n]) for n in targets}
    for name, (value, wanted, size) in reached.items():
        if abs(value - wanted) > tolerance + 0.5 / size:
            raise StageError(stage, f"{name}: sparsity {value:.4f} instead of the target {wanted:.4f}",
                             "the schedule must finish inside the stage (check `end` and early stopping)")


def check_not_emptied(stage: str, model, names: list[str]) -> None:
    """A pruned layer left without a single weight cuts the network in two: it can then only guess."""
    _, layers = sparsity_of(model, names)
    emptied = [name for name in names if layers[name] >= 1.0]
    if emptied:
        raise StageError(stage, f"pruning left {', '.join(f'`{n}`' for n in emptied)} without any weight: the network "
                         "is cut and its output no longer depends on its input",
                         "lower the target for that layer, or set `allow_empty_layers: true` if you mean it")


@torch.no_grad()
def rewind_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Set parameters to earlier values (lottery-ticket rewinding); masked entries stay exactly zero."""
    for name, value in weights.items():
        module_name, attr = _split(name)
        module = model.get_submodule(module_name)
        if parametrize.is_parametrized(module, attr):
            mask = mask_module(model, name)
            module.parametrizations[attr].original.copy_(value * mask.mask if mask is not None else value)
        else:
            getattr(module, attr).copy_(value)
