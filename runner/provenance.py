"""Content digests of what a recipe reads besides its YAML: weights files and the user code behind `import:`."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import sysconfig
from pathlib import Path

from runner.imports import local_origin, make_importable, split

_CHUNK = 1 << 20


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (weights files can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def files_digest(files: dict[str, Path]) -> dict[str, str]:
    """{name: sha256} for each named file, in name order."""
    return {name: file_digest(files[name]) for name in sorted(files)}


def _installed_roots() -> list[Path]:
    """Folders of installed and standard-library code: third-party releases, not the user's own code."""
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    roots |= {p for p in sys.path if p.endswith(("site-packages", "dist-packages"))}
    return [Path(root).resolve() for root in roots]


def _is_installed(path: Path) -> bool:
    path = path.resolve()
    return any(path.is_relative_to(root) for root in _installed_roots())


def code_files(target: str, recipe_dir: Path | None = None) -> dict[str, Path]:
    """The user code behind an `import:` target, named relative to the folder it imports from.

    A top-level package contributes all its .py files (a factory may use any of them), a plain module
    its one file. Installed packages (site-packages) and the standard library contribute nothing: they
    change only with a release, not with the user's edits. Names are relative, so moving the project
    folder changes no digest.
    """
    top_level = split(target)[0].split(".")[0]
    origin = local_origin(top_level, recipe_dir) if recipe_dir is not None else None
    if origin is None:
        if recipe_dir is not None:
            make_importable(recipe_dir)
        found = importlib.util.find_spec(top_level)
        if found is None or found.origin in (None, "built-in", "frozen"):
            return {}
        origin = Path(found.origin)
        if found.submodule_search_locations:  # a package: its folder
            origin = origin.parent
        if _is_installed(origin):
            return {}
    if origin.is_dir():
        return {file.relative_to(origin.parent).as_posix(): file for file in sorted(origin.rglob("*.py"))}
    return {origin.name: origin}


INPUTS = "inputs.json"  # in each stage artifact: the digests below, so a later plan can say what changed


def weights_digest(path: Path) -> str:
    """A weights file's digest, or a stage folder's (its weights and the structure they load into)."""
    if path.is_dir():
        return hashlib.sha256("".join(file_digest(path / name) for name in ("model.pt", "model.json")).encode()).hexdigest()
    return file_digest(path)


def spec_inputs(spec) -> dict:
    """{"weights": digest, "code": {file: digest}, "files": digest} of a model or data spec: what it reads besides
    the recipe (`files`: the listing of a data set's root folder)."""
    record = {}
    weights = spec.weights_path() if hasattr(spec, "weights_path") else None
    if weights is not None and weights.exists():
        record["weights"] = weights_digest(weights)
    if getattr(spec, "import_", None) is not None:
        record["code"] = files_digest(code_files(spec.import_, spec.recipe_dir))
    if hasattr(spec, "factory_args"):  # a data spec
        from runner.data.build import root_listing_digest

        if (listing := root_listing_digest(spec)) is not None:
            record["files"] = listing
    return record


def run_inputs(recipe) -> dict:
    """The provenance record of a run: the model's and the data's inputs, by kind."""
    return {kind: found for kind in ("model", "data") if (found := spec_inputs(getattr(recipe, kind)))}


def changes(earlier: dict, now: dict) -> list[str]:
    """Why two provenance records differ, in words: `weights changed`, `model code changed (mymodels.py)`.

    A record maps a kind (`model`, `data`) to {"weights": digest, "code": {file: digest}, "files": digest}.
    """
    reasons = []
    for kind in sorted(set(earlier) | set(now)):
        before, after = earlier.get(kind, {}), now.get(kind, {})
        if before.get("weights") != after.get("weights"):
            reasons.append("weights changed")
        if before.get("files") != after.get("files"):
            reasons.append(f"{kind} files changed")
        old_code, new_code = before.get("code", {}), after.get("code", {})
        edited = sorted(name for name in set(old_code) | set(new_code) if old_code.get(name) != new_code.get(name))
        if edited:
            shown = ", ".join(edited[:3]) + (f" and {len(edited) - 3} more" if len(edited) > 3 else "")
            reasons.append(f"{kind} code changed ({shown})")
    return reasons
