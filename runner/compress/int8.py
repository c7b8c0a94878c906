"""Int8 quantization with real fbgemm kernels on CPU (x86 engine): dynamic, static, QAT, and replay.

Two ways to capture the model, one qconfig:
- nn.Sequential chains (the MLPs, LeNets) keep torch.ao's eager path (QuantWrapper, fused neighbours):
  FX gives LeNet-300-100 bit for bit but moves LeNet-5's and the BatchNorm MLPs' outputs in the last
  bits (observers sit elsewhere), which would change measured figures for nothing.
- Any other graph (residual additions: ResNet, MobileNet) goes through FX graph mode
  (prepare_fx / prepare_qat_fx / convert_fx): `+` becomes quantized::add, and every activation scale
  is a buffer of the traced module, so its state dict carries every int8 value.
Both reload from data alone: replay traces and converts a freshly built model the same way, then a
strict load_state_dict (torch.load(weights_only=True) reads int8 tensors) restores the values.

Why not PT2E: its output is a quantize/dequantize graph around float kernels, only fast once
compiled by inductor, and it reloads only through torch.export archives. torch 2.13+ marks
torch.ao.quantization deprecated in favour of torchao, which is not installed here.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from runner import pruning
from runner.transforms import TRANSFORMS, inherit, record

warnings.filterwarnings("ignore", ".*torch.ao.quantization is deprecated.*")
warnings.filterwarnings("ignore", ".*quantized tensor creation functions.*")
warnings.filterwarnings("ignore", ".*must run observer before calling calculate_qparams.*")
warnings.filterwarnings("ignore", ".*TypedStorage is deprecated.*")
warnings.filterwarnings("ignore", ".*Passing a QConfig to.*|.*QConfigMapping.*deprecated.*")

import torch.ao.nn.intrinsic as nni  # noqa: E402
import torch.ao.nn.intrinsic.qat as nniqat  # noqa: E402
import torch.ao.quantization as tq  # noqa: E402
from torch.ao.quantization import quantize_fx  # noqa: E402

ENGINE = "x86"  # fbgemm kernels with AVX2/AVX512 dispatch
# 7-bit activations (torch's `reduce_range`): fbgemm's u8*s8 products are summed in int16 pairs,
# which can saturate with full 8-bit activations on CPUs without VNNI.
_ACTIVATION_MAX = 127

# Consecutive children of an nn.Sequential that torch folds into one module (BN into the conv or
# linear weights, ReLU into the output requantization). Longest patterns first.
_FUSABLE = [
    (nn.Conv2d, nn.BatchNorm2d, nn.ReLU), (nn.Conv1d, nn.BatchNorm1d, nn.ReLU),
    (nn.Conv2d, nn.BatchNorm2d), (nn.Conv1d, nn.BatchNorm1d), (nn.Linear, nn.BatchNorm1d),
    (nn.Conv2d, nn.ReLU), (nn.Conv1d, nn.ReLU), (nn.Linear, nn.ReLU),
]
# Leaf layers the static int8 path can run (fused groups are accepted as a whole).
_STATIC_LEAVES = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh, nn.MaxPool1d, nn.MaxPool2d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout,
    nn.Identity, nn.BatchNorm2d, nn.Sequential,  # an empty Sequential is an identity
)
_FUSED = (nni._FusedModule,)


class UnsupportedModel(Exception):
    """The model has layers or operations the chosen int8 method cannot run; the message names them."""


def bake_parametrizations(model: nn.Module) -> nn.Module:
    """Replace masks (and other parametrizations) by the tensors they produce: a pruned weight keeps its zeros.

    torch's removal deletes the property from the module's parametrized class, a class that
    copy.deepcopy shares with the original; each module first gets a class of its own, so baking
    a copy leaves the original model intact.
    """
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__,
                                    {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")})
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    return model


def fusable_groups(model: nn.Module) -> list[list[str]]:
    """Names of fusable neighbours inside nn.Sequential containers (where child order is execution order)."""
    groups = []
    for prefix, container in model.named_modules():
        if not isinstance(container, nn.Sequential):
            continue
        children = list(container.named_children())
        i = 0
        while i < len(children):
            for pattern in _FUSABLE:
                window = children[i:i + len(pattern)]
                if len(window) == len(pattern) and all(type(m) is t for (_, m), t in zip(window, pattern)):
                    groups.append([f"{prefix}.{name}" if prefix else name for name, _ in window])
                    i += len(pattern)
                    break
            else:
                i += 1
    return groups


def unsupported_layers(model: nn.Module) -> list[str]:
    """Leaf layers that static int8 / QAT cannot run, as `name (Type)`."""
    found = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, _FUSED):
                continue
            if any(True for _ in child.children()):
                walk(child, path)
            elif not isinstance(child, _STATIC_LEAVES):
                found.append(f"{path} ({type(child).__name__})")

    walk(model, "")
    return found


def _qconfig(weights: str, observer: str, qat: bool) -> tq.QConfig:
    """Symmetric int8 weights (zero point 0, so a pruned zero stays exactly zero) and uint8 activations."""
    if qat:
        weight = tq.default_per_channel_weight_fake_quant if weights == "per_channel" else tq.default_weight_fake_quant
        activation = tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0,
                                               quant_max=_ACTIVATION_MAX, dtype=torch.quint8)
        return tq.QConfig(activation=activation, weight=weight)
    weight = tq.default_per_channel_weight_observer if weights == "per_channel" else tq.default_weight_observer
    activation = (tq.HistogramObserver if observer == "histogram" else tq.MinMaxObserver).with_args(
        quant_min=0, quant_max=_ACTIVATION_MAX, dtype=torch.quint8)
    return tq.QConfig(activation=activation, weight=weight)


def is_chain(model: nn.Module) -> bool:
    """True when every module with children is an nn.Sequential: its forward is its children in order,
    which is all the eager path understands. Anything else (a residual `+`) is traced by FX."""
    return all(isinstance(module, nn.Sequential) for module in model.modules() if any(True for _ in module.children()))


def _graph_mapping(weights: str, observer: str, qat: bool, skip: tuple[str, ...] = ()) -> tq.QConfigMapping:
    """Our qconfig everywhere, except the ops whose int8 output range torch fixes (sigmoid, tanh, softmax),
    and none for the layers in `skip`: FX leaves them in float with a dequantize before and a quantize after."""
    defaults = tq.get_default_qat_qconfig_mapping if qat else tq.get_default_qconfig_mapping
    mapping = defaults(ENGINE).set_global(_qconfig(weights, observer, qat))
    for name in skip:
        mapping.set_module_name(name, None)
    return mapping


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _prepare_graph(model: nn.Module, example_shape: list[int], *, qat: bool, weights: str, observer: str,
                   skip: tuple[str, ...] = ()) -> nn.Module:
    model.train(qat)
    prepare = quantize_fx.prepare_qat_fx if qat else quantize_fx.prepare_fx
    try:
        return prepare(model, _graph_mapping(weights, observer, qat, skip), (torch.zeros(example_shape),))
    except Exception as err:  # noqa: BLE001 - FX fails in many ways on code it cannot trace; the user needs why
        raise UnsupportedModel(f"FX cannot trace the model ({type(err).__name__}: {_first_line(err)}); "
                               "a forward() that branches on tensor values cannot be quantized statically") from None


def _prepare_eager(model: nn.Module, *, qat: bool, weights: str, observer: str,
                   groups: list | None = None) -> tuple[nn.Module, list]:
    wrapped = tq.QuantWrapper(model)
    wrapped.train(qat)
    if groups is None:
        groups = [["module." + name for name in group] for group in fusable_groups(wrapped.module)]
    if groups:
        wrapped = (tq.fuse_modules_qat if qat else tq.fuse_modules)(wrapped, groups)
    bad = unsupported_layers(wrapped.module)  # after fusion: a BatchNorm1d that followed a Linear is folded away
    if bad:
        raise UnsupportedModel("int8 kernels exist for none of these layers: " + ", ".join(bad))
    wrapped.qconfig = _qconfig(weights, observer, qat)
    return (tq.prepare_qat if qat else tq.prepare)(wrapped), groups


def quantizable_layers(model: nn.Module, method: str) -> list[str]:
    """Names of the layers `method` stores in int8, which `skip` may leave in float: Linear (and LSTM) for
    dynamic int8, Linear and Conv for static int8."""
    kinds = (nn.Linear, nn.LSTM) if method == "dynamic_int8" else (nn.Linear, nn.Conv1d, nn.Conv2d)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def prepare(model: nn.Module, *, qat: bool, weights: str, observer: str = "minmax",
            example: torch.Tensor | None = None, skip: tuple[str, ...] = ()) -> tuple[nn.Module, dict]:
    """A copy of `model` fused, with observers (or fake quantizers) inserted, and its layout: how replay
    rebuilds the same module tree (`groups` fused on the eager path; for FX, the shape of `example`, an
    input batch that only graphs other than chains need, and the layers left in float).

    Layers in `skip` stay in float (mixed precision). Only FX places the dequantize/quantize pairs around
    them, so a chain with `skip` is traced too.

    For QAT, pruning masks move onto the fake-quantized weights, so the fine-tune keeps the zeros.
    """
    torch.backends.quantized.engine = ENGINE
    masks = {name: pruning.current_mask(model, name) for name in pruning.masked_names(model)}
    baked = bake_parametrizations(copy.deepcopy(model))
    if is_chain(baked) and not skip:  # baked: a masked layer's parametrizations are children too
        prepared, groups = _prepare_eager(baked, qat=qat, weights=weights, observer=observer)
        layout, prefix = {"groups": groups}, "module."
    elif example is None:
        raise ValueError("quantizing a graph other than an nn.Sequential chain, or leaving layers in float, traces "
                         "it: pass an example input")
    else:
        layout, prefix = {"graph": "fx", "example_shape": [1, *example.shape[1:]]}, ""
        if skip:
            layout["skip"] = list(skip)
        prepared = _prepare_graph(baked, layout["example_shape"], qat=qat, weights=weights, observer=observer,
                                  skip=tuple(skip))
    if qat:
        for name, mask in masks.items():  # the pruning masks move onto the fake-quantized layers
            module_name, _, attr = name.rpartition(".")
            keep = pruning.Mask(mask.shape)
            keep.mask.copy_(mask)
            parametrize.register_parametrization(prepared.get_submodule(prefix + module_name), attr, keep)
    return prepared, layout


def _convert(prepared: nn.Module) -> nn.Module:
    if isinstance(prepared, torch.fx.GraphModule):
        return quantize_fx.convert_fx(prepared.eval())
    return tq.convert(prepared.eval())


def float_layers(quantized: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """Conv/Linear layers that kept float weights though not in `skip` (FX leaves a layer float when no int8
    kernel takes it); a skipped layer fused with its neighbours is the fused module's first child."""
    return [f"{name} ({type(module).__name__})" for name, module in quantized.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d))
            and module.weight.is_floating_point() and name not in skip and name.removesuffix(".0") not in skip]


def convert(prepared: nn.Module, example: torch.Tensor, skip: tuple[str, ...] = ()) -> nn.Module:
    """Swap observed float modules for int8 ones (all but those in `skip`), then run `example` to prove every
    op has an int8 kernel."""
    quantized = _convert(bake_parametrizations(copy.deepcopy(prepared)))
    left_float = float_layers(quantized, tuple(skip))
    if left_float:
        raise UnsupportedModel("these layers would keep float weights: " + ", ".join(left_float))
    try:
        with torch.inference_mode():
            quantized(example)
    except (NotImplementedError, RuntimeError) as err:
        raise UnsupportedModel(f"the int8 model cannot run its forward pass: {_first_line(err)}") from None
    return quantized


def check_supported(model: nn.Module, example: torch.Tensor, method: str) -> str | None:
    """Why `method` cannot quantize `model`, or None when it can: the whole prepare and convert on a copy
    with uncalibrated observers (a few forward passes; cheap enough for `validate` on a freshly built model)."""
    if method not in ("static_int8", "qat"):
        return None  # dynamic int8 swaps Linear/LSTM layers and leaves every other op in float
    try:
        prepared, _ = prepare(model, qat=method == "qat", weights="per_tensor", example=example)
        convert(prepared, example[:1])
    except UnsupportedModel as err:
        return str(err)
    return None


def _dynamic_layers(model: nn.Module, skip: tuple[str, ...]):
    """quantize_dynamic's qconfig_spec: every Linear and LSTM, or all those by name but the ones in `skip`."""
    if not skip:
        return {nn.Linear, nn.LSTM}
    return {name: tq.default_dynamic_qconfig for name in quantizable_layers(model, "dynamic_int8") if name not in skip}


def dynamic_int8(model: nn.Module, skip: tuple[str, ...] = ()) -> nn.Module:
    """Linear and LSTM weights (all but those in `skip`) become int8 (per-tensor symmetric); activations are
    quantized on the fly."""
    torch.backends.quantized.engine = ENGINE
    baked = bake_parametrizations(copy.deepcopy(model)).eval()
    quantized = tq.quantize_dynamic(baked, _dynamic_layers(baked, tuple(skip)), dtype=torch.qint8)
    inherit(quantized, model)
    record(quantized, "int8", method="dynamic_int8", **({"skip": list(skip)} if skip else {}))
    return quantized


def finish_static(quantized: nn.Module, float_model: nn.Module, *, method: str, weights: str, observer: str,
                  layout: dict) -> nn.Module:
    """Note on the converted model how to rebuild its module tree from the float model."""
    inherit(quantized, float_model)
    record(quantized, "int8", method=method, weights=weights, observer=observer, **layout)
    return quantized


def freeze_observers(prepared: nn.Module) -> None:
    prepared.apply(tq.disable_observer)


def resume_observers(prepared: nn.Module) -> None:
    prepared.apply(tq.enable_observer)


def freeze_batchnorm(prepared: nn.Module) -> None:
    # torch's nniqat.freeze_bn_stats knows only the Conv+BatchNorm modules; fused Linear+BatchNorm
    # (LinearBn1d, the MLPs' case) has the same method and was silently left updating its statistics.
    for module in prepared.modules():
        if isinstance(module, nni._FusedModule) and callable(getattr(module, "freeze_bn_stats", None)):
            module.freeze_bn_stats()


@TRANSFORMS.register("int8")
def _replay(model: nn.Module, method: str, weights: str = "per_tensor", observer: str = "minmax",
            groups: list | None = None, graph: str = "eager", example_shape: list[int] | None = None,
            skip: list[str] | None = None) -> nn.Module:
    """The same module tree, with placeholder scales: load_state_dict then restores every int8 value."""
    torch.backends.quantized.engine = ENGINE
    model = bake_parametrizations(model)
    skip = tuple(skip or ())
    if method == "dynamic_int8":
        return tq.quantize_dynamic(model.eval(), _dynamic_layers(model, skip), dtype=torch.qint8)
    qat = method == "qat"
    if graph == "fx":
        prepared = _prepare_graph(model, example_shape, qat=qat, weights=weights, observer=observer, skip=skip)
    else:
        prepared, _ = _prepare_eager(model, qat=qat, weights=weights, observer=observer, groups=groups or [])
    return _convert(prepared)
