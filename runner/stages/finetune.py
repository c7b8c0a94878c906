"""`finetune`: train on from the previous stage's weights; pruned weights stay exactly zero throughout."""

from __future__ import annotations

from runner import pruning
from runner.dropout import adjusted_dropout
from runner.errors import StageError
from runner.lightning.fit import fit
from runner.lightning.module import ClassifierModule
from runner.measure import parameter_stats
from runner.stages import STAGES
from runner.stages.base import StageContext, StageResult


@STAGES.register("finetune")
def run(spec, model, ctx: StageContext) -> StageResult:
    # The masks are parametrizations, so the forward pass, the gradients and every checkpoint see them;
    # the check below proves it rather than trusting it.
    masks_before = {name: pruning.current_mask(model, name) for name in pruning.masked_names(model)}
    module = ClassifierModule(model, spec, ctx.data().num_classes)
    with adjusted_dropout(spec.name, model, spec.dropout) as adjusted:
        metrics = fit(spec, module, ctx)
    metrics.update(adjusted)
    revived = pruning.revived(module.model, masks_before)
    if revived:
        raise StageError(spec.name, "pruned weights came back during fine-tuning: " + ", ".join(revived),
                         "a `trainer.callbacks` entry that writes weights or masks can do this; without one it is "
                         "a bug in nnopt: please report it with the recipe")
    metrics.update(parameter_stats(module.model))
    return StageResult(module.model, metrics)
