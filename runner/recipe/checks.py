"""Checks that span fields or need the registries: unique names, known models and data sets,
factory arguments, and parameter patterns that must match the built model."""

from __future__ import annotations

import fnmatch
import importlib.util
import inspect
import typing
from typing import Any, Callable

from pydantic import ConfigDict, ValidationError, create_model

from runner.errors import Issue
from runner.recipe.expect import RUN_METRICS, reports, stage_metric_patterns
from runner.recipe.locate import dotted
from runner.recipe.schema import Recipe
from runner.recipe.source import Source
from runner.registry import Registry, UnknownName, did_you_mean


def _issue(source: Source, path: tuple, message: str, hint: str | None = None) -> Issue:
    line, column = source.position(path)
    if path in source.overridden:
        hint = f"set by override `{source.overridden[path]}`" + (f"; {hint}" if hint else "")
    return Issue(source.file, line, column, dotted(path), message, hint)


def _args_model(factory: Callable) -> type:
    """A strict pydantic model of a factory's keyword arguments, built from its signature."""
    fields: dict[str, Any] = {}
    hints = typing.get_type_hints(factory)
    for name, param in inspect.signature(factory).parameters.items():
        annotation = hints.get(name, Any)
        default = param.default if param.default is not inspect.Parameter.empty else ...
        fields[name] = (annotation, default)
    return create_model(f"{factory.__name__}_args", __config__=ConfigDict(extra="forbid"), **fields)


def check_factory_args(source: Source, path: tuple, factory: Callable, args: dict) -> list[Issue]:
    try:
        _args_model(factory).model_validate(args)
    except ValidationError as err:
        issues = []
        params = list(inspect.signature(factory).parameters)
        for error in err.errors():
            arg_path = path + tuple(error["loc"])
            if error["type"] == "extra_forbidden":
                guess = did_you_mean(str(error["loc"][-1]), params)
                issues.append(_issue(source, arg_path, f"unknown argument `{error['loc'][-1]}`",
                                     (guess + " " if guess else "") + "arguments: " + ", ".join(params)))
            elif error["type"] == "missing":
                issues.append(_issue(source, arg_path, f"missing required argument `{error['loc'][-1]}`"))
            else:
                issues.append(_issue(source, arg_path, error["msg"]))
        return issues
    return []


def _lookup(source: Source, path: tuple, registry: Registry, name: str) -> tuple[Any, list[Issue]]:
    try:
        return registry.get(name), []
    except UnknownName as err:
        return None, [_issue(source, path, err.message, err.hint)]


def check_names(source: Source) -> list[Issue]:
    """Registry names straight from the raw data, for recipes that failed schema validation."""
    from runner.data import DATASETS
    from runner.models import MODELS

    issues = []
    for block, registry in (("model", MODELS), ("data", DATASETS)):
        name = source.data.get(block, {}).get("name") if isinstance(source.data.get(block), dict) else None
        if isinstance(name, str):
            issues += _lookup(source, (block, "name"), registry, name)[1]
    return issues


def check_recipe(recipe: Recipe, source: Source) -> list[Issue]:
    from runner.data import DATASETS
    from runner.models import MODELS, resolve_import

    issues: list[Issue] = []
    seen: dict[str, int] = {}
    for i, stage in enumerate(recipe.stages):
        if stage.name in seen:
            issues.append(_issue(source, ("stages", i, "name"), f"duplicate stage name `{stage.name}`",
                                 f"stage names must be unique; stages[{seen[stage.name]}] is already called that"))
        seen.setdefault(stage.name, i)

    if recipe.model.name is not None:
        factory, found = _lookup(source, ("model", "name"), MODELS, recipe.model.name)
    else:
        try:
            factory, found = resolve_import(recipe.model.import_), []
        except ImportError as err:
            factory, found = None, [_issue(source, ("model", "import"), str(err),
                                           "the module must be importable from the current environment")]
    issues += found
    if factory is not None:
        issues += check_factory_args(source, ("model", "args"), factory, recipe.model.args)

    dataset, found = _lookup(source, ("data", "name"), DATASETS, recipe.data.name)
    issues += found
    if dataset is not None:
        issues += check_factory_args(source, ("data", "args"), dataset, recipe.data.args)

    issues += _check_optional_packages(recipe, source)
    issues += _check_trainer(recipe, source)
    issues += _check_gradual_windows(recipe, source)
    issues += check_seeds(recipe, source) + check_expect(recipe, source)
    if not issues:
        issues += _check_param_patterns(recipe, source)
    return issues


def missing_packages(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def _check_optional_packages(recipe: Recipe, source: Source) -> list[Issue]:
    """ONNX export needs the optional `onnx` extra; say so before anything runs."""
    issues = []
    for i, stage in enumerate(recipe.stages):
        if stage.kind == "export" and "onnx" in stage.formats:
            missing = missing_packages(("onnx", "onnxruntime"))
            if missing:
                issues.append(_issue(source, ("stages", i, "formats"),
                                     f"ONNX export needs {', '.join(f'`{m}`' for m in missing)}, which is not installed",
                                     "pip install 'nnopt[onnx]', or drop `onnx` from formats"))
    return issues


def _training_blocks(recipe: Recipe):
    """(path, Training spec) for every stage that trains and every training block inside a stage
    (iterative_prune's `retrain`, weight sharing's `finetune`)."""
    from runner.recipe.stages import Training

    for i, stage in enumerate(recipe.stages):
        if isinstance(stage, Training):
            yield ("stages", i), stage
        for field in type(stage).model_fields:
            value = getattr(stage, field)
            if isinstance(value, Training):
                yield ("stages", i, field), value


def _check_trainer(recipe: Recipe, source: Source) -> list[Issue]:
    """Accelerator, strategy and precision combinations this machine and Lightning can run."""
    from runner.recipe.devices import problems, world_size

    issues = [_issue(source, ("trainer", field), message, hint) for field, message, hint in problems(recipe.trainer)]
    for path, block in _training_blocks(recipe):
        if block.trainer is None:
            continue
        own = block.trainer.model_dump(exclude_none=True)
        issues += [_issue(source, path + ("trainer", field), message, hint)
                   for field, message, hint in problems(recipe.trainer.with_override(block.trainer)) if field in own]

    processes = world_size(recipe.trainer)
    if processes > 1:
        for block, size in (("batch_size", recipe.data.batch_size), ("eval_batch_size", recipe.data.eval_batch_size)):
            if size % processes:
                issues.append(_issue(source, ("data", block), f"{block} {size} is the global batch and does not split "
                                     f"evenly over {processes} processes", f"use a multiple of {processes}"))
        for path, block in _training_blocks(recipe):
            for tuner in ("lr_finder", "batch_size_finder"):
                if getattr(block, tuner) is not None:
                    issues.append(_issue(source, path + (tuner,), f"Lightning's `{tuner}` runs in one process, "
                                         f"but this recipe trains in {processes}",
                                         "find the value in a one-process run, then set it in the recipe"))
    return issues


def check_seeds(recipe: Recipe, source: Source) -> list[Issue]:
    # `--seeds` (an override) replaces the file's seed on purpose; in the file, both is ambiguous.
    if recipe.seeds is not None and "seed" in recipe.model_fields_set and ("seeds",) not in source.overridden:
        return [_issue(source, ("seeds",), "give `seed` or `seeds`, not both",
                       "`seeds: [0, 1, 2]` runs the recipe once per seed; `seed: 0` runs it once")]
    return []


def check_expect(recipe: Recipe, source: Source) -> list[Issue]:
    """Every metric an expect rule names (as its subject or as its bound) must be one the run can
    produce: a run-level metric or `stage.metric`."""
    if recipe.expect is None:
        return []
    stages = {stage.name: stage for stage in recipe.stages}
    issues = []
    for metric, rule in recipe.expect.metrics.items():
        named = [(("expect", "metrics", metric), metric)]
        if isinstance(rule.bound, str):
            named.append((("expect", "metrics", metric, rule.kind) + (("value",) if rule.kind == "within" else ()),
                          rule.bound))
        issues += [issue for path, name in named if (issue := _metric_issue(source, path, name, stages))]
    return issues


def _metric_issue(source: Source, path: tuple, metric: str, stages: dict) -> Issue | None:
    stage_name, dot, stage_metric = metric.partition(".")
    if not dot:
        if metric in RUN_METRICS:
            return None
        guess = did_you_mean(metric, list(RUN_METRICS))
        return _issue(source, path, f"unknown run metric `{metric}`", (guess + " " if guess else "") + "run metrics: "
                      + ", ".join(RUN_METRICS) + "; or name a stage's metric as `stage.metric`")
    if stage_name not in stages:
        guess = did_you_mean(stage_name, list(stages))
        return _issue(source, path, f"`{metric}`: the recipe has no stage `{stage_name}`",
                      (guess + " " if guess else "") + "stages: " + ", ".join(stages))
    patterns = stage_metric_patterns(stages[stage_name])
    if patterns is not None and not reports(patterns, stage_metric):
        guess = did_you_mean(stage_metric, [p for p in patterns if "*" not in p])
        return _issue(source, path, f"stage `{stage_name}` ({stages[stage_name].kind}) does not report `{stage_metric}`",
                      (guess + " " if guess else "") + "it reports: " + ", ".join(patterns))
    return None


def _check_gradual_windows(recipe: Recipe, source: Source) -> list[Issue]:
    """A gradual-pruning window given in the stage's own unit must end inside the stage (the last prune
    happens at `end`); other units are checked once the data length is known."""
    issues = []
    for i, stage in enumerate(recipe.stages):
        schedule = getattr(stage, "gradual_pruning", None)
        if schedule is None:
            continue
        for unit, length in (("epochs", stage.epochs), ("steps", stage.steps)):
            start, end = getattr(schedule.start, unit), getattr(schedule.end, unit)
            if length is not None and end is not None and end >= length:
                issues.append(_issue(source, ("stages", i, "gradual_pruning", "end", unit),
                                     f"the gradual pruning window ends at {unit} {end:g}, "
                                     f"not inside the stage's {length}",
                                     f"end it before {unit} {length} so the final sparsity is reached and held"))
            if start is not None and end is not None and start >= end:
                issues.append(_issue(source, ("stages", i, "gradual_pruning", "start", unit),
                                     f"the gradual pruning window starts at {unit} {start:g}, "
                                     f"not before its end {end:g}"))
    return issues


def _pruning_specs(recipe: Recipe):
    """(path, spec, targets field) of every pruning spec in the recipe: stages and gradual schedules."""
    for i, stage in enumerate(recipe.stages):
        if stage.kind == "prune":
            yield ("stages", i), stage, "sparsity"
        if stage.kind == "iterative_prune":
            yield ("stages", i), stage, "fraction"
        if getattr(stage, "gradual_pruning", None) is not None:
            yield ("stages", i, "gradual_pruning"), stage.gradual_pruning, "sparsity"


def _check_param_patterns(recipe: Recipe, source: Source) -> list[Issue]:
    """A parameter or layer pattern that matches nothing is a typo, never a silent no-op."""
    from runner import pruning
    from runner.models import build_model

    patterns = [(("stages", i, "regularization", j, "params", k), pattern)
                for i, stage in enumerate(recipe.stages)
                for j, term in enumerate(getattr(stage, "regularization", []))
                for k, pattern in enumerate(term.params)]
    patterns += [(("stages", i, "bits", pattern), pattern) for i, stage in enumerate(recipe.stages)
                 if getattr(stage, "method", None) == "weight_sharing" and isinstance(stage.bits, dict)
                 for pattern in stage.bits]
    pruning_specs = list(_pruning_specs(recipe))
    patterns += [(path + ("params", k), pattern) for path, spec, _ in pruning_specs
                 for k, pattern in enumerate(spec.params or [])]
    if not (patterns or pruning_specs):
        return []
    model = build_model(recipe.model)
    names = [name for name, _ in model.named_parameters()]
    issues = [_issue(source, path, f"`{pattern}` matches no parameter of the model", "parameters: " + ", ".join(names))
              for path, pattern in patterns if not fnmatch.filter(names, pattern)]
    for path, spec, field in pruning_specs:
        targets = getattr(spec, field)
        if not isinstance(targets, dict):
            continue
        prunable = pruning.prunable_names(model, spec.params)
        for pattern in pruning.unmatched_patterns(list(targets), prunable):
            issues.append(_issue(source, path + (field, pattern), f"`{pattern}` matches no prunable layer of the model",
                                 "prunable: " + ", ".join(prunable)))
    return issues
