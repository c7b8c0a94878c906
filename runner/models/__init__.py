"""Models: nnopt's registry, user factories (`import:`), torchvision and timm builders, and the trained
weights a run starts from."""

from __future__ import annotations

from typing import Callable

from torch import nn

from runner import imports
from runner.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

# Registration is explicit: importing these modules runs their @MODELS.register decorators.
from runner.models import lenet, mlp, resnet  # noqa: E402,F401
from runner.models import hub  # noqa: E402


def hub_source(spec) -> str | None:
    """Where the spec's builder comes from when it is not nnopt's or the user's: `torchvision`, `timm` (else None)."""
    return next((source for source in ("torchvision", "timm") if getattr(spec, source) is not None), None)


def factory_of(spec) -> Callable[..., nn.Module]:
    """The callable that builds the spec's architecture from its `args`."""
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
