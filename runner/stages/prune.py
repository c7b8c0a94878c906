"""`prune`: one-shot pruning of weights (masks) or of neurons/channels (physical slimming)."""

from __future__ import annotations

import torch

from runner import pruning, sensitivity
from runner.allocation import AllocationError, allocate_pruned, pruned_for
from runner.errors import StageError
from runner.measure import parameter_stats
from runner.registry import closest_names
from runner.slimming import prune_neurons  # also registers the `slim` transform that artifacts replay
from runner.stages import STAGES
from runner.stages.base import StageContext, StageResult


def _scan(spec, model, names: list[str], ctx: StageContext) -> tuple[dict, str]:
    """The sensitivity scan `scope: auto` allocates from: the named stage's, or one made here."""
    settings = spec.allocation_settings
    if settings.sensitivity is None:
        x, y = ctx.data().examples("val", settings.scan.examples)
        return sensitivity.scan(model, x, y, names=names, sparsities=settings.scan.sparsities, bits=[], int8=False,
                                kmeans_iterations=1, batch_size=settings.scan.batch_size), "scanned here"
    folder = ctx.artifact(settings.sensitivity)
    if not (folder / sensitivity.SCAN_FILE).is_file():
        raise StageError(spec.name, f"stage `{settings.sensitivity}` wrote no {sensitivity.SCAN_FILE}",
                         "name a stage of kind `sensitivity`")
    scan = sensitivity.read(folder)
    missing = [name for name in names if name not in scan["layers"]]
    if missing:
        raise StageError(spec.name, f"the scan of `{settings.sensitivity}` has no curve for {', '.join(missing)}",
                         "scan the same parameters (`params`) that this stage prunes")
    return scan, settings.sensitivity


def _allocate(spec, model, names: list[str], ctx: StageContext) -> tuple[dict[str, float], dict]:
    """Per-layer targets for `scope: auto`, and what the stage reports about them."""
    scan, source = _scan(spec, model, names, ctx)
    settings = spec.allocation_settings
    unmatched = pruning.unmatched_patterns(list(settings.bounds), names)
    if unmatched:
        raise StageError(spec.name, f"allocation.bounds: `{unmatched[0]}` matches no pruned layer",
                         closest_names(unmatched[0], names, "pruned"))
    bounds = pruning.layer_targets(names, dict(settings.bounds)) if settings.bounds else {}
    total = sum(scan["layers"][name]["size"] for name in names)
    try:
        wanted = (pruned_for(scan, names, settings.keep_params, settings.keep_bytes) if settings.keeps
                  else round(spec.sparsity * total))
        chosen = allocate_pruned(scan, names, wanted, bounds)
    except AllocationError as err:
        raise StageError(spec.name, err.message, err.hint) from None
    # Exact fractions (JSON keeps every digit), so that the plain recipe prunes the same counts.
    reproduce = "scope: layer, sparsity: {" + ", ".join(f"{n}: {s!r}" for n, s in chosen["sparsity"].items()) + "}"
    kept = total - wanted
    return chosen["sparsity"], {"sensitivity": source, "sparsity": chosen["sparsity"], "pruned": chosen["pruned"],
                                "kept_params": kept, "kept_bytes": 4 * kept, "examples": scan["examples"],
                                "scan_baseline_acc": scan["baseline_acc"], "predicted_drop": chosen["predicted_drop"],
                                "predicted_total_drop": chosen["predicted_total_drop"], "reproduce": reproduce}


def _measured_drop(allocation: dict, model, ctx: StageContext) -> float:
    """The drop of the pruned model on the scan's examples: what the per-layer sum (`predicted_total_drop`)
    predicted, measured with every layer pruned at once (the layers' losses do not simply add up)."""
    x, y = ctx.data().examples("val", allocation["examples"])
    return round(allocation["scan_baseline_acc"] - sensitivity.accuracy(model, x, y, batch_size=1000), 6)


@STAGES.register("prune")
def run(spec, model, ctx: StageContext) -> StageResult:
    generator = torch.Generator().manual_seed(ctx.seed)
    if spec.granularity == "neurons":
        example = ctx.data().examples("test", 256)[0]  # parity and latency probe
        metrics = prune_neurons(spec, model, example, generator)
        return StageResult(metrics.pop("model"), metrics)
    # scope auto: the names alone (the allocation chooses each layer's level)
    targets = pruning.resolve_targets(spec.name, model, spec.sparsity if spec.scope != "auto" else 0.0, spec.params)
    allocation = None
    if spec.scope == "auto":
        targets, allocation = _allocate(spec, model, list(targets), ctx)
    scope = "layer" if spec.scope == "auto" else spec.scope
    metrics = pruning.prune_weights(spec.name, model, targets, scope, spec.method, generator)
    pruning.check_reached(spec.name, model, targets, scope, tolerance=0.0)  # one-shot pruning is exact
    if not spec.allow_empty_layers:
        pruning.check_not_emptied(spec.name, model, list(targets))
    if allocation is not None:  # the budget reached to the weight: kept_params nonzero over the pruned layers
        total = allocation["kept_params"] + sum(allocation["pruned"].values())
        pruning.check_reached(spec.name, model, {name: 1 - allocation["kept_params"] / total for name in targets},
                              "global", tolerance=0.0)
        allocation["measured_total_drop"] = _measured_drop(allocation, model, ctx)
        metrics["allocation"] = allocation
    metrics.update(parameter_stats(model))
    return StageResult(model, metrics)
