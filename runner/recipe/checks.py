"""Checks that span fields or need the registries: unique names, known models and data sets,
factory arguments, and parameter patterns that must match the built model."""

from __future__ import annotations

import importlib.util
import inspect
import typing
from pathlib import Path
from typing import Any, Callable

from pydantic import ConfigDict, ValidationError, create_model

from runner.errors import Issue
from runner.recipe.expect import RUN_METRICS, reports, stage_metric_patterns
from runner.recipe.locate import dotted, located_issue
from runner.recipe.references import check_stage_references
from runner.recipe.schema import Recipe
from runner.recipe.facts_cache import Recorder, code_state, folder_state, model_key, registered, remember
from runner.recipe.semantics import known_data, teacher_models, training_blocks
from runner.recipe.source import Source, shorten
from runner.registry import Registry, UnknownName, did_you_mean


def _signature(factory: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C extensions have none
        return None


def _args_model(factory: Callable, signature: inspect.Signature) -> type:
    """A strict pydantic model of the arguments the recipe may pass by name, built from the signature:
    named parameters are checked (names, required ones, annotated types); `**kwargs` accepts any other
    name, and `*args` takes nothing from a recipe."""
    try:  # a class's annotations are its attributes': the parameters' are on __init__
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception:  # annotations naming what cannot be resolved here (TYPE_CHECKING imports): names only
        hints = {}
    fields: dict[str, Any] = {}
    for name, param in signature.parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            continue
        default = param.default if param.default is not inspect.Parameter.empty else ...
        fields[name] = (hints.get(name, Any), default)
    open_ended = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    config = ConfigDict(extra="allow" if open_ended else "forbid", arbitrary_types_allowed=True)
    name = f"{getattr(factory, '__name__', 'factory')}_args"
    try:
        return create_model(name, __config__=config, **fields)
    except Exception:  # a type pydantic cannot check (a protocol, a forward reference): check names only
        return create_model(name, __config__=config, **{k: (Any, d) for k, (_, d) in fields.items()})


def factory_arg_problems(path: tuple, factory: Callable, args: dict) -> list[tuple]:
    """(field path, message, hint) for the recipe's `args` against the factory's signature, without calling the
    factory."""
    signature = _signature(factory)
    if signature is None:
        return []
    required_positional = [name for name, p in signature.parameters.items()
                           if p.kind == p.POSITIONAL_ONLY and p.default is inspect.Parameter.empty]
    if required_positional:
        return [(path, f"the factory needs positional-only arguments ({', '.join(required_positional)}), "
                 "which a recipe cannot pass", "wrap it in a function that takes keyword arguments")]
    try:
        _args_model(factory, signature).model_validate(args)
    except ValidationError as err:
        problems = []
        params = [name for name, p in signature.parameters.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for error in err.errors():
            arg_path = path + tuple(error["loc"])
            if error["type"] == "extra_forbidden":
                guess = did_you_mean(str(error["loc"][-1]), params)
                problems.append((arg_path, f"unknown argument `{error['loc'][-1]}`",
                                 (guess + " " if guess else "") + "arguments: " + ", ".join(params)))
            elif error["type"] == "missing":
                problems.append((arg_path, f"missing required argument `{error['loc'][-1]}`", None))
            else:
                problems.append((arg_path, error["msg"], None))
        return problems
    return []


def _lookup(source: Source, path: tuple, registry: Registry, name: str) -> tuple[Any, list[Issue]]:
    try:
        return registry.get(name), []
    except UnknownName as err:
        return None, [located_issue(source, path, err.message, err.hint)]


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


def check_recipe(recipe: Recipe, source: Source, data: dict) -> list[Issue]:
    """Cross-field and registry checks; `data` is look_at_data's record of the data spec."""
    issues: list[Issue] = []
    seen: dict[str, int] = {}
    for i, stage in enumerate(recipe.stages):
        if stage.name in seen:
            issues.append(located_issue(source, ("stages", i, "name"), f"duplicate stage name `{stage.name}`",
                                 f"stage names must be unique; stages[{seen[stage.name]}] is already called that"))
        seen.setdefault(stage.name, i)

    issues += check_model(recipe.model, source)
    for path, teacher in teacher_models(recipe):
        issues += check_model(teacher, source, path)

    issues += [located_issue(source, tuple(path), message, hint) for path, message, hint in data["problems"]]

    issues += _check_optional_packages(recipe, source)
    issues += _check_trainer(recipe, source)
    issues += check_seeds(recipe, source) + check_expect(recipe, source)
    issues += check_stage_references(recipe, source)
    return issues


def check_model(spec, source: Source, where: tuple = ("model",)) -> list[Issue]:
    """model_problems, located; remembered (runner.recipe.facts_cache) by the spec, the weights path's layout and
    the user code, so that a model checked before needs neither torch nor a model library."""
    key = {"spec": model_key(spec), "where": list(where), "weights": folder_state(spec.weights_path())}
    return [located_issue(source, tuple(path), message, hint)
            for path, message, hint in remember("model", key, lambda: model_problems(spec, where))]


def model_problems(spec, where: tuple = ("model",)) -> list[tuple]:
    """(field path, message, hint) for each problem of a model spec: the architecture exists and takes the
    recipe's arguments; hub builders are never asked to download weights; a weights path exists. Nothing of the
    user's code is called."""
    from runner.imports import ImportFailed
    from runner.models import factory_of, hub_source
    from runner.models.hub import MissingPackage, argument_problems, hub_weight_args
    from runner.models.weights import layout_problem

    source_field = "name" if spec.name is not None else "import" if spec.import_ is not None else hub_source(spec)
    try:
        factory = factory_of(spec)
    except UnknownName as err:
        hint = err.hint
        if hub_source(spec) is not None:  # hundreds of names: the closest, and where to list them all
            guess = did_you_mean(err.name, err.choices)
            hint = (guess + " " if guess else "") + f"{len(err.choices)} names: {hub_source(spec)}.models.list_models()"
        return [(where + (source_field,), err.message, hint)]
    except (ImportFailed, MissingPackage) as err:
        return [(where + (source_field,), err.message, err.hint)]
    if not callable(factory):
        return [(where + ("import",), f"`{spec.import_}` is a {type(factory).__name__}, not a "
                 "function or class that builds the model", None)]

    hub = hub_source(spec)
    if hub is None:
        problems = factory_arg_problems(where + ("args",), factory, spec.args)
    else:
        asked = hub_weight_args(hub, spec.args)
        problems = [(where + ("args", arg), f"`{arg}` asks {hub} for pretrained weights, which nnopt "
                     "never downloads (machines without internet cannot, and the run's fingerprint could "
                     "not include them)", "save the weights once as a file (torch.save(model.state_dict(), "
                     "PATH)) and give `model.weights: PATH`") for arg in asked]
        if not problems:
            problems = [(where + ("args",) + ((arg,) if arg else ()), message, hint)
                        for arg, message, hint in argument_problems(factory, spec.args)]
    path = spec.weights_path()
    problem = layout_problem(path) if path is not None else None
    if problem:
        relative = not Path(spec.weights).expanduser().is_absolute()
        problems.append((where + ("weights",), problem,
                         "a relative path is relative to the recipe file's folder" if relative else None))
    return problems


def look_at_data(spec) -> dict:
    """What validate learns of the data from one look at it: data_problems, and the sizes, shape and classes
    with the transforms' findings (runner.recipe.semantics.known_data); an image folder is scanned once, for
    both. Remembered (runner.recipe.facts_cache) by the spec, the listing of its root folder and the user code."""
    factory_args = spec.factory_args() if spec.name is not None else spec.args
    root = factory_args.get("root")
    key = {"spec": spec.model_dump(mode="json", by_alias=True, include={"name", "import_", "args", "transforms"}),
           "args": factory_args, "root": folder_state(root) if isinstance(root, str) else None,
           "code": code_state(spec.import_, spec.recipe_dir), "registered": registered("runner.data")}
    return remember("data", key, lambda: _look_at_data(spec))


def _look_at_data(spec) -> dict:
    from dataclasses import asdict

    problems, looked = data_problems(spec)
    recorder = Recorder()
    facts = known_data(spec, recorder, looked)
    return {"problems": problems, "facts": asdict(facts) if facts is not None else None, "found": recorder.found}


def data_problems(spec) -> tuple[list[tuple], Any]:
    """(field path, message, hint) for each problem of the data spec: the source exists (registered name,
    importable factory), its arguments bind, its files are where they should be (a cheap look at names, never
    reading the data), and every transform builds. Also what the data set's preflight looked at (an image
    folder's scan), or None."""
    from runner.data import DATASETS, PREFLIGHT, DataUnavailable
    from runner.data.augment import TransformProblem, build_item
    from runner.imports import ImportFailed, resolve

    problems, looked = [], None
    try:
        factory = DATASETS.get(spec.name) if spec.name is not None else resolve(spec.import_, spec.recipe_dir)
    except UnknownName as err:
        factory, problems = None, [(("data", "name"), err.message, err.hint)]
    except ImportFailed as err:
        factory, problems = None, [(("data", "import"), err.message, err.hint)]
    if factory is not None:
        found = factory_arg_problems(("data", "args"), factory, spec.args)
        problems += found
        if not found and spec.name in PREFLIGHT:
            try:
                looked = PREFLIGHT[spec.name](**spec.factory_args())
            except DataUnavailable as err:
                problems.append((("data", "args") + ((err.arg,) if err.arg else ()), err.message, err.hint))
    for split in ("train", "eval"):
        for i, item in enumerate(getattr(spec.transforms, split)):
            try:
                build_item(item)
            except TransformProblem as problem:
                problems.append((("data", "transforms", split, i) + problem.where, problem.message, problem.hint))
    return problems, looked


def missing_packages(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if importlib.util.find_spec(name) is None]


def _check_optional_packages(recipe: Recipe, source: Source) -> list[Issue]:
    """ONNX export needs the optional `onnx` extra; say so before anything runs."""
    issues = []
    for i, stage in enumerate(recipe.stages):
        if stage.kind == "export" and "onnx" in stage.formats:
            missing = missing_packages(("onnx", "onnxruntime"))
            if missing:
                issues.append(located_issue(source, ("stages", i, "formats"),
                                     f"ONNX export needs {', '.join(f'`{m}`' for m in missing)}, which is not installed",
                                     "pip install 'nnopt[onnx]', or drop `onnx` from formats"))
    return issues


def _check_trainer(recipe: Recipe, source: Source) -> list[Issue]:
    """Accelerator, strategy and precision combinations this machine and Lightning can run."""
    from runner.recipe.devices import problems, world_size

    issues = [located_issue(source, ("trainer", field), message, hint) for field, message, hint in problems(recipe.trainer)]
    for path, block in training_blocks(recipe):
        if block.trainer is None:
            continue
        own = block.trainer.model_dump(exclude_none=True)
        issues += [located_issue(source, path + ("trainer", field), message, hint)
                   for field, message, hint in problems(recipe.trainer.with_override(block.trainer)) if field in own]

    processes = world_size(recipe.trainer)
    if processes > 1:
        for block, size in (("batch_size", recipe.data.batch_size), ("eval_batch_size", recipe.data.eval_batch_size)):
            if size % processes:
                issues.append(located_issue(source, ("data", block), f"{block} {size} is the global batch and does not split "
                                     f"evenly over {processes} processes", f"use a multiple of {processes}"))
        for path, block in training_blocks(recipe):
            for tuner in ("lr_finder", "batch_size_finder"):
                if getattr(block, tuner) is not None:
                    issues.append(located_issue(source, path + (tuner,), f"Lightning's `{tuner}` runs in one process, "
                                         f"but this recipe trains in {processes}",
                                         "find the value in a one-process run, then set it in the recipe"))
    return issues


def check_seeds(recipe: Recipe, source: Source) -> list[Issue]:
    # `--seeds` (an override) replaces the file's seed on purpose; in the file, both is ambiguous.
    if recipe.seeds is not None and "seed" in recipe.model_fields_set and ("seeds",) not in source.overridden:
        return [located_issue(source, ("seeds",), "give `seed` or `seeds`, not both",
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
        return located_issue(source, path, f"unknown run metric `{metric}`", (guess + " " if guess else "") + "run metrics: "
                      + ", ".join(RUN_METRICS) + "; or name a stage's metric as `stage.metric`")
    if stage_name not in stages:
        guess = did_you_mean(stage_name, list(stages))
        return located_issue(source, path, f"`{metric}`: the recipe has no stage `{stage_name}`",
                      (guess + " " if guess else "") + "stages: " + ", ".join(stages))
    patterns = stage_metric_patterns(stages[stage_name])
    if not reports(patterns, stage_metric):
        guess = did_you_mean(stage_metric, [p for p in patterns if "*" not in p])
        return located_issue(source, path, f"stage `{stage_name}` ({stages[stage_name].kind}) does not report `{stage_metric}`",
                      (guess + " " if guess else "") + "it reports: " + ", ".join(patterns))
    return None
