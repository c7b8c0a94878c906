"""`data.transforms`: torchvision `transforms.v2` by name with arguments, checked at validate, built per split."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from runner.registry import did_you_mean

# Left out: those taking Python callables or tensors (not expressible in YAML), those that turn one
# image into several (FiveCrop, TenCrop) and batch-level mixing (CutMix, MixUp: they need the batch).
_EXCLUDED = {"Transform", "Lambda", "LinearTransformation", "FiveCrop", "TenCrop", "CutMix", "MixUp"}
# A list holding one of these converts the image itself; otherwise the list runs on float tensors in [0, 1].
CONVERSIONS = {"ToImage", "PILToTensor", "ToTensor", "ToDtype", "ToPureTensor", "ConvertImageDtype"}


class TransformProblem(Exception):
    """A transform item that cannot be built; `where` is the path inside the item (() for its name)."""

    def __init__(self, where: tuple, message: str, hint: str | None = None):
        self.where, self.message, self.hint = where, message, hint
        super().__init__(message)


def available() -> dict[str, type]:
    from torchvision.transforms import v2

    return {name: value for name, value in vars(v2).items()
            if isinstance(value, type) and issubclass(value, v2.Transform) and name not in _EXCLUDED}


def split_item(item: str | dict) -> tuple[str, dict]:
    """`RandomHorizontalFlip` or `{RandomCrop: {size: 32, padding: 4}}` -> (name, arguments)."""
    if isinstance(item, str):
        return item, {}
    (name, args), = item.items()
    return name, dict(args or {})


def _value(parameter: str, value: Any) -> Any:
    """YAML spellings of the two argument types YAML has no word for: dtypes and interpolation modes."""
    if parameter == "dtype" and isinstance(value, str):
        dtype = getattr(torch, value, None)
        if not isinstance(dtype, torch.dtype):
            raise TransformProblem((parameter,), f"`{value}` is not a torch dtype", "e.g. float32, uint8")
        return dtype
    if parameter == "interpolation" and isinstance(value, str):
        from torchvision.transforms import InterpolationMode

        modes = [mode.value for mode in InterpolationMode]
        if value.lower() not in modes:
            guess = did_you_mean(value.lower(), modes)
            raise TransformProblem((parameter,), f"unknown interpolation `{value}`",
                                   (guess + " " if guess else "") + "modes: " + ", ".join(modes))
        return InterpolationMode(value.lower())
    if parameter == "transforms" and isinstance(value, list):  # RandomApply, RandomChoice, RandomOrder, Compose
        return [build_item(inner, (parameter, i)) for i, inner in enumerate(value)]
    return value


def build_item(item: str | dict, where: tuple = ()):
    name, args = split_item(item)
    known = available()
    if name not in known:
        guess = did_you_mean(name, list(known))
        raise TransformProblem(where, f"unknown transform `{name}`",
                               (guess + " " if guess else "") + "any class of torchvision.transforms.v2, e.g. "
                               "RandomCrop, RandomHorizontalFlip, Resize, CenterCrop, Normalize")
    cls = known[name]
    parameters = inspect.signature(cls).parameters
    for arg in args:
        if arg not in parameters:
            guess = did_you_mean(arg, list(parameters))
            raise TransformProblem(where + (name, arg), f"{name} has no argument `{arg}`",
                                   (guess + " " if guess else "") + "arguments: " + ", ".join(parameters))
    for arg, parameter in parameters.items():
        if parameter.default is inspect.Parameter.empty and arg not in args and parameter.kind not in (
                inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise TransformProblem(where + (name,), f"{name} needs `{arg}`",
                                   f"write it as `{{{name}: {{{arg}: ...}}}}`")
    try:
        return cls(**{arg: _value(arg, value) for arg, value in args.items()})
    except TransformProblem as problem:
        raise TransformProblem(where + (name,) + problem.where, problem.message, problem.hint) from None
    except (TypeError, ValueError) as error:
        raise TransformProblem(where + (name,), f"{name}: {error}") from None


def build(items: list) -> Any:
    """The transform a split applies to each example: the recipe's list, after a conversion to a float
    tensor in [0, 1] unless the list converts by itself. Raises TransformProblem (with the item's index
    first in `where`)."""
    from torchvision.transforms import v2

    transforms = []
    for i, item in enumerate(items):
        try:
            transforms.append(build_item(item))
        except TransformProblem as problem:
            raise TransformProblem((i,) + problem.where, problem.message, problem.hint) from None
    if not any(split_item(item)[0] in CONVERSIONS for item in items):
        transforms = [as_float_image, *transforms]
    return v2.Compose(transforms)


def as_float_image(example):
    """A PIL image or an integer tensor as a float tensor in [0, 1]; a float tensor (features, or an image
    its source already scaled) as it is."""
    if isinstance(example, torch.Tensor) and example.is_floating_point():
        return example
    from torchvision.transforms.v2 import functional

    return functional.to_dtype(functional.to_image(example), torch.float32, scale=True)
