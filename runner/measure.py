"""Measurements shared by stages and reports: accuracy, parameter counts, sparsity, size, latency."""

from __future__ import annotations

import inspect
import io
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


def unwrapped(model: nn.Module) -> nn.Module:
    """The user's model inside torch.ao's QuantWrapper (eager int8), so layer names stay `fc1.weight` across
    stages instead of becoming `module.fc1.weight` once quantized."""
    from torch.ao.quantization import QuantWrapper

    return model.module if isinstance(model, QuantWrapper) else model


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as the forward pass sees it (masks and other parametrizations applied), by its
    plain name (`fc1.weight`, never `fc1.parametrizations.weight.original`); differentiable."""
    out = {}
    for module_name, module in unwrapped(model).named_modules():
        if "parametrizations" in module_name.split("."):
            continue  # the stored `original`s: reported through their owner's parametrized name
        names = [name for name, _ in module.named_parameters(recurse=False)]
        if parametrize.is_parametrized(module):
            names += list(module.parametrizations.keys())
        for name in names:
            out[f"{module_name}.{name}" if module_name else name] = getattr(module, name)
        if inspect.ismethod(getattr(module, "weight", None)):  # an int8 layer: weight() and bias() unpack its int8 storage
            prefix = f"{module_name}." if module_name else ""
            out[prefix + "weight"] = module.weight().dequantize()
            bias = module.bias() if inspect.ismethod(getattr(module, "bias", None)) else None
            if bias is not None:
                out[prefix + "bias"] = bias.detach()
    return out


def named_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """named_tensors, detached: for counting and reporting."""
    return {name: tensor.detach() for name, tensor in named_tensors(model).items()}


def parameter_stats(model: nn.Module) -> dict:
    weights = named_weights(model)
    total = sum(w.numel() for w in weights.values())
    nonzero = sum(int(torch.count_nonzero(w)) for w in weights.values())
    return {
        "params_total": total,
        "params_nonzero": nonzero,
        "sparsity": round(1 - nonzero / total, 6) if total else 0.0,
        "compression_rate": round(total / nonzero, 3) if nonzero else None,
        "layer_sparsity": {name: round(1 - int(torch.count_nonzero(w)) / w.numel(), 6)
                           for name, w in weights.items() if name.endswith("weight")},
        **({"layer_bits": bits} if (bits := layer_bits(model)) else {}),
    }


def layer_bits(model: nn.Module) -> dict[str, int]:
    """Bits per stored weight of every weight layer when some are held as integers (int8 modules: 8, the
    float ones left: 32); empty for a float model, whose every weight is fp32."""
    bits = {}
    for module_name, module in unwrapped(model).named_modules():
        weight = getattr(module, "weight", None)
        if inspect.ismethod(weight):  # an int8 layer packs its weight; weight() unpacks it as a quantized tensor
            bits[f"{module_name}.weight"] = weight().element_size() * 8
        elif isinstance(weight, torch.Tensor) and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            bits[f"{module_name}.weight"] = weight.element_size() * 8
    return bits if any(b < 32 for b in bits.values()) else {}


def serialized_bytes(model: nn.Module) -> int:
    """Size of the model's state dict as torch.save writes it (what `model.pt` holds)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def dense_fp32_bytes(model_spec) -> int:
    """Size of the dense fp32 artifact of the recipe's model: the reference every compression ratio divides."""
    from runner.models import build_model

    return serialized_bytes(build_model(model_spec))


@torch.inference_mode()
def accuracy(model: nn.Module, batches) -> dict:
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in batches:
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
        count += len(y)
    return {"loss": loss_sum / count, "acc": correct / count, "error": 1 - correct / count, "examples": count}


@torch.inference_mode()
def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int, warmup: int) -> float:
    """Median wall time of one forward pass, in milliseconds."""
    return paired_latency_ms([model], example, repeats, warmup)[0]


@torch.inference_mode()
def paired_latency_ms(models: list[nn.Module], example: torch.Tensor, repeats: int, warmup: int) -> list[float]:
    """Median forward time of each model, in milliseconds, the models taking turns on every repeat:
    a load change on a shared machine hits all of them alike, so their ratio stays fair."""
    for model in models:
        model.eval()
        for _ in range(warmup):
            model(example)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for model, spent in zip(models, times):
            start = time.perf_counter()
            model(example)
            spent.append(time.perf_counter() - start)
    return [round(statistics.median(spent) * 1e3, 4) for spent in times]
