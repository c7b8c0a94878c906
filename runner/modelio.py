"""Model I/O below the stages: the initial model (with its trained weights), save, load, rebuild and replay
models, from data alone (no pickled code).

A saved model is its spec (registry name or import, arguments) plus the transforms stages recorded
on it (runner.transforms) and a plain state dict. Loading builds the architecture from the spec,
replays the transforms, then loads the state dict strictly. The modules whose transforms a saved
model may name are imported here, explicitly, so that loading never needs the stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

# Each registers its replayable transforms: masks, slim, int8, weight sharing.
import runner.compress.int8  # noqa: F401
import runner.compress.sharing  # noqa: F401
import runner.pruning  # noqa: F401
import runner.slimming  # noqa: F401
from runner.compress import packed
from runner.errors import RecipeError
from runner.files import read_json, write_atomic, write_json
from runner.models import build_model
from runner.models.weights import WeightsError, class_count_problem, fit_weights, output_classes, read_weights
from runner.transforms import replay, transforms_of

MODEL_WEIGHTS = "model.pt"  # a plain state dict: loads with torch.load(weights_only=True)
MODEL_STRUCTURE = "model.json"  # the model spec and the transforms that rebuild the module tree
PACKED_SUFFIX = ".dcz"  # the compressed artifact (runner.compress.packed)


def spec_data(model_spec) -> dict:
    """A ModelSpec as the JSON data saved artifacts carry: the architecture, without the weights the run started
    from (an artifact holds its own state dict, and a shipped .dcz names no file of the user's machine)."""
    return model_spec.architecture()


def _spec(data: dict):
    from runner.recipe.schema import ModelSpec

    return ModelSpec.model_validate(data)


def save_model(model: nn.Module, folder: Path, model_spec) -> None:
    write_atomic(Path(folder) / MODEL_WEIGHTS, lambda handle: torch.save(model.state_dict(), handle))
    write_json(Path(folder) / MODEL_STRUCTURE, {"model": spec_data(model_spec), "transforms": transforms_of(model)})


def rebuild(model_spec, transforms: list[dict], state: dict) -> nn.Module:
    """A fresh model from its spec (a ModelSpec), replayed transforms and a state dict (strict)."""
    # Built as normal tensors even when the caller loads inside torch.inference_mode(): replaying channel
    # pruning traces the model through autograd, which refuses inference-mode parameters.
    with torch.inference_mode(False):
        model = replay(build_model(model_spec), transforms)
        model.load_state_dict(state)
    return model


def load_model(path: Path) -> nn.Module:
    """The exact model of a stage folder (model.json + model.pt) or of a compressed `.dcz` artifact."""
    path = Path(path)
    if path.suffix == PACKED_SUFFIX:
        return load_packed(path)
    structure = read_json(path / MODEL_STRUCTURE)
    state = torch.load(path / MODEL_WEIGHTS, map_location="cpu", weights_only=True)
    return rebuild(_spec(structure["model"]), structure.get("transforms", []), state)


def load_packed(path: Path) -> nn.Module:
    """The exact model of a compressed artifact: its spec, replayed transforms and decoded weights."""
    data = Path(path).read_bytes()
    header = packed.read_header(data)
    return rebuild(_spec(header["model"]), header["transforms"], packed.decode_state(data)).eval()


def write_packed(model: nn.Module, model_spec, path: Path) -> packed.Packed:
    """Write the compressed artifact of `model`; returns it (`.data`) with where its bytes went (`.breakdown`)."""
    return packed.write_packed(model, spec_data(model_spec), path)


def initial_model(spec, data: Callable[[], Any]) -> tuple[nn.Module, str | None]:
    """The model the pipeline's first stage starts from, and a line saying which weights it loaded.

    The architecture, with `weights:` loaded if given (a stage folder's transforms, such as pruning masks,
    replayed first so its state dict fits), checked to output one logit per class of `data()` (the data
    contract of runner.data, built after the model so its initialisation draws the same random numbers)
    before anything trains.
    """
    model, note = build_model(spec), None
    try:
        if spec.weights_path() is not None:
            model, note = with_weights(model, spec)
        problem = class_count_problem(spec, output_classes(model, data().examples("test", 2)[0]), data().num_classes)
        if problem:
            field, message, hint = problem
            raise WeightsError(message, hint, field=field)
    except WeightsError as error:
        raise RecipeError([spec.issue(error.field, error.message, error.hint)]) from None
    return model, note


def with_weights(model: nn.Module, spec) -> tuple[nn.Module, str]:
    """`spec.weights` fitted onto `model` (a stage folder's transforms, such as pruning masks, replayed first so
    its state dict fits): the model and a line saying what loaded. Raises WeightsError with the field to fix."""
    weights = read_weights(spec.weights_path())
    if weights.transforms:
        model = replay(model, weights.transforms)
    return model, f"weights {spec.weights}: " + fit_weights(model, weights, spec.strict)
