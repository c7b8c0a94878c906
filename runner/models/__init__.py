"""Model registry: a name maps to a factory taking keyword arguments from the recipe."""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from runner.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

# Registration is explicit: importing these modules runs their @MODELS.register decorators.
from runner.models import lenet, mlp, resnet  # noqa: E402,F401


def resolve_import(target: str) -> Callable[..., nn.Module]:
    """`package.module:factory` -> the factory. Trusted code: the user chose to run it."""
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"cannot import `{module_name}`: {err}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ImportError(f"`{module_name}` has no callable `{attr}`")
    return factory


def build_model(spec) -> nn.Module:
    """Build the model a recipe's `model:` block describes (a ModelSpec)."""
    factory = MODELS.get(spec.name) if spec.name is not None else resolve_import(spec.import_)
    return factory(**spec.args)
