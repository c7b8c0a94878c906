"""Transforms: how stages record that they restructured a model, so it can be rebuilt from data alone.

A model artifact is the registry spec plus an ordered list of transforms. A stage that changes
the module tree (pruning masks as parametrizations, physical slimming, quantized modules)
records a transform on the model; loading replays the transforms on a freshly built model, then
loads the state dict with strict=True, so the artifact reloads bit for bit.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from runner.registry import Registry

# kind -> function(model, **info) -> model, replaying what the stage did to the module tree.
TRANSFORMS: Registry[Callable[..., nn.Module]] = Registry("model transform")

_ATTRIBUTE = "_nnopt_transforms"


def record(model: nn.Module, kind: str, **info: Any) -> None:
    """Note on the model that it was restructured; `info` must be JSON data."""
    TRANSFORMS.get(kind)  # fail now, not at load time, if nobody can replay it
    transforms = list(getattr(model, _ATTRIBUTE, []))
    transforms.append({"kind": kind, **info})
    setattr(model, _ATTRIBUTE, transforms)


def transforms_of(model: nn.Module) -> list[dict]:
    return list(getattr(model, _ATTRIBUTE, []))


def replay(model: nn.Module, transforms: list[dict]) -> nn.Module:
    """Apply `transforms` after those the model already has (none, for a freshly built one)."""
    done = transforms_of(model)
    for entry in transforms:
        info = {k: v for k, v in entry.items() if k != "kind"}
        model = TRANSFORMS.get(entry["kind"])(model, **info)
    setattr(model, _ATTRIBUTE, done + list(transforms))
    return model


def inherit(new: nn.Module, old: nn.Module) -> None:
    """Give a restructured copy the transform history of the model it was made from."""
    setattr(new, _ATTRIBUTE, transforms_of(old))
