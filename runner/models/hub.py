"""Architectures from torchvision.models and timm, always built without their hub's pretrained weights."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import re
from typing import Any, Callable

import torch
from torch import nn

from runner.registry import UnknownName, did_you_mean

# Arguments through which a builder downloads weights from its hub. Machines without internet cannot,
# and the weights a run starts from enter its fingerprint only through `model.weights:`.
HUB_WEIGHT_ARGS = {
    "torchvision": ("weights", "weights_backbone", "pretrained", "pretrained_backbone"),
    "timm": ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path"),
}


class MissingPackage(Exception):
    def __init__(self, package: str, extra: str):
        self.message = f"`{package}` is not installed"
        self.hint = f"pip install 'nnopt[{extra}]'"
        super().__init__(self.message)


def torchvision_builder(name: str) -> Callable[..., nn.Module]:
    """A torchvision.models builder by name; hub weight arguments it has are pinned to None (some, such as
    detection models' `weights_backbone`, would otherwise download by default)."""
    from torchvision import models

    names = models.list_models()
    if name not in names:
        raise UnknownName("torchvision model", name, names)
    builder = models.get_model_builder(name)
    offline = {arg: None for arg in HUB_WEIGHT_ARGS["torchvision"] if arg in inspect.signature(builder).parameters}
    return functools.partial(builder, **offline)


def timm_builder(name: str) -> Callable[..., nn.Module]:
    if importlib.util.find_spec("timm") is None:
        raise MissingPackage("timm", "timm")
    import timm

    if not timm.is_model(name):
        raise UnknownName("timm model", name, timm.list_models())
    return functools.partial(timm.create_model, name, pretrained=False)


def builder_of(source: str, name: str) -> Callable[..., nn.Module]:
    return {"torchvision": torchvision_builder, "timm": timm_builder}[source](name)


def hub_weight_args(source: str, args: dict[str, Any]) -> list[str]:
    """The arguments in `args` that ask the hub for pretrained weights (a falsy value asks for none)."""
    return [arg for arg in HUB_WEIGHT_ARGS[source] if args.get(arg) not in (None, False)]


def _model_arguments(builder: Callable[..., nn.Module]) -> list[str]:
    """Argument names the builder's model class takes (a builder forwards its **kwargs there)."""
    with torch.device("meta"):
        model_class = type(builder())
    return [name for name, param in inspect.signature(model_class.__init__).parameters.items()
            if name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)]


def argument_problems(builder: Callable[..., nn.Module], args: dict[str, Any]) -> list[tuple[str | None, str, str | None]]:
    """(argument or None, message, hint) for arguments the builder refuses, found by building the model on
    the meta device: library code, no memory, no weights, milliseconds."""
    try:
        with torch.device("meta"):
            builder(**args)
    except TypeError as err:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unknown and unknown.group(1) in args:
            arg = unknown.group(1)
            known = _model_arguments(builder)
            guess = did_you_mean(arg, known)
            return [(arg, f"unknown argument `{arg}`", (guess + " " if guess else "") + "arguments: " + ", ".join(known))]
        return [(None, f"the builder refuses these arguments: {err}", None)]
    except Exception as err:  # a value the model's constructor rejects (a bad width, a wrong type)
        return [(None, f"the model cannot be built with these arguments: {type(err).__name__}: {err}", None)]
    return []
