"""The model built without its weights at `validate` (on the CPU; on torch's meta device when large): does it take the
data's input, give one output per class, have the layers the recipe names, leave every pruned layer some weights,
and fit its quantizer and dropout adjustment."""

from __future__ import annotations

import fnmatch
import os
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

from runner.registry import closest_names

# A model this small is dry-built on the CPU: a real copy costs milliseconds to a fraction of a second, while torch's
# meta kernels import sympy and torch._dynamo on the first forward pass (2-3 s of validate). Larger ones are built on
# the meta device, and a real copy of them is never made.
REAL_BUILD_MAX_PARAMETERS = 20_000_000


class BuildFailed(Exception):
    pass


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def builds_user_code(spec) -> bool:
    return spec.import_ is not None


def _build(spec, device: str) -> nn.Module:
    """The architecture, on `device`; the factory's own failures become BuildFailed."""
    from runner.imports import ImportFailed
    from runner.models import build_model

    try:
        with torch.device(device):
            model = build_model(spec)
    except ImportFailed as error:
        raise BuildFailed(error.message) from None
    except Exception as error:  # the factory refused its arguments (ValueError, TypeError, ...)
        raise BuildFailed(f"{type(error).__name__}: {_first_line(error)}") from None
    if not isinstance(model, nn.Module):
        raise BuildFailed(f"the factory returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _model_field(spec) -> tuple:
    from runner.models.weights import spec_field

    return ("model",) + spec_field(spec)


def check_model_fits(recipe, facts, found, build_user_code: bool) -> None:
    """Dry-build the model and check it against the data and the stages; user `import:` code runs only when
    asked (`nnopt validate --build-model`; `nnopt run` always builds it, and this check then runs before any stage)."""
    spec = recipe.model
    if builds_user_code(spec) and not build_user_code:
        return
    try:
        model = _build(spec, "meta")
    except BuildFailed as error:
        found.error(_model_field(spec), f"the model cannot be built: {error}")
        return
    parameters = sum(p.numel() for p in model.parameters())
    trains = any(getattr(stage, "optimizer", None) is not None or stage.kind in ("iterative_prune",)
                 for stage in recipe.stages)
    if parameters == 0 and trains:
        found.error(_model_field(spec), "the model has no parameters to train")
        return
    if parameters <= REAL_BUILD_MAX_PARAMETERS:
        try:
            model = _build(spec, "cpu")
        except BuildFailed:
            pass  # the meta build succeeded: the run names whatever makes a real one fail
    if spec.weights is not None and parameters <= REAL_BUILD_MAX_PARAMETERS:
        _check_weights(spec, found)
    if facts is not None and facts.shape is not None:
        _check_input_and_outputs(spec, model, parameters, facts, found)
    _check_patterns(recipe, model, found)
    _check_skip(recipe, model, found)
    _check_codebooks(recipe, model, found)
    _check_bytes_budget(recipe, model, found)
    _check_structure(recipe, model, facts, found)
    _check_dropout(recipe, model, found)
    check_expect_layers(recipe, model, found)
    if facts is not None and facts.shape is not None and parameters <= REAL_BUILD_MAX_PARAMETERS:
        _check_int8(recipe, facts, found)


def check_teachers(teachers: list[tuple[tuple, object]], facts, found, build_user_code: bool) -> None:
    """A distillation teacher given as a model is loaded as the run will load it (built on the CPU, its weights
    fitted) and must give one logit per class of the data: its logits meet the student's class by class."""
    if not teachers or facts is None or facts.shape is None or facts.num_classes is None:
        return
    from types import SimpleNamespace

    from runner.errors import RecipeError
    from runner.modelio import initial_model  # imports Torch-Pruning (slimming's replay): only for a teacher
    from runner.models.weights import layout_problem

    data = SimpleNamespace(examples=lambda split, count: (torch.zeros((count,) + tuple(facts.shape)), None),
                           num_classes=facts.num_classes)
    for path, spec in teachers:
        if (builds_user_code(spec) and not build_user_code) or layout_problem(spec.weights_path()):
            continue  # user code runs only when asked; a missing weights file is check_model's error
        try:
            size = sum(p.numel() for p in _build(spec, "meta").parameters())
            if size <= REAL_BUILD_MAX_PARAMETERS:
                initial_model(spec, lambda: data)
        except BuildFailed as error:
            found.error(path, f"the teacher cannot be built: {error}")
        except RecipeError as error:
            found.errors.extend(error.issues)
        except Exception as error:  # its forward pass on the data's examples: a shape mismatch, user code
            found.error(path, f"the teacher's forward pass fails on a batch of the data's examples (shape "
                        f"{tuple(facts.shape)}): {type(error).__name__}: {_first_line(error)}{_where(error)}",
                        "a teacher sees the student's batches: it must take the same input")


def _check_weights(spec, found) -> None:
    """`model.weights` read and fitted to the architecture as the run does (a state dict or checkpoint, never a
    pickle that runs code): a file that is something else fails here, not after the first stage started."""
    from runner.models.weights import WeightsError, layout_problem

    if layout_problem(spec.weights_path()):
        return  # check_model's error
    from runner.modelio import with_weights  # Torch-Pruning comes with slimming's replay

    try:
        with_weights(_build(spec, "cpu"), spec)
    except BuildFailed:
        return  # the meta build succeeded: the run names whatever makes a real one fail
    except WeightsError as error:
        found.error(("model",) + tuple(error.field), error.message, error.hint)


def _device(model: nn.Module) -> str:
    return "meta" if any(p.is_meta for p in model.parameters()) else "cpu"


def _forward(model: nn.Module, shape: tuple, device: str) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.zeros((2,) + shape, device=device))


def _where(error: Exception) -> str:
    """The innermost place outside torch that the error passed through: the model's own code."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename]
    return f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""


def _check_input_and_outputs(spec, model: nn.Module, parameters: int, facts, found) -> None:
    from runner.models.weights import class_count_problem

    shape, device = tuple(facts.shape), _device(model)
    try:
        try:
            output = _forward(model, shape, device)
        except Exception:
            if device == "cpu":
                raise
            # a shape mismatch, or code a meta tensor cannot run (`.item()`): real numbers tell, for a small model
            output = _forward(_build(spec, "cpu"), shape, "cpu") if parameters <= REAL_BUILD_MAX_PARAMETERS else None
    except BuildFailed:
        return  # the meta build worked; a real one fails only for reasons the run will name
    except Exception as error:  # the forward pass itself: a shape mismatch, or a bug behind `import:`
        found.error(_model_field(spec), f"the model's forward pass fails on a batch of the data's examples "
                    f"(shape {shape}): {type(error).__name__}: {_first_line(error)}{_where(error)}",
                    f"match the model's input to the data (for mlp and lenet_300_100: `in_features: {_flat(shape)}`)")
        return
    if output is None:
        return
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        found.error(_model_field(spec), "the model's output is not a (batch, classes) tensor of logits")
        return
    problem = class_count_problem(spec, output.shape[1], facts.num_classes) if facts.num_classes is not None else None
    if problem:  # the same message as the run's (runner.modelio.initial_model)
        field, message, hint = problem
        found.error(("model",) + field, message, hint)


def _flat(shape) -> int:
    size = 1
    for n in shape:
        size *= n
    return size


def _pruning_specs(recipe):
    """(path, spec, targets field) of every weight-pruning spec: stages and gradual schedules."""
    for i, stage in enumerate(recipe.stages):
        if stage.kind == "prune" and stage.granularity == "weights":
            yield ("stages", i), stage, "sparsity"
        if stage.kind == "iterative_prune":
            yield ("stages", i), stage, "fraction"
        for name in ("gradual_pruning",):
            if getattr(stage, name, None) is not None:
                yield ("stages", i, name), stage.gradual_pruning, "sparsity"


def _check_patterns(recipe, model: nn.Module, found) -> None:
    """A parameter or layer pattern that matches nothing is a typo, never a silent no-op."""
    from runner import pruning

    names = [name for name, _ in model.named_parameters()]
    patterns = [(("stages", i, "regularization", j, "params", k), pattern)
                for i, stage in enumerate(recipe.stages)
                for j, term in enumerate(getattr(stage, "regularization", []))
                for k, pattern in enumerate(term.params)]
    patterns += [(("stages", i, "bits", pattern), pattern) for i, stage in enumerate(recipe.stages)
                 if getattr(stage, "method", None) == "weight_sharing" and isinstance(stage.bits, dict)
                 for pattern in stage.bits]
    specs = list(_pruning_specs(recipe))
    patterns += [(path + ("params", k), pattern) for path, spec, _ in specs for k, pattern in enumerate(spec.params or [])]
    for path, pattern in patterns:
        if not fnmatch.filter(names, pattern):
            found.error(path, f"`{pattern}` matches no parameter of the model", closest_names(pattern, names, "parameters"))
    for i, stage in enumerate(recipe.stages):
        bounds = stage.allocation.bounds if stage.kind == "prune" and stage.allocation is not None else {}
        prunable = pruning.prunable_names(model, stage.params) if bounds else []
        for pattern in pruning.unmatched_patterns(list(bounds), prunable):
            found.error(("stages", i, "allocation", "bounds", pattern), f"`{pattern}` matches no pruned layer of the "
                        "model", closest_names(pattern, _layers_and_weights(prunable), "pruned"))
        _check_keep(i, stage, model, found)
    for path, spec, targets_field in specs:
        prunable = pruning.prunable_names(model, spec.params)
        targets = getattr(spec, targets_field)
        if isinstance(targets, dict):
            unmatched = pruning.unmatched_patterns(list(targets), prunable)
            for pattern in unmatched:
                found.error(path + (targets_field, pattern), f"`{pattern}` matches no prunable layer of the model",
                            closest_names(pattern, _layers_and_weights(prunable), "prunable"))
            if unmatched:
                continue
            _check_shadowed(path + (targets_field,), targets, prunable,
                            lambda pattern, name: not pruning.unmatched_patterns([pattern], [name]), False, found)
        _check_kept(path, spec, targets_field, model, prunable, found)


def _layers_and_weights(weights: list[str]) -> list[str]:
    """`fc1`, `fc1.weight`, ...: a layer pattern may name a weight or its layer (runner.pruning.unmatched_patterns)."""
    return [name for weight in weights for name in (weight.rpartition(".")[0], weight)]


def _check_skip(recipe, model: nn.Module, found) -> None:
    """int8's `skip` names layers the method quantizes: a misspelt one would quantize the layer meant to stay float
    (the stage refuses it, but only once every stage before it has run)."""
    stages = [(i, stage) for i, stage in enumerate(recipe.stages) if getattr(stage, "skip", None)]
    if not stages:
        return
    from runner.compress.int8 import quantizable_layers

    modules = dict(model.named_modules())
    for i, stage in stages:
        layers = quantizable_layers(model, stage.method)
        for k, name in enumerate(stage.skip):
            if name in layers:
                continue
            if name in modules and name:
                found.error(("stages", i, "skip", k), f"`{name}` is a {type(modules[name]).__name__}, which "
                            f"{stage.method} does not quantize: it stays in float without `skip`",
                            f"{stage.method} quantizes: " + ", ".join(layers))
            else:
                found.error(("stages", i, "skip", k), f"`{name}` is no layer of the model that {stage.method} "
                            "quantizes", closest_names(name, layers, "layers"))


def _check_keep(i: int, stage, model: nn.Module, found) -> None:
    """`keep_params` / `keep_bytes` above what the pruned layers hold would prune nothing."""
    from runner import pruning

    allocation = stage.allocation if stage.kind == "prune" else None
    if allocation is None or not allocation.keeps:
        return
    total = sum(model.get_parameter(name).numel() for name in pruning.prunable_names(model, stage.params))
    field, asked = ("keep_params", allocation.keep_params) if allocation.keep_params else \
        ("keep_bytes", allocation.keep_bytes // 4)
    if asked >= total:
        found.error(("stages", i, "allocation", field), f"{field} asks to keep {asked:,} weights, but the pruned "
                    f"layers have {total:,}: nothing would be pruned", f"keep fewer than {total:,} weights "
                    f"({4 * total:,} bytes)")


def _kept(size: int, target: float, rounds: int) -> int:
    """Weights a layer keeps after `rounds` prunings to `target` (one-shot: the sparsity; iterative: the fraction
    of what remains, s' = 1 - (1 - s)(1 - f)), each rounded to whole weights as runner.pruning does."""
    zeros = 0
    for _ in range(rounds):
        zeros = round((1 - (1 - zeros / size) * (1 - target)) * size)
    return size - zeros


def _check_kept(path: tuple, spec, targets_field: str, model: nn.Module, prunable: list[str], found) -> None:
    """Per-layer targets that leave a layer without a single weight: the network is cut in two."""
    from runner import pruning

    if spec.scope != "layer" or getattr(spec, "allow_empty_layers", False):
        return  # a global ranking is known only from the trained weights: the stage checks it when it runs
    rounds = getattr(spec, "rounds", 1)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    for name, target in pruning.layer_targets(prunable, getattr(spec, targets_field)).items():
        if name in sizes and _kept(sizes[name], target, rounds) == 0:
            found.error(path + (targets_field,), f"`{name}` would keep none of its {sizes[name]} weights"
                        + (f" after {rounds} rounds" if rounds > 1 else "") + ": the network is cut and can only "
                        "guess", "lower the target for that layer, or set `allow_empty_layers: true` if you mean it")


def _check_shadowed(path: tuple, targets: dict, names: list[str], matches, first_wins: bool, found) -> None:
    """A pattern of a {pattern: value} map whose every layer another pattern decides never applies: weight
    sharing's bits take the first matching pattern, sparsity targets the last."""
    patterns = list(targets)
    for k, pattern in enumerate(patterns):
        others = patterns[:k] if first_wins else patterns[k + 1:]
        mine = [name for name in names if matches(pattern, name)]
        if mine and others and all(any(matches(other, name) for other in others) for name in mine):
            order = "first" if first_wins else "last"
            found.error(path + (pattern,), f"`{pattern}` never applies: each layer it matches is also matched by a "
                        f"pattern {'before' if first_wins else 'after'} it, and the {order} match decides",
                        f"put the specific pattern {'first' if first_wins else 'last'}")


def _check_codebooks(recipe, model: nn.Module, found) -> None:
    """A codebook of 2^bits values for a layer with fewer weights shares nothing: every weight keeps its own
    value and the codebook outweighs the layer."""
    from runner.compress.sharing import bits_for
    from runner.pruning import prunable_names

    for i, stage in enumerate(recipe.stages):
        if getattr(stage, "method", None) != "weight_sharing" or stage.bits is None:
            continue
        if isinstance(stage.bits, dict):
            _check_shadowed(("stages", i, "bits"), stage.bits, prunable_names(model),
                            lambda pattern, name: fnmatch.fnmatch(name, pattern), True, found)
        for name in prunable_names(model):
            bits, size = bits_for(name, stage.bits), model.get_parameter(name).numel()
            if bits is not None and 2**bits > size:
                field = ("stages", i, "bits") + (tuple(p for p in stage.bits if fnmatch.fnmatch(name, p))[:1]
                                                 if isinstance(stage.bits, dict) else ())
                found.error(field, f"{bits} bits give `{name}` a codebook of {2**bits} values for its {size} "
                            "weights: nothing is shared, and the codebook outweighs the layer",
                            f"use at most {size.bit_length() - 1} bits for it")
                break


def _check_bytes_budget(recipe, model: nn.Module, found) -> None:
    """A bytes budget below what the shared layers' codebooks alone take at the narrowest width cannot be met."""
    from runner.allocation import layer_bytes
    from runner.pruning import prunable_names

    scans = {stage.name: stage.bits for stage in recipe.stages if stage.kind == "sensitivity"}
    for i, stage in enumerate(recipe.stages):
        allocation = getattr(stage, "allocation", None)
        if getattr(stage, "method", None) != "weight_sharing" or allocation is None or allocation.max_bytes is None:
            continue
        widths = scans.get(allocation.sensitivity) if allocation.sensitivity else allocation.bits
        layers = prunable_names(model)
        if not widths or not layers:
            continue
        least = sum(layer_bytes(0, min(widths)) for _ in layers)
        if allocation.max_bytes < least:
            found.error(("stages", i, "allocation", "max_bytes"), f"max_bytes {allocation.max_bytes} is below what the "
                        f"{len(layers)} shared layers' codebooks alone take at {min(widths)} bits ({least:,.0f} bytes), "
                        "before any weight is counted", f"allow more than {least:,.0f} bytes")


def _check_structure(recipe, model: nn.Module, facts, found) -> None:
    """Neuron pruning follows sequential chains and networks Torch-Pruning can trace (runner.slimming)."""
    shape = getattr(facts, "shape", None)
    for i, stage in enumerate(recipe.stages):
        if stage.kind == "prune" and stage.granularity == "neurons" and shape is not None:
            # imported here: Torch-Pruning brings timm and torchvision, a second of startup a recipe without
            # neuron pruning does not need
            from runner.slimming import check_supported

            problem = check_supported(model, torch.zeros((2,) + tuple(shape), device=_device(model)))
            if problem:
                found.error(("stages", i, "granularity"), f"structured pruning cannot follow this model: {problem}",
                            "neurons and channels are removed in sequential chains and in networks Torch-Pruning "
                            "can trace; otherwise use `granularity: weights`")
            else:
                _check_neuron_targets(i, stage, model, found)
            return


def _check_neuron_targets(i: int, stage, model: nn.Module, found) -> None:
    """Neurons come out of every weighted layer but the output one, whose neurons are the classes
    (runner.slimming): a pattern naming only that layer, or a target removing all of a layer's neurons, would
    fail the stage after training."""
    from runner import pruning
    from runner.slimming import WEIGHTED

    weighted = [(name, module) for name, module in model.named_modules() if isinstance(module, WEIGHTED)]
    if len(weighted) < 2:
        return
    prunable, output = [f"{name}.weight" for name, _ in weighted[:-1]], weighted[-1][0]
    units = "neurons" if all(isinstance(module, nn.Linear) for _, module in weighted) else "channels"
    for pattern in stage.sparsity if isinstance(stage.sparsity, dict) else []:
        if pruning.unmatched_patterns([pattern], prunable):
            only_output = not pruning.unmatched_patterns([pattern], [f"{output}.weight"])
            found.error(("stages", i, "sparsity", pattern), f"`{pattern}` matches no layer whose {units} can be removed",
                        f"`{output}` produces the model's outputs, one per class" if only_output
                        else "layers: " + ", ".join(name for name, _ in weighted[:-1]))
            return
    widths = {f"{name}.weight": module.weight.shape[0] for name, module in weighted[:-1]}
    for name, target in pruning.layer_targets(prunable, stage.sparsity).items():
        removed = round(target * widths[name])
        if stage.scope == "layer" and removed >= widths[name]:
            found.error(("stages", i, "sparsity"), f"sparsity {target:g} would remove every neuron of "
                        f"`{name.rpartition('.')[0]}` ({removed} of {widths[name]})", "lower its target")
            return


def _check_dropout(recipe, model: nn.Module, found) -> None:
    """`dropout: {adjust: ...}` scales each dropout module by the layer it feeds: the model must have dropout modules,
    torch.fx must trace it, and each must feed one Linear or Conv layer (never a silent no-op)."""
    blocks = [(path, block) for i, stage in enumerate(recipe.stages)
              for path, block in ((("stages", i), stage), (("stages", i, "retrain"), getattr(stage, "retrain", None)))
              if getattr(block, "dropout", None) is not None]
    if not blocks:
        return
    from runner.dropout import HINT, feeding_layers

    _, problems = feeding_layers(model)
    for path, _ in blocks:
        for problem in problems:
            found.error(path + ("dropout",), f"the dropout adjustment cannot apply: {problem}", HINT)


def _check_int8(recipe, facts, found) -> None:
    """Static int8 and QAT trace the model and need an int8 kernel for every layer: probed on a real copy."""
    from runner.compress import int8

    stages = [(i, stage) for i, stage in enumerate(recipe.stages) if getattr(stage, "method", None) in ("static_int8", "qat")]
    if not stages:
        return
    try:
        model = _build(recipe.model, "cpu").eval()
    except BuildFailed:
        return  # reported by the meta build
    example = torch.zeros((2,) + tuple(facts.shape))
    for i, stage in stages:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # uncalibrated observers and torch's deprecations say so at length
            problem = int8.check_supported(model, example, stage.method)
        if problem:
            found.error(("stages", i, "method"), f"{stage.method} cannot quantize this model: {problem}",
                        "static int8 and QAT trace the model with torch.fx and need an int8 kernel for every Conv "
                        "and Linear; dynamic_int8 quantizes only Linear layers and runs the rest in float")


def check_expect_layers(recipe, model: nn.Module, found) -> None:
    """`stage.layer_sparsity.fc9.weight` and the like name a layer of the dry-built model."""
    if recipe.expect is None:
        return
    layers = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_modules() if name}
    per_layer = ("layer_sparsity", "layer_sparsity_before", "layer_sparsity_after", "layer_bits", "distinct_values",
                 "widths_before", "widths_after")
    stages = {stage.name for stage in recipe.stages}
    for metric in recipe.expect.metrics:
        stage, _, rest = metric.partition(".")
        group, _, layer = rest.partition(".")
        if stage in stages and group in per_layer and layer and layer not in layers:
            found.error(("expect", "metrics", metric), f"the model has no layer `{layer}`",
                        closest_names(layer, sorted(layers), "layers"))
