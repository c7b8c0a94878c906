"""The run folder's layout: numbered stage folders, their metrics, resolved config, resume checkpoints,
and the DONE marker that is always written last. Models are saved and loaded by runner.modelio."""

from __future__ import annotations

import shutil
from pathlib import Path

from runner.files import read_json, write_text

METRICS = "metrics.json"
CONFIG = "stage.json"
DONE = "DONE"
CHECKPOINTS = "checkpoint"  # resume point of an unfinished training stage; removed once DONE is written
LAST_CHECKPOINT = "last.ckpt"
CHECKPOINT_POSITION = "last.json"  # step and epoch of LAST_CHECKPOINT, for messages only
CHECKPOINT_OWNER = "fingerprint"  # the stage fingerprint the checkpoints in CHECKPOINTS belong to


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    return run_dir / f"{index + 1:02d}-{name}"


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
