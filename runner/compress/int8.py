"""Int8 quantization on torch.ao's eager path (x86 backend, fbgemm kernels): dynamic, static, QAT, and replay.

Why this API: torch 2.13 marks torch.ao.quantization deprecated in favour of torchao and PT2E, but
torchao is not installed here and PT2E's output is a q/dq graph that is only fast once compiled by
inductor and reloads only through torch.export archives. The eager path runs real int8 kernels
without compilation and its state dict (int8 tensors in packed params) loads with
torch.load(weights_only=True), so quantized models reload through runner.modelio like any other.
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

import torch.ao.nn.intrinsic as nni  # noqa: E402
import torch.ao.nn.intrinsic.qat as nniqat  # noqa: E402
import torch.ao.quantization as tq  # noqa: E402

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


def prepare(model: nn.Module, *, qat: bool, weights: str, observer: str = "minmax") -> tuple[nn.Module, list]:
    """A copy of `model` wrapped in quant/dequant stubs, fused, with observers (or fake quantizers) inserted.

    For QAT, pruning masks move onto the fake-quantized weights, so the fine-tune keeps the zeros.
    """
    torch.backends.quantized.engine = ENGINE
    masks = {name: pruning.current_mask(model, name) for name in pruning.masked_names(model)}
    wrapped = tq.QuantWrapper(bake_parametrizations(copy.deepcopy(model)))
    groups = [["module." + name for name in group] for group in fusable_groups(wrapped.module)]
    if qat:
        wrapped.train()
        if groups:
            wrapped = tq.fuse_modules_qat(wrapped, groups)
    else:
        wrapped.eval()
        if groups:
            wrapped = tq.fuse_modules(wrapped, groups)
    bad = unsupported_layers(wrapped.module)  # after fusion: a BatchNorm1d that followed a Linear is folded away
    if bad:
        raise UnsupportedModel("int8 kernels exist for none of these layers: " + ", ".join(bad))
    wrapped.qconfig = _qconfig(weights, observer, qat)
    prepared = (tq.prepare_qat if qat else tq.prepare)(wrapped)
    if qat:
        for name, mask in masks.items():  # the pruning masks move onto the fake-quantized layers
            module_name, _, attr = name.rpartition(".")
            keep = pruning.Mask(mask.shape)
            keep.mask.copy_(mask)
            parametrize.register_parametrization(prepared.get_submodule("module." + module_name), attr, keep)
    return prepared, groups


def convert(prepared: nn.Module, example: torch.Tensor) -> nn.Module:
    """Swap observed float modules for int8 ones, then run `example` to prove every op has an int8 kernel."""
    quantized = tq.convert(bake_parametrizations(copy.deepcopy(prepared)).eval())
    try:
        with torch.inference_mode():
            quantized(example)
    except (NotImplementedError, RuntimeError) as err:
        first_line = str(err).strip().splitlines()[0]
        raise UnsupportedModel(f"the int8 model cannot run its forward pass: {first_line}") from None
    return quantized


def dynamic_int8(model: nn.Module) -> nn.Module:
    """Linear and LSTM weights become int8 (per-tensor symmetric); activations are quantized on the fly."""
    torch.backends.quantized.engine = ENGINE
    quantized = tq.quantize_dynamic(bake_parametrizations(copy.deepcopy(model)).eval(), {nn.Linear, nn.LSTM},
                                    dtype=torch.qint8)
    inherit(quantized, model)
    record(quantized, "int8", method="dynamic_int8")
    return quantized


def finish_static(quantized: nn.Module, float_model: nn.Module, *, method: str, weights: str, observer: str,
                  groups: list) -> nn.Module:
    """Note on the converted model how to rebuild its module tree from the float model."""
    inherit(quantized, float_model)
    record(quantized, "int8", method=method, weights=weights, observer=observer, groups=groups)
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
            groups: list | None = None) -> nn.Module:
    """The same module tree, with placeholder scales: load_state_dict then restores every int8 value."""
    if method == "dynamic_int8":
        torch.backends.quantized.engine = ENGINE
        return tq.quantize_dynamic(bake_parametrizations(model).eval(), {nn.Linear, nn.LSTM}, dtype=torch.qint8)
    torch.backends.quantized.engine = ENGINE
    qat = method == "qat"
    wrapped = tq.QuantWrapper(bake_parametrizations(model))
    wrapped.train(qat)
    if groups:
        wrapped = (tq.fuse_modules_qat if qat else tq.fuse_modules)(wrapped, groups)
    wrapped.qconfig = _qconfig(weights, observer, qat)
    prepared = (tq.prepare_qat if qat else tq.prepare)(wrapped)
    return tq.convert(prepared.eval())
