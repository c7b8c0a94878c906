"""`iterative_prune`: rounds of prune then retrain, with LR-schedule rewinding and lottery-ticket weight rewinding."""

from __future__ import annotations

import torch

from runner import pruning
from runner.dropout import adjusted_dropout
from runner.errors import StageError
from runner.files import write_atomic
from runner.lightning.fit import fit
from runner.lightning.module import ClassifierModule
from runner.lightning.snapshot import WeightSnapshot
from runner.measure import named_weights, parameter_stats
from runner.models import build_model
from runner.recipe.training import Constant, Moment
from runner.transforms import replay, transforms_of
from runner.stages import STAGES
from runner.stages.base import StageContext, StageResult

REWIND_POINT = "rewind_point.pt"  # with `rewind`: the weights every round restarts from
_KEPT = ("train_loss", "val_loss", "val_acc", "steps", "final_lr", "fit_seconds", "distillation", "dropout")


def _next_targets(model, fractions: dict[str, float], scope: str) -> dict[str, float]:
    """Prune `fraction` of what remains: s' = 1 - (1 - s)(1 - f), per layer or over all pruned weights."""
    overall, layers = pruning.sparsity_of(model, list(fractions))
    if scope == "global":
        target = 1 - (1 - overall) * (1 - next(iter(fractions.values())))
        return {name: target for name in fractions}
    return {name: 1 - (1 - layers[name]) * (1 - f) for name, f in fractions.items()}


def _fresh_weights(model, ctx: StageContext, round_index: int) -> dict[str, torch.Tensor]:
    """A new random initialization of the same (possibly restructured) model: the re-init control."""
    with torch.random.fork_rng():
        torch.manual_seed(ctx.seed * 1000 + round_index)
        fresh = replay(build_model(ctx.model_spec), transforms_of(model))
    return named_weights(fresh)


def _round_spec(spec, last_lr: float | None):
    """Without LR rewinding a round continues at the previous round's final learning rate (Renda et al. 2020's
    fine-tuning); with it, each round reruns `retrain`'s whole schedule."""
    if spec.rewind_lr or last_lr is None:
        return spec.retrain
    optimizer = spec.retrain.optimizer.model_copy(update={"lr": last_lr})
    return spec.retrain.model_copy(update={"optimizer": optimizer, "schedule": Constant(name="constant"),
                                           "warmup": None})


def _train(retrain, model, ctx: StageContext, part: str, callbacks: list | None = None) -> tuple:
    module = ClassifierModule(model, retrain, ctx.data().num_classes)
    with adjusted_dropout(ctx.name, model, retrain.dropout) as adjusted:  # each round's from its own pruned model
        metrics = fit(retrain, module, ctx.part(part), callbacks)
    metrics.update(adjusted)
    return module.model, {key: metrics[key] for key in _KEPT if key in metrics}


@STAGES.register("iterative_prune")
def run(spec, model, ctx: StageContext) -> StageResult:
    generator = torch.Generator().manual_seed(ctx.seed)
    fractions = pruning.resolve_targets(spec.name, model, spec.fraction, spec.params)
    metrics: dict = {"rounds": []}
    rewind_to = None
    last_lr = None
    if spec.rewind is not None or spec.reinit:
        snapshot = WeightSnapshot(Moment(steps=0) if spec.rewind in ("init", None) else spec.rewind)
        model, metrics["dense"] = _train(spec.retrain, model, ctx, "round-0", [snapshot])
        if snapshot.weights is None:
            raise StageError(spec.name, f"the rewind point (step {snapshot.step}) lies after the dense round's "
                                        f"{metrics['dense']['steps']} steps", "rewind to an earlier point")
        rewind_to, last_lr = snapshot.weights, metrics["dense"]["final_lr"]
        if spec.rewind is not None:  # kept so a ticket can be checked against (and studied from) its rewind point
            metrics["rewind_step"] = snapshot.step
            write_atomic(ctx.folder / REWIND_POINT, lambda handle: torch.save(rewind_to, handle))

    for round_index in range(1, spec.rounds + 1):
        targets = _next_targets(model, fractions, spec.scope)
        pruned = pruning.prune_weights(spec.name, model, targets, spec.scope, spec.method, generator)
        if not spec.allow_empty_layers:  # before retraining a network that can only guess
            pruning.check_not_emptied(spec.name, model, list(targets))
        if spec.reinit:
            pruning.rewind_weights(model, _fresh_weights(model, ctx, round_index))
        elif rewind_to is not None:
            pruning.rewind_weights(model, rewind_to)
        masks = {name: pruning.current_mask(model, name) for name in targets}
        model, trained = _train(_round_spec(spec, last_lr), model, ctx, f"round-{round_index}")
        if pruning.revived(model, masks):
            raise StageError(spec.name, f"pruned weights came back in round {round_index}",
                             "this is a bug in nnopt; please report it with the recipe")
        last_lr = trained["final_lr"]
        metrics["rounds"].append({"round": round_index, "sparsity": pruned["sparsity_after"],
                                  "layer_sparsity": pruned["layer_sparsity_after"], **trained})
        final_targets = targets

    pruning.check_reached(spec.name, model, final_targets, spec.scope, tolerance=0.0)
    metrics.update(parameter_stats(model))
    return StageResult(model, metrics)
