"""Models: nnopt's registry, user factories (`import:`), torchvision and timm builders, and the trained
weights a run starts from."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from runner.errors import RecipeError
from runner.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

# Registration is explicit: importing these modules runs their @MODELS.register decorators.
from runner.models import lenet, mlp, resnet  # noqa: E402,F401
from runner.models.weights import WeightsError, fit_weights, output_classes, read_weights  # noqa: E402


def hub_source(spec) -> str | None:
    """"torchvision" or "timm" when the spec names a hub builder, else None."""
    return next((source for source in ("torchvision", "timm") if getattr(spec, source) is not None), None)


def factory_of(spec) -> Callable[..., nn.Module]:
    """The callable that builds the spec's architecture from its `args`."""
    from runner import imports
    from runner.models import hub

    if spec.name is not None:
        return MODELS.get(spec.name)
    if spec.import_ is not None:
        return imports.resolve(spec.import_, spec.recipe_dir)
    source = hub_source(spec)
    return hub.builder_of(source, getattr(spec, source))


def build_model(spec) -> nn.Module:
    """The architecture a ModelSpec describes, freshly initialised. Never reads `weights:`: a saved
    artifact is rebuilt from its spec and then loads its own state dict."""
    return factory_of(spec)(**spec.args)


def initial_model(spec, data: Callable[[], Any]) -> tuple[nn.Module, str | None]:
    """The model the pipeline's first stage starts from, and a line saying which weights it loaded.

    The architecture, with `weights:` loaded if given (a stage folder's transforms, such as pruning masks,
    replayed first so its state dict fits), checked to output one logit per class of `data()` (the data
    contract of runner.data, built after the model so its initialisation draws the same random numbers)
    before anything trains.
    """
    model, note = build_model(spec), None
    path = spec.weights_path()
    try:
        if path is not None:
            weights = read_weights(path)
            if weights.transforms:
                import runner.modelio  # noqa: F401  (imports the modules that register the transforms)
                from runner.transforms import replay

                model = replay(model, weights.transforms)
            note = f"weights {spec.weights}: " + fit_weights(model, weights, spec.strict)
        _check_classes(spec, output_classes(model, data().examples("test", 2)[0]), data().num_classes)
    except WeightsError as error:
        raise RecipeError([spec.issue(error.field, error.message, error.hint)]) from None
    return model, note


def _check_classes(spec, outputs: int, num_classes: int) -> None:
    if outputs == num_classes:
        return
    message = f"the model outputs {outputs} classes, the data has {num_classes}"
    if spec.weights is not None:
        raise WeightsError(message + " (with these weights)", f"to train a new classifier head from these weights, "
                           f"set `args: {{num_classes: {num_classes}}}` and `strict: false`")
    field = ("args", "num_classes") if "num_classes" in spec.args else ("args",)
    raise WeightsError(message, f"set `model.args.num_classes: {num_classes}` (or the argument the model takes "
                       "for its number of outputs)", field=field)
