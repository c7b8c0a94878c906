"""What `validate` learns by importing torch (model and data checks, data facts, the dry build's findings), kept as
JSON keyed by everything it is computed from, so that a recipe validated before validates without importing torch.

Each entry is one computation's JSON result under `<cache>/<kind>/<sha256 of its key>.json`. The key holds the
computation's inputs as the caller names them (the specs as data, the content digest of weights and user code, the
listing of data folders with sizes and modification times, as run fingerprints see them) plus what every entry
depends on: nnopt's own code, the installed packages and the Python version. A changed input is a new key, so an
entry is never stale; a miss computes as before and writes the entry atomically. The cache lives beside the MNIST
cache ($NNOPT_CACHE, else $XDG_CACHE_HOME/nnopt, else ~/.cache/nnopt), under `validate/`: it belongs to the
machine and its installed packages, not to a project's outputs (validate writes no run folder);
$NNOPT_VALIDATE_CACHE moves it (the tests give each test its own).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from runner.files import write_json

FOLDER_ENV = "NNOPT_VALIDATE_CACHE"
KEPT_ENTRIES = 1000  # per kind; the oldest go first (an entry is a few hundred bytes)
RUNNER = Path(__file__).resolve().parent.parent


def cache_folder() -> Path:
    if os.environ.get(FOLDER_ENV):
        return Path(os.environ[FOLDER_ENV])
    root = os.environ.get("NNOPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "nnopt")
    return Path(root) / "validate"


def _stat(path: str) -> list:
    found = os.stat(path)
    return [found.st_size, found.st_mtime_ns]


@functools.cache
def environment() -> dict:
    """What every cached fact depends on: nnopt's code (each file's size and modification time), the installed
    distributions (name and version, from the `.dist-info` folder names) and the Python version. Read once a
    process: neither changes under a running validate."""
    code = {}
    for folder, subfolders, files in os.walk(RUNNER):
        subfolders.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                code[os.path.relpath(path, RUNNER)] = _stat(path)
    # sys.path[0] is the script's folder or the working directory, not where distributions are installed: skipped,
    # so that `nnopt validate` and `python -m runner validate` share their entries
    installed = sorted({entry for place in sys.path[1:] if os.path.isdir(place)
                        for entry in os.listdir(place) if entry.endswith((".dist-info", ".egg-info", ".egg-link"))})
    return {"python": sys.version, "runner": hashlib.sha256(json.dumps(code).encode()).hexdigest(),
            "installed": hashlib.sha256("\n".join(installed).encode()).hexdigest()}


def folder_state(path: Path | str | None) -> Any:
    """A path as the key of what was read from it: None when absent; a file's size and modification time; a
    folder's every entry (sub-folders included: an empty class folder changes a scan) with those of its files."""
    if path is None or not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        return _stat(path)
    entries = []
    for folder, subfolders, files in os.walk(path, followlinks=True):
        subfolders.sort()
        entries += [os.path.relpath(os.path.join(folder, name), path) + "/" for name in subfolders]
        entries += [[os.path.relpath(os.path.join(folder, name), path)] + _stat(os.path.join(folder, name))
                    for name in sorted(files)]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def weights_state(path: Path | None) -> Any:
    """The weights a model spec names, by content (as the run's fingerprint has them) with the folder's layout."""
    from runner.provenance import weights_digest

    if path is None or not path.exists():
        return None
    try:
        return [folder_state(path) if path.is_dir() else None, weights_digest(path)]
    except OSError:  # a stage folder without model.pt: its layout alone says what validate reports
        return [folder_state(path), None]


def code_state(target: str | None, recipe_dir: Path | None) -> Any:
    """The user code behind an `import:` target, by content (runner.provenance.code_files); installed packages
    change with a release, which the installed distributions in every key already name."""
    from runner.provenance import files_digest, code_files

    return files_digest(code_files(target, recipe_dir)) if target is not None else None


def registered(package: str) -> list:
    """Entries that code outside nnopt added to a registry in this process (`MODELS.register` in a notebook): a
    name known here may be unknown to the next process. Empty when the registry was never imported."""
    module = sys.modules.get(package)
    registry = getattr(module, {"runner.models": "MODELS", "runner.data": "DATASETS"}[package], None)
    if registry is None:
        return []
    outside = [(name, getattr(registry.get(name), "__module__", "") or "") for name in registry]
    return sorted([name, origin, folder_state(getattr(sys.modules.get(origin), "__file__", None))]
                  for name, origin in outside if not origin.startswith("runner."))


def model_key(spec) -> dict:
    """What a model spec's checks read besides the weights: the spec, where it resolves paths and imports from,
    the user code behind `import:`, whether the model library it names is installed, and names registered from
    outside nnopt."""
    libraries = {name: importlib.util.find_spec(name) is not None for name in ("torchvision", "timm")
                 if getattr(spec, name, None) is not None}
    return {"spec": spec.model_dump(mode="json", by_alias=True), "recipe_dir": str(spec.recipe_dir),
            "code": code_state(spec.import_, spec.recipe_dir), "libraries": libraries,
            "registered": registered("runner.models")}


def remember(kind: str, key: dict, compute: Callable[[], Any]) -> Any:
    """`compute()`'s JSON value for `key`: read back when an entry exists, else computed and written. An
    unreadable entry is computed again; an unwritable cache folder only costs the next call its time."""
    text = json.dumps({"kind": kind, "key": key, "environment": environment()}, sort_keys=True, default=str)
    path = cache_folder() / kind / f"{hashlib.sha256(text.encode()).hexdigest()}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))["value"]
    except (OSError, ValueError, KeyError):
        pass
    value = compute()
    try:
        write_json(path, {"value": value})
        _trim(path.parent)
    except OSError:
        pass
    return value


def _trim(folder: Path) -> None:
    entries = list(os.scandir(folder))
    if len(entries) > KEPT_ENTRIES:
        entries.sort(key=lambda entry: entry.stat().st_mtime_ns)
        for entry in entries[:len(entries) - KEPT_ENTRIES]:
            Path(entry.path).unlink(missing_ok=True)


class Recorder:
    """Stands for runner.recipe.semantics.Findings while a cached check runs: keeps its errors and warnings by
    field path, so that a later validate replays them at the recipe's lines as they are then."""

    def __init__(self):
        self.found: list[list] = []

    def error(self, path: tuple, message: str, hint: str | None = None) -> None:
        self.found.append(["error", list(path), message, hint])

    def warn(self, path: tuple, message: str, hint: str | None = None) -> None:
        self.found.append(["warn", list(path), message, hint])


def replay(found, recorded: list) -> None:
    """Recorded errors and warnings into `found` (a Findings), located at the recipe's current lines."""
    for level, path, message, hint in recorded:
        getattr(found, level)(tuple(path), message, hint)
