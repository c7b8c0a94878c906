"""`prune`: one-shot pruning of weights (masks) or of neurons/channels (physical slimming)."""

from __future__ import annotations

import torch

from runner import pruning
from runner.measure import parameter_stats
from runner.slimming import prune_neurons  # also registers the `slim` transform that artifacts replay
from runner.stages import STAGES
from runner.stages.base import StageContext, StageResult


@STAGES.register("prune")
def run(spec, model, ctx: StageContext) -> StageResult:
    generator = torch.Generator().manual_seed(ctx.seed)
    if spec.granularity == "neurons":
        example = ctx.data().examples("test", 256)[0]  # parity and latency probe
        metrics = prune_neurons(spec, model, example, generator)
        return StageResult(metrics.pop("model"), metrics)
    targets = pruning.resolve_targets(spec.name, model, spec.sparsity, spec.params)
    metrics = pruning.prune_weights(spec.name, model, targets, spec.scope, spec.method, generator)
    pruning.check_reached(spec.name, model, targets, spec.scope, tolerance=0.0)  # one-shot pruning is exact
    metrics.update(parameter_stats(model))
    return StageResult(model, metrics)
