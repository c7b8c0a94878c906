"""`prune`: one-shot pruning of weights (masks) or of neurons/channels (physical slimming)."""

from __future__ import annotations

import torch

from runner import pruning
from runner.errors import StageError
from runner.measure import named_tensors, parameter_stats
from runner.stages import STAGES
from runner.stages.base import StageContext, StageResult


def resolve_targets(stage: str, model, sparsity, params: list[str] | None) -> dict[str, float]:
    """Which parameters get which target; patterns that match nothing are errors, never ignored."""
    names = pruning.prunable_names(model, params)
    if not names:
        raise StageError(stage, "the model has nothing to prune" + (f" matching {params}" if params else ""),
                         "by default the weights of Linear and Conv layers are pruned; set `params` to choose others")
    unmatched = pruning.unmatched_patterns(params or [], list(named_tensors(model)))
    if isinstance(sparsity, dict):
        unmatched += pruning.unmatched_patterns(list(sparsity), names)
    if unmatched:
        raise StageError(stage, f"`{unmatched[0]}` matches no prunable parameter or layer",
                         "prunable: " + ", ".join(names))
    return pruning.layer_targets(names, sparsity)


def prune_weights(stage: str, model, targets: dict[str, float], scope: str, method: str,
                  generator: torch.Generator) -> dict:
    """Mask the targets' weights; returns the sparsity before and after, overall and per parameter."""
    names = list(targets)
    before, layers_before = pruning.sparsity_of(model, names)
    try:
        masks = pruning.select_masks(model, targets, scope, method, generator)
    except ValueError as err:
        raise StageError(stage, str(err), "raise the target or prune from a less pruned model") from None
    pruning.apply_masks(model, masks)
    after, layers_after = pruning.sparsity_of(model, names)
    return {"sparsity_before": before, "sparsity_after": after,
            "layer_sparsity_before": layers_before, "layer_sparsity_after": layers_after}


def check_reached(stage: str, model, targets: dict[str, float], scope: str, tolerance: float) -> None:
    """The stage's promise: each target (or the one global target) reached to within `tolerance`
    plus half a weight (targets are rounded to whole weights)."""
    overall, layers = pruning.sparsity_of(model, list(targets))
    sizes = {n: t.numel() for n, t in named_tensors(model).items() if n in targets}
    if scope == "global":
        reached = {"all pruned parameters": (overall, next(iter(targets.values())), sum(sizes.values()))}
    else:
        reached = {n: (layers[n], targets[n], sizes[n]) for n in targets}
    for name, (value, wanted, size) in reached.items():
        if abs(value - wanted) > tolerance + 0.5 / size:
            raise StageError(stage, f"{name}: sparsity {value:.4f} instead of the target {wanted:.4f}",
                             "the schedule must finish inside the stage (check `end` and early stopping)")


@STAGES.register("prune")
def run(spec, model, ctx: StageContext) -> StageResult:
    generator = torch.Generator().manual_seed(ctx.seed)
    if spec.granularity == "neurons":
        from runner.slimming import prune_neurons
        metrics = prune_neurons(spec, model, generator)
        return StageResult(metrics.pop("model"), metrics)
    targets = resolve_targets(spec.name, model, spec.sparsity, spec.params)
    metrics = prune_weights(spec.name, model, targets, spec.scope, spec.method, generator)
    check_reached(spec.name, model, targets, spec.scope, tolerance=0.0)  # one-shot pruning is exact
    metrics.update(parameter_stats(model))
    return StageResult(model, metrics)
