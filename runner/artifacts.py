"""Stage folders on disk: atomic writes, the model in a form that reloads without pickled code,
metrics, the resolved config, and the DONE marker that is always written last."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runner.rebuild import replay, transforms_of

MODEL_WEIGHTS = "model.pt"  # a plain state dict: loads with torch.load(weights_only=True)
MODEL_STRUCTURE = "model.json"  # the registry name and arguments that rebuild the module tree
METRICS = "metrics.json"
CONFIG = "stage.json"
DONE = "DONE"
CHECKPOINTS = "checkpoint"  # resume point of an unfinished training stage; removed once DONE is written
LAST_CHECKPOINT = "last.ckpt"
CHECKPOINT_POSITION = "last.json"  # step and epoch of LAST_CHECKPOINT, for messages only
CHECKPOINT_OWNER = "fingerprint"  # the stage fingerprint the checkpoints in CHECKPOINTS belong to


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / f"{index + 1:02d}-{name}"


def _atomic(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda handle: handle.write(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def save_model(model: nn.Module, folder: Path, model_spec: dict) -> None:
    _atomic(folder / MODEL_WEIGHTS, lambda handle: torch.save(model.state_dict(), handle))
    write_json(folder / MODEL_STRUCTURE, {"model": model_spec, "transforms": transforms_of(model)})


def load_model(folder: Path) -> nn.Module:
    """Rebuild the module tree from model.json (spec + transforms) and load model.pt, no code unpickled."""
    from runner.recipe.schema import ModelSpec

    structure = read_json(folder / MODEL_STRUCTURE)
    state = torch.load(folder / MODEL_WEIGHTS, map_location="cpu", weights_only=True)
    return rebuild(ModelSpec.model_validate(structure["model"]), structure.get("transforms", []), state)


def rebuild(model_spec, transforms: list[dict], state: dict) -> nn.Module:
    """A fresh model from its spec (a ModelSpec), replayed transforms and a state dict (strict)."""
    import runner.stages  # noqa: F401  (registers the transforms that stages record)
    from runner.models import build_model

    model = replay(build_model(model_spec), transforms)
    model.load_state_dict(state)
    return model


def is_done(folder: Path, fingerprint: str) -> bool:
    marker = folder / DONE
    return marker.is_file() and marker.read_text(encoding="utf-8").strip() == fingerprint


def refuse_link(folder: Path) -> None:
    """A run or stage folder that is a symbolic link could make nnopt delete or write outside the output folder."""
    if folder.is_symlink():
        raise OSError(f"{folder} is a symbolic link; nnopt only writes real folders inside the output folder "
                      "(remove the link or choose another output folder with -O)")


def resumable_checkpoint(folder: Path, fingerprint: str) -> Path | None:
    """The last checkpoint of an unfinished run of exactly this stage config, if there is one."""
    checkpoint = folder / CHECKPOINTS / LAST_CHECKPOINT
    marker = folder / CHECKPOINTS / CHECKPOINT_OWNER
    if folder.is_symlink() or not checkpoint.is_file() or not marker.is_file():
        return None
    return checkpoint if marker.read_text(encoding="utf-8").strip() == fingerprint else None


def checkpoint_position(folder: Path) -> dict:
    """{"step": ..., "epoch": ...} of the stage's last checkpoint ({} if unknown)."""
    try:
        return read_json(folder / CHECKPOINTS / CHECKPOINT_POSITION)
    except (OSError, ValueError):
        return {}


def reset(folder: Path, fingerprint: str) -> Path:
    """A stage about to run starts from an empty folder: leftovers of an older run are never trusted,
    except the checkpoint of an interrupted run of the same config (fingerprint), which it resumes.

    Returns the checkpoint folder, marked with the fingerprint the checkpoints in it belong to."""
    refuse_link(folder)
    keep = resumable_checkpoint(folder, fingerprint) is not None
    if folder.exists():
        for entry in folder.iterdir():
            if keep and entry.name == CHECKPOINTS:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    checkpoints = folder / CHECKPOINTS
    checkpoints.mkdir(parents=True, exist_ok=True)
    if not keep:
        write_text(checkpoints / CHECKPOINT_OWNER, fingerprint + "\n")
    return checkpoints


def mark_done(folder: Path, fingerprint: str) -> None:
    write_text(folder / DONE, fingerprint + "\n")
    # The finished artifact supersedes the resume point (optimizer state is often 2-3x the model).
    shutil.rmtree(folder / CHECKPOINTS, ignore_errors=True)
