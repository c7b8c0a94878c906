"""`train`: fit the model with Lightning (optimizer, schedule, objective, regularization, tuning)."""

from __future__ import annotations

from runner.lightning.fit import fit
from runner.lightning.module import ClassifierModule
from runner.stages import STAGES
from runner.stages.base import StageContext, StageResult


@STAGES.register("train")
def run(spec, model, ctx: StageContext) -> StageResult:
    module = ClassifierModule(model, spec, ctx.data().num_classes)
    metrics = fit(spec, module, ctx)
    return StageResult(module.model, metrics)
