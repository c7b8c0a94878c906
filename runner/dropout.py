"""Han et al. 2015 §3.2's dropout adjustment for retraining a pruned model: each dropout's ratio scaled to the kept
weights of the Linear or Conv layer it feeds, that layer found in the model's torch.fx graph."""

from __future__ import annotations

import contextlib
import math
import operator
from typing import Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.dropout import _DropoutNd

from runner.errors import StageError
from runner.measure import named_tensors
from runner.pruning import PRUNABLE_LAYERS

# D_r = D_o * sqrt(C_r / C_o) (Han et al. 2015 §3.2): dropout acts on a layer's inputs, whose connections pruning
# already thinned, so the variance it adds should shrink with them.
ADJUSTMENTS = {"sqrt_kept": lambda ratio, kept: ratio * math.sqrt(kept)}

HINT = ("the adjustment scales each dropout module by the kept weights of the one Linear or Conv layer its output "
        "feeds (through activations, pooling, normalization and reshapes); drop `dropout` from the stage where the "
        "model has no such dropout")

_FUNCTIONAL = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
               torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout}
# Layers with weights of their own that act on each value (or channel) alone: a dropout's output passes through them
# to the layer it feeds, as it passes through parameter-free modules (activations, pooling, reshapes).
_PER_VALUE = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.PReLU)
_SHAPE_METHODS = {"size", "dim", "numel"}
_SHAPE_ATTRIBUTES = {"shape", "ndim", "dtype", "device"}


class _Tracer(fx.Tracer):
    """Keeps prunable layers (a masked one is a parametrized subclass) and dropouts as single nodes."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, PRUNABLE_LAYERS + (_DropoutNd,)) or super().is_leaf_module(module, qualified_name)


def _shape_query(node: fx.Node) -> bool:
    """`x.size(0)`, `x.shape[1:]` and arithmetic on them: they read the value's shape, not its numbers."""
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _SHAPE_ATTRIBUTES
    return (node.op == "call_function" and getattr(node.target, "__module__", None) in ("_operator", operator.__name__)
            and bool(node.all_input_nodes) and all(_shape_query(arg) for arg in node.all_input_nodes))


def _descendants(start: fx.Node) -> set[fx.Node]:
    found, frontier = {start}, [start]
    while frontier:
        for user in frontier.pop().users:
            if user not in found:
                found.add(user)
                frontier.append(user)
    return found


def _fed_layers(start: fx.Node, modules: dict[str, nn.Module]) -> tuple[set[str], str | None]:
    """The first Linear/Conv layers a dropout's output reaches through operations on it alone, and, when it also goes
    somewhere else first (the model's output, a sum with another value, a layer of another kind), where."""
    derived = _descendants(start)
    layers, seen, frontier = set(), {start}, [start]
    while frontier:
        for user in frontier.pop().users:
            if user in seen or _shape_query(user):
                continue
            seen.add(user)
            if user.op == "output":
                return layers, "reaches the model's output without passing a Linear or Conv layer"
            if user.op == "call_module":
                module = modules[user.target]
                if isinstance(module, PRUNABLE_LAYERS):
                    layers.add(user.target)
                    continue
                if not isinstance(module, _PER_VALUE + (_DropoutNd,)) and any(True for _ in module.parameters()):
                    return layers, f"goes into `{user.target}`, a {type(module).__name__}, not a Linear or Conv layer"
            others = [arg for arg in user.all_input_nodes
                      if arg not in derived and arg.op != "get_attr" and not _shape_query(arg)]
            if others:
                return layers, (f"is combined with `{others[0].name}` in `{user.name}` before it reaches a Linear or "
                                "Conv layer")
            frontier.append(user)
    return layers, None


def feeding_layers(model: nn.Module) -> tuple[dict[str, str], list[str]]:
    """{dropout module: the one Linear or Conv layer its output feeds}, and what keeps the adjustment from applying
    to the model (no dropout, no graph, a dropout without exactly one such layer, functional dropout), each a
    sentence."""
    dropouts = [name for name, module in model.named_modules() if isinstance(module, _DropoutNd)]
    if not dropouts:
        return {}, ["the model has no dropout module (nn.Dropout, Dropout1d/2d/3d, AlphaDropout): there is no ratio "
                    "to adjust (mlp and lenet_300_100 take `model.args.dropout`)"]
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # data-dependent control flow, unsupported Python in the forward pass
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return {}, [f"torch.fx cannot trace the model ({type(error).__name__}: {first}), and the layer each dropout "
                    "feeds is read from its graph"]
    modules = dict(model.named_modules())
    fed: dict[str, set[str]] = {name: set() for name in dropouts}
    called, problems = set(), []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _FUNCTIONAL:
            problems.append(f"the forward pass calls {node.target.__name__}() directly (`{node.name}`): only dropout "
                            "modules have a ratio that can be adjusted")
        if node.op == "call_module" and isinstance(modules[node.target], _DropoutNd):
            layers, elsewhere = _fed_layers(node, modules)
            fed[node.target] |= layers
            called.add(node.target)
            if elsewhere:
                problems.append(f"`{node.target}` {elsewhere}")
    for name, layers in fed.items():
        if name not in called:
            problems.append(f"`{name}` is never called in the forward pass")
        elif not layers and not any(problem.startswith(f"`{name}` ") for problem in problems):
            problems.append(f"`{name}` feeds no Linear or Conv layer (its output is not used)")
        elif len(layers) > 1:
            problems.append(f"`{name}` feeds several layers ({', '.join(sorted(layers))}), each with its own kept "
                            "fraction")
    return {name: layers.pop() for name, layers in fed.items() if len(layers) == 1}, problems


@torch.no_grad()
def adjusted_ratios(model: nn.Module, adjust: str, feeds: dict[str, str]) -> dict[str, dict]:
    """Per dropout: its ratio before and after, the layer it feeds and that layer's kept fraction (nonzero weights as
    the forward pass sees them, masks applied, over the layer's weights as it now is)."""
    weights, modules, ratios = named_tensors(model), dict(model.named_modules()), {}
    for name, layer in feeds.items():
        weight = weights[f"{layer}.weight"]
        kept = int(torch.count_nonzero(weight)) / weight.numel()
        before = float(modules[name].p)
        ratios[name] = {"before": before, "after": ADJUSTMENTS[adjust](before, kept), "layer": layer, "kept": kept}
    return ratios


@contextlib.contextmanager
def adjusted_dropout(stage: str, model: nn.Module, spec) -> Iterator[dict]:
    """For the length of the block (one fit) every dropout of `model` trains at its adjusted ratio, computed from the
    model as it is now; the original ratios come back after, so the model handed on (and any rebuilt from the
    recipe) has the ratios its spec gives. Yields the fit's metrics of it: `{"dropout": ratios}`, or {} without
    `spec` (the stage's `dropout` field)."""
    if spec is None:
        yield {}
        return
    feeds, problems = feeding_layers(model)
    if problems:
        raise StageError(stage, "the dropout adjustment cannot apply: " + "; ".join(problems), HINT)
    ratios = adjusted_ratios(model, spec.adjust, feeds)
    modules = dict(model.named_modules())
    try:
        for name, ratio in ratios.items():
            modules[name].p = ratio["after"]
        yield {"dropout": ratios}
    finally:
        for name, ratio in ratios.items():
            modules[name].p = ratio["before"]
