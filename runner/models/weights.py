"""The trained weights a run starts from (`model.weights:`): a state dict file, a Lightning checkpoint or an
nnopt stage folder, read with weights_only=True and fitted onto the model with errors that name the keys."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# An nnopt stage folder: its weights and the structure they were saved from (runner.modelio).
STAGE_WEIGHTS, STAGE_STRUCTURE = "model.pt", "model.json"
SHOWN_KEYS = 5  # keys named in a message; the rest are counted


class WeightsError(Exception):
    """The weights cannot start this model; `field` is where in `model:` the user fixes it."""

    def __init__(self, message: str, hint: str | None = None, field: tuple = ("weights",)):
        self.message, self.hint, self.field = message, hint, field
        super().__init__(message)


@dataclass(frozen=True)
class Weights:
    state: dict[str, torch.Tensor]
    transforms: list[dict]  # restructurings a stage folder's model had (masks, slimming, int8): replayed first
    kind: str  # "state dict", "Lightning checkpoint", "stage folder"


def _names(keys) -> str:
    keys = list(keys)
    shown = ", ".join(f"`{k}`" for k in keys[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def spec_field(spec) -> tuple:
    """Where in a model spec its architecture is said: `args` when given, else the name, import or hub field."""
    return ("args",) if spec.args else (next(k for k in ("name", "import", "torchvision", "timm")
                                             if getattr(spec, k if k != "import" else "import_")),)


def class_count_problem(spec, outputs: int, num_classes: int) -> tuple[tuple, str, str] | None:
    """(field of the model spec, message, hint) when the model's outputs are not the data's classes, else None; the
    hint names what to change. Weights loaded strictly fix the output layer's size: the fix is a new classifier head
    (`num_classes` and `strict: false`), other weights, or other data. Otherwise the architecture's arguments
    decide it (with `strict: false` a head the weights do not fit is built from them)."""
    if outputs == num_classes:
        return None
    if spec.teaches:
        return _teacher_class_count_problem(spec, outputs, num_classes)
    message = f"the model outputs {outputs} classes, the data has {num_classes}"
    if spec.weights is not None and spec.strict:
        return (("weights",), message + " (with these weights)",
                f"these weights end in {outputs} outputs: to train a new classifier head from them, set `args: "
                f"{{num_classes: {num_classes}}}` and `strict: false`; or give weights trained on {num_classes} "
                f"classes, or data with {outputs}")
    field = ("args", "num_classes") if "num_classes" in spec.args else spec_field(spec)
    return (field, message, f"set `model.args.num_classes: {num_classes}` (or the argument the model takes for its "
            "number of outputs)")


def _teacher_class_count_problem(spec, outputs: int, num_classes: int) -> tuple[tuple, str, str]:
    """A distillation teacher's logits meet the student's class by class, and its output layer must be trained: so
    the fix is a teacher trained on the data's classes, never a new head (`strict: false` would leave it random)."""
    message = f"the teacher outputs {outputs} classes; the student and the data have {num_classes}"
    architecture = (f"`args.num_classes: {num_classes}`" if "num_classes" in spec.args
                    else f"`args` that build {num_classes} outputs")
    if spec.strict:
        return (("weights",), message, f"its weights end in {outputs} outputs: give `weights:` of a teacher trained "
                f"on these {num_classes} classes (with {architecture}); distillation compares the teacher's and the "
                "student's logits class by class")
    field = ("args", "num_classes") if "num_classes" in spec.args else spec_field(spec)
    return (field, message, f"set {architecture}, with `weights:` that fill that output layer: with `strict: false` "
            "an output layer the weights do not fit is left random, and a random teacher teaches noise")


def layout_problem(path: Path) -> str | None:
    """What is wrong with the path before anything is read (checked at `validate`), or None."""
    if not path.exists():
        return f"no such file or folder: {path}"
    if path.is_dir():
        missing = [name for name in (STAGE_WEIGHTS, STAGE_STRUCTURE) if not (path / name).is_file()]
        if missing:
            return (f"{path} is a folder but not an nnopt stage folder: it lacks {' and '.join(missing)}")
    return None


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or pickled objects weights_only refuses (a whole model)
        raise WeightsError(f"{path} cannot be read as weights: {str(err).splitlines()[0]}",
                           "give a file saved with torch.save(model.state_dict(), path) or a Lightning .ckpt; "
                           "whole pickled models are never loaded (they run code)") from None


def _state_of(loaded, path: Path) -> tuple[dict, str]:
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        return loaded["state_dict"], "Lightning checkpoint"  # also the common {"state_dict": ..., "epoch": ...}
    if isinstance(loaded, dict) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        return loaded, "state dict"
    keys = f"top-level keys: {_names(loaded)}" if isinstance(loaded, dict) else f"a {type(loaded).__name__}"
    raise WeightsError(f"{path} holds no state dict ({keys})",
                       "save `model.state_dict()`, or a checkpoint with its state dict under `state_dict`")


def read_weights(path: Path) -> Weights:
    problem = layout_problem(path)
    if problem:
        raise WeightsError(problem)
    if path.is_dir():
        structure = json.loads((path / STAGE_STRUCTURE).read_text(encoding="utf-8"))
        state, _ = _state_of(_torch_load(path / STAGE_WEIGHTS), path / STAGE_WEIGHTS)
        return Weights(state, list(structure.get("transforms", [])), "stage folder")
    if path.suffix == ".safetensors":
        if importlib.util.find_spec("safetensors") is None:
            raise WeightsError(f"{path} is a safetensors file and `safetensors` is not installed",
                               "pip install safetensors")
        from safetensors.torch import load_file

        return Weights(load_file(path, device="cpu"), [], "safetensors file")
    state, kind = _state_of(_torch_load(path), path)
    return Weights(state, [], kind)


def strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """The state dict with the attribute prefix that best matches the model's keys removed: a
    LightningModule saves its network as `model.` (or whatever it named the attribute), DDP as `module.`.
    Keys outside that prefix (a loss's buffers, a teacher network) belong to something else and are dropped."""
    best, best_hits = "", len(expected & set(state))
    prefixes = {".".join(key.split(".")[:depth]) + "." for key in state for depth in (1, 2) if key.count(".") >= depth}
    for prefix in sorted(prefixes):
        hits = sum(1 for key in state if key.startswith(prefix) and key[len(prefix):] in expected)
        if hits > best_hits:
            best, best_hits = prefix, hits
    if not best:
        return state
    return {key[len(best):]: value for key, value in state.items() if key.startswith(best)}


def fit_weights(model: nn.Module, weights: Weights, strict: bool) -> str:
    """Load `weights` into `model` (in place); returns a one-line account of what was loaded.

    strict: every tensor must match in name and shape. Not strict: tensors that match load, the rest of
    the model keeps its initialisation (a new classifier head, say), but at least one must match.
    """
    own = model.state_dict()
    state = strip_prefix(weights.state, set(own))
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    mismatched = [key for key in own if key in state and tuple(state[key].shape) != tuple(own[key].shape)]
    fitting = {key: value for key, value in state.items() if key in own and key not in mismatched}
    if strict and (missing or unexpected or mismatched):
        raise WeightsError(*_mismatch(own, state, missing, unexpected, mismatched))
    if not fitting:
        raise WeightsError(f"no tensor of the {weights.kind} fits the model (its keys: {_names(state)}; "
                           f"the model's: {_names(own)})", "are these the weights of this architecture?")
    model.load_state_dict(fitting, strict=False)
    kept = missing + mismatched
    return (f"loaded {len(fitting)} of the model's {len(own)} tensors from the {weights.kind}"
            + (f"; kept as built: {_names(kept)}" if kept else "")
            + (f"; ignored: {_names(unexpected)}" if unexpected else ""))


def _mismatch(own, state, missing, unexpected, mismatched) -> tuple[str, str]:
    parts = []
    if missing:
        parts.append(f"missing keys: {_names(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_names(unexpected)}")
    if mismatched:
        shapes = [f"`{k}` {list(state[k].shape)} in the weights, {list(own[k].shape)} in the model"
                  for k in mismatched[:SHOWN_KEYS]]
        parts.append("shape mismatch: " + "; ".join(shapes)
                     + (f" and {len(mismatched) - SHOWN_KEYS} more" if len(mismatched) > SHOWN_KEYS else ""))
    hint = "`strict: false` loads the tensors that fit and keeps the rest as built"
    if mismatched and not (missing or unexpected):
        hint = ("the weights were saved from the same architecture with other sizes (a classifier for another "
                "number of classes?): match `model.args`, or " + hint)
    return "the weights do not fit the model: " + "; ".join(parts), hint


def output_classes(model: nn.Module, inputs: torch.Tensor) -> int:
    """The number of classes the model's logits have, from one forward pass in eval mode."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(inputs)
    finally:
        model.train(training)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise WeightsError(f"the model's output is {shape}, not class logits shaped (batch, classes)",
                           "nnopt trains and evaluates classifiers; wrap the model so it returns logits",
                           field=())
    return logits.shape[1]
