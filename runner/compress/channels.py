"""Channel pruning of networks with branches (ResNet, MobileNet) through Torch-Pruning's dependency graph."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.utils import parametrize

from runner.transforms import TRANSFORMS, record

if TYPE_CHECKING:
    import torch_pruning as tp

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # layers whose output channels are ranked and removed


# Torch-Pruning (with the timm and torchvision it imports: seconds of start-up) is imported when channels are traced,
# not when this module registers its transform: every run imports it through runner.modelio.
@functools.cache
def _handlers() -> tuple[tuple, tuple]:
    """Torch-Pruning's handlers that write a layer's output channels, and those that read its input channels."""
    import torch_pruning as tp

    return ((tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels, tp.prune_linear_out_channels),
            (tp.prune_conv_in_channels, tp.prune_linear_in_channels))


class Unsupported(ValueError):
    """The network cannot be traced, or a group's channels cannot be removed exactly; the message says why."""


@dataclass
class Group:
    """Channels that must go together: a layer's outputs, the BatchNorm after it, the inputs of the layers
    reading them and, across a residual addition, every layer writing into the same stream (a ResNet
    stage's stem or projection and each block's last conv). Named by its root, the first writer in
    module order: resnet20 has `conv1` (the first stage's stream, with `layers.{0,1,2}.conv2`),
    `layers.3.conv2` and `layers.6.conv2` (the other stages' streams, with their projections) and each
    block's inner `layers.N.conv1` alone. Channels that no layer reads (the logits) form no group."""

    root: str  # the first writing layer in module order; the recipe's sparsity patterns name it
    writers: list[str]  # every Conv/Linear producing these channels (row c of each is channel c), root first
    width: int


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """Trace `model` on one example; Torch-Pruning switches to eval mode to trace, the mode is restored."""
    if any(parametrize.is_parametrized(module) for module in model.modules()):
        raise Unsupported("it carries pruning masks; remove channels before pruning weights")
    import torch_pruning as tp

    training = model.training
    try:
        # Torch-Pruning follows autograd's graph, so it needs gradients even where the caller turned them off.
        with torch.inference_mode(False), torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example[:1].clone(), verbose=False)
    except Exception as err:  # noqa: BLE001 - whatever the trace trips on, the user needs its reason, not a traceback
        raise Unsupported(f"Torch-Pruning cannot trace it ({_first_line(err)})") from None
    finally:
        model.train(training)


def groups(model: nn.Module, graph: tp.DependencyGraph) -> list[Group]:
    """The prunable groups, in module order of their roots; channels no layer reads (the logits) are left out."""
    names = {module: name for name, module in model.named_modules()}
    order = {name: index for index, name in enumerate(names.values())}
    found, (writes, reads_handlers) = [], _handlers()
    for group in graph.get_all_groups(root_module_types=LAYERS):
        width = len(group[0].idxs)
        writers, reads = [], False
        for item in group:
            module, handler = item.dep.target.module, item.dep.handler
            if handler in reads_handlers:
                reads = True
                if getattr(module, "groups", 1) > 1:
                    raise Unsupported(f"`{names[module]}` is a grouped convolution reading removable channels")
            elif handler in writes and isinstance(module, LAYERS):
                if list(item.idxs) != list(range(width)) or list(item.root_idxs) != list(range(width)):
                    raise Unsupported(f"the channels of `{names[module]}` are split or concatenated on their way; "
                                      "only one-to-one channel couplings (residual additions) are followed")
                writers.append(names[module])
        if reads:
            writers.sort(key=order.get)
            found.append(Group(root=writers[0], writers=writers, width=width))
    return sorted(found, key=lambda g: order[g.root])


def scores(model: nn.Module, group: Group, norm: str) -> torch.Tensor:
    """Each channel's norm over every weight that writes it: l1 sums |w|, l2 is the Euclidean norm.
    With one writer this is the norm of its output row, the ranking of chains (Li et al. 2017 §3.1)."""
    total = torch.zeros(group.width)
    for name in group.writers:
        rows = model.get_submodule(name).weight.detach().flatten(1).float()
        total += rows.abs().sum(dim=1) if norm == "l1" else rows.pow(2).sum(dim=1)
    return total if norm == "l1" else total.sqrt()


def _removal(model: nn.Module, graph: tp.DependencyGraph, root: str, removed: list[int]):
    layer = model.get_submodule(root)
    return graph.get_pruning_group(layer, graph.get_pruner_of_module(layer).prune_out_channels, removed)


@torch.no_grad()
def zeroed_reads(model: nn.Module, graph: tp.DependencyGraph, removed: dict[str, list[int]]) -> nn.Module:
    """A copy of `model` whose layers read 0 wherever they would read a removed channel: what removal
    computes, since nothing else sees those channels (the groups exclude the model's outputs)."""
    names = {module: name for name, module in model.named_modules()}
    masked = copy.deepcopy(model)
    for root, indices in removed.items():
        for item in _removal(model, graph, root, indices):
            if item.dep.handler in _handlers()[1]:
                masked.get_submodule(names[item.dep.target.module]).weight[:, list(item.idxs)] = 0
    return masked


def remove(model: nn.Module, graph: tp.DependencyGraph, removed: dict[str, list[int]]) -> nn.Module:
    """Physically remove the channels of each root's group (indices in the root's output order)."""
    for root, indices in removed.items():
        _removal(model, graph, root, indices).prune(record_history=False)
    return model


@TRANSFORMS.register("channels")
def _replay(model: nn.Module, removed: dict[str, list[int]], example_shape: list[int]) -> nn.Module:
    """The same removals on a freshly built model (shapes only: the state dict loaded afterwards brings the values)."""
    return remove(model, dependency_graph(model, torch.zeros(example_shape)), removed)


def record_removal(model: nn.Module, removed: dict[str, list[int]], example: torch.Tensor) -> None:
    record(model, "channels", removed=removed, example_shape=[1, *example.shape[1:]])
