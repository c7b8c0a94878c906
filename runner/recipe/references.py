"""Fields that name another stage (a distillation teacher, a sensitivity scan): it must exist, come earlier,
and be of the kind the field needs; teachers given as model specs instead."""

from __future__ import annotations

from runner.errors import Issue
from runner.recipe.locate import issue_at
from runner.recipe.semantics import training_blocks_of
from runner.registry import did_you_mean


def stage_references(recipe):
    """(path, named stage, kind it must have or None) for each field of the recipe naming another stage."""
    for i, stage in enumerate(recipe.stages):
        for path, block in training_blocks_of(stage, i):
            if block.distillation is not None and isinstance(block.distillation.teacher, str):
                yield path + ("distillation", "teacher"), block.distillation.teacher, None
        allocation = getattr(stage, "allocation", None)
        if allocation is not None and allocation.sensitivity is not None:
            yield ("stages", i, "allocation", "sensitivity"), allocation.sensitivity, "sensitivity"
        if getattr(stage, "max_accuracy_drop", None) is not None and stage.sensitivity is not None:
            yield ("stages", i, "sensitivity"), stage.sensitivity, "sensitivity"  # int8's fallback order


def check_stage_references(recipe, source) -> list[Issue]:
    issues = []
    kinds = {stage.name: (i, stage.kind) for i, stage in enumerate(recipe.stages)}

    def issue(path: tuple, message: str, hint: str) -> None:
        issues.append(issue_at(source, path, message, hint))

    for path, name, kind in stage_references(recipe):
        earlier = [stage.name for stage in recipe.stages[:path[1]]]
        if name not in earlier:
            guess = did_you_mean(name, earlier)
            message = (f"the recipe has no stage `{name}`" if name not in kinds
                       else f"stage `{name}` runs after this one: its finished model is not there yet")
            issue(path, message,
                  (guess + " " if guess else "") + "name an earlier stage: " + (", ".join(earlier) or "there is none"))
        elif kind is not None and kinds[name][1] != kind:
            issue(path, f"stage `{name}` is a {kinds[name][1]} stage, not a {kind} stage", f"name a `{kind}` stage")
    return issues
