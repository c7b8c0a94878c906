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


def _checkpoint_folders(folder: Path) -> list[Path]:
    """The stage's checkpoint folder and those of its parts (a stage that trains several times, such as
    `iterative_prune`, gives each fit its own subfolder: `round-1/checkpoint`, ...)."""
    if not folder.is_dir() or folder.is_symlink():
        return []
    found = [folder / CHECKPOINTS] if (folder / CHECKPOINTS).is_dir() else []
    return found + sorted(part / CHECKPOINTS for part in folder.iterdir()
                          if part.is_dir() and not part.is_symlink() and (part / CHECKPOINTS).is_dir())


def resume_points(folder: Path, fingerprint: str) -> list[Path]:
    """The last checkpoints of an unfinished run of exactly this stage config (owner mark = fingerprint)."""
    marker = folder / CHECKPOINTS / CHECKPOINT_OWNER
    if folder.is_symlink() or not marker.is_file() or marker.read_text(encoding="utf-8").strip() != fingerprint:
        return []
    return [found / LAST_CHECKPOINT for found in _checkpoint_folders(folder) if (found / LAST_CHECKPOINT).is_file()]


def checkpoint_position(checkpoint: Path) -> dict:
    """{"step": ..., "epoch": ...} of a last.ckpt ({} if unknown)."""
    try:
        return read_json(checkpoint.with_name(CHECKPOINT_POSITION))
    except (OSError, ValueError):
        return {}


def reset(folder: Path, fingerprint: str, resume: bool = True) -> None:
    """A stage about to run starts from an empty folder: leftovers of an older run are never trusted,
    except (if `resume`) the checkpoints of an interrupted run of the same config (fingerprint)."""
    refuse_link(folder)
    keep = set(_checkpoint_folders(folder)) if resume and resume_points(folder, fingerprint) else set()
    if folder.exists():
        for entry in folder.iterdir():
            if entry in keep:
                continue
            if entry / CHECKPOINTS in keep:  # a part's folder: only its checkpoints stay
                for inner in entry.iterdir():
                    if inner != entry / CHECKPOINTS:
                        _remove(inner)
                continue
            _remove(entry)
    (folder / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    if not keep:
        write_text(folder / CHECKPOINTS / CHECKPOINT_OWNER, fingerprint + "\n")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def mark_done(folder: Path, fingerprint: str) -> None:
    write_text(folder / DONE, fingerprint + "\n")
    # The finished artifact supersedes the resume points (optimizer state is often 2-3x the model).
    for found in _checkpoint_folders(folder):
        shutil.rmtree(found, ignore_errors=True)
