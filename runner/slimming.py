"""Structured pruning: rank neurons/channels by norm, remove them physically, fix up the layers after them."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from runner import pruning
from runner.compress import channels  # also registers the `channels` transform that artifacts replay
from runner.errors import StageError
from runner.measure import named_tensors, paired_latency_ms, parameter_stats, serialized_bytes
from runner.transforms import TRANSFORMS, record

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.ELU, nn.Identity,
               nn.Dropout, nn.Dropout1d, nn.Dropout2d)
POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)


class Unsupported(ValueError):
    """The model is not a chain whose dependencies we can follow; slimming it could give a wrong model."""


def chain(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model as an ordered list of leaf layers; only sequential models are understood."""
    if not isinstance(model, nn.Sequential):
        raise Unsupported(f"the model is a `{type(model).__name__}`, not an nn.Sequential chain")
    leaves = []
    for name, module in model.named_children():
        if isinstance(module, nn.Sequential):
            leaves += [(f"{name}.{sub}", leaf) for sub, leaf in chain(module)]
            continue
        if isinstance(module, WEIGHTED) and getattr(module, "groups", 1) != 1:
            raise Unsupported(f"`{name}` is a grouped convolution")
        if not isinstance(module, WEIGHTED + NORMS + ELEMENTWISE + POOLS + (nn.Flatten,)):
            raise Unsupported(f"`{name}` is a `{type(module).__name__}`, whose channel dependencies are not followed")
        if isinstance(module, POOLS) and module.padding not in (0, (0,), (0, 0)):
            raise Unsupported(f"`{name}` pools with padding")
        leaves.append((name, module))
    return leaves


def _stored(module: nn.Module, attr: str) -> torch.Tensor | None:
    """The tensor an optimizer updates: the parametrization's `original`, or the plain parameter."""
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr].original
    return getattr(module, attr)


def _mask(module: nn.Module, attr: str) -> torch.Tensor | None:
    if not parametrize.is_parametrized(module, attr):
        return None
    return next(p.mask for p in module.parametrizations[attr] if isinstance(p, pruning.Mask))


def _resized(module: nn.Module, keep_out: torch.Tensor | None, keep_in: torch.Tensor | None) -> nn.Module:
    """A copy of a Linear/Conv/BatchNorm with only the kept outputs and inputs; masks are sliced along."""
    def cut(tensor: torch.Tensor, is_weight: bool) -> torch.Tensor:
        if keep_out is not None:
            tensor = tensor[keep_out]
        if keep_in is not None and is_weight:
            tensor = tensor[:, keep_in]
        return tensor.detach().clone()

    weight = cut(_stored(module, "weight"), isinstance(module, WEIGHTED))
    # A parametrized module's class is a generated subclass of the layer's own class.
    layer_class = type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)
    if isinstance(module, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
    elif isinstance(module, WEIGHTED):
        new = layer_class(weight.shape[1], weight.shape[0], module.kernel_size, stride=module.stride,
                           padding=module.padding, dilation=module.dilation, bias=module.bias is not None,
                           padding_mode=module.padding_mode)
    else:
        new = layer_class(weight.shape[0], eps=module.eps, momentum=module.momentum, affine=module.affine,
                           track_running_stats=module.track_running_stats)
        for buffer in ("running_mean", "running_var"):
            setattr(new, buffer, cut(getattr(module, buffer), False))
        new.num_batches_tracked = module.num_batches_tracked.clone()
    for attr in ("weight", "bias"):
        stored = _stored(module, attr)
        if stored is None:
            continue
        with torch.no_grad():
            getattr(new, attr).copy_(cut(stored, attr == "weight" and isinstance(module, WEIGHTED)))
        mask = _mask(module, attr)
        if mask is not None:
            mask = cut(mask, attr == "weight" and isinstance(module, WEIGHTED))
            parametrize.register_parametrization(new, attr, pruning.Mask(mask.shape))
            new.parametrizations[attr][0].mask.copy_(mask)
    return new.train(module.training)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _consumer(layers: list[tuple[str, nn.Module]], index: int) -> tuple[list[tuple[str, nn.Module]], int]:
    """The layers between layers[index] and the next weighted layer, and that layer's index."""
    for j in range(index + 1, len(layers)):
        if isinstance(layers[j][1], WEIGHTED):
            return layers[index + 1:j], j
    raise Unsupported(f"`{layers[index][0]}` feeds the model's output; its neurons are the outputs")


@torch.no_grad()
def _removed_value(between: list[tuple[str, nn.Module]], channels: int, conv: bool) -> torch.Tensor:
    """What a removed neuron still sends on: its pre-activation is 0, after BatchNorm and the activation
    it is a constant per channel (sigmoid(0) = 0.5, BN's shift). Pools and dropout (eval) keep constants."""
    value = torch.zeros(1, channels, *((1, 1) if conv else ()))
    for _, module in between:
        if isinstance(module, NORMS + ELEMENTWISE):
            value = module.eval()(value) if isinstance(module, NORMS) else module(value)
    return value.flatten()


def slim(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    """Remove every output neuron/channel of the named layers not in `keep` (sorted indices), fixing the
    following BatchNorm and the next layer's inputs. The removed neurons' constant output is folded into
    the next layer's bias, so the slimmed model computes what the model with those rows zeroed computes."""
    training = model.training
    model.eval()  # the folded constants use BatchNorm's running statistics
    layers = chain(model)
    index_of = {name: i for i, (name, _) in enumerate(layers)}
    for name, kept in keep.items():
        i = index_of[name]
        layer = model.get_submodule(name)
        removed = torch.ones(layer.out_channels if isinstance(layer, WEIGHTED[1:]) else layer.out_features,
                             dtype=torch.bool)
        removed[kept] = False
        between, j = _consumer(layers, i)
        next_name, following = layers[j][0], model.get_submodule(layers[j][0])
        constant = _removed_value(between, len(removed), not isinstance(layer, nn.Linear))
        # Flatten between a conv and a Linear: channel c owns a block of in_features // channels inputs.
        spread = following.in_features // len(removed) if isinstance(following, nn.Linear) else 1
        columns = removed.repeat_interleave(spread)
        carried = constant.repeat_interleave(spread)[columns]
        if bool(carried.any()):
            weight = following.weight.detach()  # as the forward pass sees it (masks applied)
            pads = isinstance(following, WEIGHTED[1:]) and following.padding not in (0, (0,), (0, 0))
            if following.bias is None or pads:
                raise Unsupported(f"removed neurons of `{name}` output a nonzero constant that `{next_name}` "
                                  "cannot absorb (it has no bias, or pads its input)")
            spatial = tuple(range(2, weight.dim()))
            summed = weight[:, columns].sum(dim=spatial) if spatial else weight[:, columns]
            with torch.no_grad():
                _stored(following, "bias").add_(summed @ carried)
        _replace(model, name, _resized(layer, kept, None))
        for norm_name, norm in between:
            if isinstance(norm, NORMS):
                _replace(model, norm_name, _resized(norm, kept, None))
        _replace(model, next_name, _resized(following, None, (~columns).nonzero().flatten()))
        layers = chain(model)
    return model.train(training)


@TRANSFORMS.register("slim")
def _replay_slim(model: nn.Module, widths: dict[str, int]) -> nn.Module:
    """Shapes only: the state dict loaded afterwards brings the values."""
    return slim(model, {name: torch.arange(width) for name, width in widths.items()})


def _neuron_scores(weight: torch.Tensor, method: str, norm: str, generator: torch.Generator) -> torch.Tensor:
    if method == "random":
        return torch.rand(weight.shape[0], generator=generator)
    rows = weight.detach().flatten(1)
    return rows.abs().sum(dim=1) if norm == "l1" else rows.pow(2).sum(dim=1).sqrt()


def _targets(spec, layers: list[tuple[str, nn.Module]]) -> dict[str, float]:
    """Layer name -> fraction of its neurons to remove; every weighted layer but the output one by default."""
    weighted = [name for name, module in layers if isinstance(module, WEIGHTED)]
    prunable, output = [f"{name}.weight" for name in weighted[:-1]], f"{weighted[-1]}.weight"
    for pattern in spec.sparsity if isinstance(spec.sparsity, dict) else []:
        if pruning.unmatched_patterns([pattern], prunable):
            is_output = not pruning.unmatched_patterns([pattern], [output])
            hint = (f"`{weighted[-1]}` produces the model's outputs" if is_output
                    else "layers: " + ", ".join(weighted[:-1]))
            raise StageError(spec.name, f"`{pattern}` matches no layer whose neurons can be removed", hint)
    return {name.rpartition(".")[0]: value for name, value in pruning.layer_targets(prunable, spec.sparsity).items()}


def _keep(scores: torch.Tensor, target: float, spec, layer: str) -> torch.Tensor:
    """Sorted indices of the neurons that stay: the largest scores (ties keep the lower index)."""
    count = round(target * len(scores))
    if count >= len(scores):
        raise StageError(spec.name, f"sparsity {target} would remove every neuron of `{layer}` "
                                    f"({count} of {len(scores)})", "lower its target")
    return torch.sort(torch.sort(scores, descending=True, stable=True).indices[:len(scores) - count]).values


def _slim_chain(spec, model: nn.Module, layers, generator: torch.Generator) -> tuple[nn.Module, nn.Module, dict]:
    """(masked copy, slimmed model, widths before): the removed rows are zeroed in the masked copy."""
    weights = named_tensors(model)
    keep, widths_before = {}, {}
    for name, target in _targets(spec, layers).items():
        scores = _neuron_scores(weights[f"{name}.weight"], spec.method, spec.norm or "l1", generator)
        keep[name], widths_before[name] = _keep(scores, target, spec, name), len(scores)
    masked = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, kept in keep.items():
            layer = masked.get_submodule(name)
            dropped = torch.ones(widths_before[name], dtype=torch.bool)
            dropped[kept] = False
            for attr in ("weight", "bias"):
                if _stored(layer, attr) is not None:
                    _stored(layer, attr)[dropped] = 0
    try:
        slimmed = slim(model, keep)
    except Unsupported as err:
        raise StageError(spec.name, f"structured pruning cannot slim this model: {err}") from None
    record(slimmed, "slim", widths={name: len(kept) for name, kept in keep.items()})
    return masked, slimmed, widths_before


def _group_targets(spec, model: nn.Module, groups: list[channels.Group]) -> dict[str, float]:
    """Root layer name -> fraction of its group's channels to remove; every group by default."""
    roots = [group.root for group in groups]
    prunable = [f"{root}.weight" for root in roots]
    coupled = {writer: group.root for group in groups for writer in group.writers[1:]}
    writers = {writer for group in groups for writer in group.writers}
    outputs = [name for name, module in model.named_modules() if isinstance(module, channels.LAYERS)
               and name not in writers]
    for pattern in spec.sparsity if isinstance(spec.sparsity, dict) else []:
        if not pruning.unmatched_patterns([pattern], prunable):
            continue
        hit = next((name for name in coupled if not pruning.unmatched_patterns([pattern], [f"{name}.weight"])), None)
        if hit is not None:
            raise StageError(spec.name, f"`{pattern}` names `{hit}`, whose output channels are coupled to those of "
                                        f"`{coupled[hit]}` (they are added together): they are removed as one group",
                             f"target the group by its first layer, `{coupled[hit]}`")
        hit = next((name for name in outputs if not pruning.unmatched_patterns([pattern], [f"{name}.weight"])), None)
        hint = f"`{hit}` produces the model's outputs" if hit is not None else "layers: " + ", ".join(roots)
        raise StageError(spec.name, f"`{pattern}` matches no layer whose channels can be removed", hint)
    return {name.rpartition(".")[0]: value for name, value in pruning.layer_targets(prunable, spec.sparsity).items()}


def _slim_graph(spec, model: nn.Module, example: torch.Tensor,
                generator: torch.Generator) -> tuple[nn.Module, nn.Module, dict, dict]:
    """(masked copy, slimmed model, widths before, coupled layers) for a network with branches: channels
    go by dependency group; the masked copy reads zeros where the slimmed model has nothing."""
    graph = channels.dependency_graph(model, example)
    groups = {group.root: group for group in channels.groups(model, graph)}
    if not groups:
        raise channels.Unsupported("no layer has output channels that another layer reads")
    removed, widths_before = {}, {}
    for root, target in _group_targets(spec, model, list(groups.values())).items():
        group = groups[root]
        scores = (torch.rand(group.width, generator=generator) if spec.method == "random"
                  else channels.scores(model, group, spec.norm or "l1"))
        dropped = torch.ones(group.width, dtype=torch.bool)
        dropped[_keep(scores, target, spec, root)] = False
        removed[root], widths_before[root] = dropped.nonzero().flatten().tolist(), group.width
    masked = channels.zeroed_reads(model, graph, removed).eval()
    slimmed = channels.remove(model, graph, removed)
    channels.record_removal(slimmed, removed, example)
    coupled = {root: groups[root].writers[1:] for root in removed if len(groups[root].writers) > 1}
    return masked, slimmed, widths_before, coupled


def _widths(model: nn.Module, names) -> dict[str, int]:
    """Output neurons/channels each named layer has now: measured on the slimmed model, not assumed."""
    layers = {name: model.get_submodule(name) for name in names}
    return {name: layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            for name, layer in layers.items()}


def check_supported(model: nn.Module, example: torch.Tensor) -> str | None:
    """Why neurons or channels cannot be removed from `model`, or None when they can (a trace, no pruning)."""
    try:
        chain(model)
        return None
    except Unsupported:
        pass
    try:
        if not channels.groups(model, channels.dependency_graph(model, example)):
            return "no layer has output channels that another layer reads"
    except channels.Unsupported as err:
        return str(err)
    return None


def prune_neurons(spec, model: nn.Module, example: torch.Tensor, generator: torch.Generator) -> dict:
    """Rank, check, slim, prove parity with the masked model, and measure what slimming bought.

    Sequential chains are slimmed here (removed neurons' constant outputs folded into the next bias);
    any other network goes through Torch-Pruning's dependency graph (runner.compress.channels)."""
    training = model.training  # handed on as it came: a following fine-tune must not train in eval mode
    before = {"params_total_before": parameter_stats(model)["params_total"],
              "model_bytes_before": serialized_bytes(model)}
    coupled = None
    try:
        masked, slimmed, widths_before = _slim_chain(spec, model, chain(model), generator)
    except Unsupported:
        try:
            masked, slimmed, widths_before, coupled = _slim_graph(spec, model, example, generator)
        except channels.Unsupported as err:
            raise StageError(spec.name, f"structured pruning cannot follow this model: {err}",
                             "neurons and channels are removed in sequential chains and in networks Torch-Pruning "
                             "can trace; otherwise use `granularity: weights`") from None
    slimmed.eval()
    with torch.no_grad():
        got, expected = slimmed(example), masked(example)
        difference = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
    if difference > spec.parity_tolerance:
        raise StageError(spec.name, f"the slimmed model's outputs differ from the masked model's by {difference:.3g} "
                                    f"(tolerance {spec.parity_tolerance})", "this is a bug in nnopt; please report it")
    metrics = {"widths_before": widths_before, "widths_after": _widths(slimmed, widths_before),
               "parity_max_abs_diff": difference, **before, "model_bytes": serialized_bytes(slimmed)}
    if coupled:
        metrics["coupled_layers"] = coupled  # removed with their group's root, across residual additions
    metrics.update(parameter_stats(slimmed))
    # One intra-op thread: on a shared machine a spinning thread pool swamps what slimming saves.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch in (1, len(example)):
            dense, slimmed_ms = paired_latency_ms([masked, slimmed], example[:batch], repeats=30, warmup=5)
            metrics.update({f"latency_ms_b{batch}_before": dense, f"latency_ms_b{batch}": slimmed_ms,
                            f"latency_ratio_b{batch}": round(slimmed_ms / dense, 3)})  # slimmed / dense
    finally:
        torch.set_num_threads(threads)
    metrics["latency_threads"] = 1
    return {"model": slimmed.train(training), **metrics}
