"""Models: nnopt's registry, user factories (`import:`), torchvision and timm builders, and the trained
weights a run starts from."""

from __future__ import annotations

from typing import Callable

import torch
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


def located(spec, error: WeightsError) -> RecipeError:
    """A problem with the model found while the run starts, located in the recipe like a validation error."""
    return RecipeError([spec.issue(error.field, error.message, error.hint)])


def initial_model(spec) -> tuple[nn.Module, str | None]:
    """The model the pipeline's first stage starts from: the architecture, with `weights:` loaded if given
    (a stage folder's transforms, such as pruning masks, replayed first so its state dict fits), and a
    line saying what was loaded."""
    model = build_model(spec)
    path = spec.weights_path()
    if path is None:
        return model, None
    try:
        weights = read_weights(path)
        if weights.transforms:
            import runner.modelio  # noqa: F401  (imports the modules that register the transforms)
            from runner.transforms import replay

            model = replay(model, weights.transforms)
        return model, f"weights {spec.weights}: " + fit_weights(model, weights, spec.strict)
    except WeightsError as error:
        raise located(spec, error) from None


def check_classes(spec, model: nn.Module, inputs: torch.Tensor, num_classes: int) -> None:
    """The model's logits must have one entry per class of the data; found before any training."""
    try:
        outputs = output_classes(model, inputs)
    except WeightsError as error:
        raise located(spec, error) from None
    if outputs == num_classes:
        return
    message = f"the model outputs {outputs} classes, the data has {num_classes}"
    if spec.weights is not None:
        raise located(spec, WeightsError(
            message + " (with these weights)",
            f"to train a new classifier head from these weights, set `args: {{num_classes: {num_classes}}}` "
            "and `strict: false`", field=("weights",)))
    field = ("args", "num_classes") if "num_classes" in spec.args else ("args",)
    raise located(spec, WeightsError(message, f"set `model.args.num_classes: {num_classes}` (or the argument "
                                     "the model takes for its number of outputs)", field=field))
