"""`import: package.module:attribute` targets, with the recipe's own folder importable first."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any


class ImportFailed(Exception):
    """An `import:` target cannot be imported; `message` and `hint` say why and what to do."""

    def __init__(self, message: str, hint: str | None = None):
        self.message, self.hint = message, hint
        super().__init__(message)


def split(target: str) -> tuple[str, str]:
    """`package.module:attribute` -> ("package.module", "attribute")."""
    module_name, _, attribute = target.partition(":")
    return module_name, attribute


# Module file -> (mtime_ns, size) when imported from a recipe folder: a changed file is imported afresh.
_imported: dict[str, tuple[int, int]] = {}


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_mtime_ns, stat.st_size


def local_origin(top_level: str, recipe_dir: Path) -> Path | None:
    """The file or package folder that makes `top_level` a module of the recipe's folder, if any."""
    package, module = recipe_dir / top_level, recipe_dir / f"{top_level}.py"
    if (package / "__init__.py").is_file():
        return package
    return module if module.is_file() else None


def make_importable(recipe_dir: Path) -> None:
    """Put the recipe's folder first on sys.path, as Python does for a script's folder, so a module next
    to the recipe imports without PYTHONPATH. Every rank of a multi-process run loads the recipe, so
    every rank gets it too."""
    folder = os.fspath(Path(recipe_dir).resolve())
    if folder in sys.path:
        sys.path.remove(folder)
    sys.path.insert(0, folder)


def _drop_stale(top_level: str, recipe_dir: Path) -> None:
    """Forget an earlier import of `top_level` that is not this recipe folder's current code (another
    recipe's folder, or an edited file), so one process that loads several recipes builds the right
    models."""
    origin = local_origin(top_level, recipe_dir)
    loaded = sys.modules.get(top_level)
    if origin is None or loaded is None:
        return
    files = sorted(origin.rglob("*.py")) if origin.is_dir() else [origin]
    loaded_file = getattr(loaded, "__file__", None)
    expected = origin / "__init__.py" if origin.is_dir() else origin
    fresh = (loaded_file is not None and Path(loaded_file).resolve() == expected.resolve()
             and all(_imported.get(str(f.resolve())) == _stat(f) for f in files))
    if fresh:
        return
    for name in [n for n in sys.modules if n == top_level or n.startswith(top_level + ".")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def _remember(top_level: str, recipe_dir: Path) -> None:
    origin = local_origin(top_level, recipe_dir)
    if origin is not None:
        for file in (sorted(origin.rglob("*.py")) if origin.is_dir() else [origin]):
            _imported[str(file.resolve())] = _stat(file)


def resolve(target: str, recipe_dir: Path | None = None) -> Any:
    """The attribute `target` names (`package.module:attribute`), importing its module.

    Trusted code: the user chose to run it. With `recipe_dir`, modules in that folder import first.
    """
    module_name, attribute = split(target)
    top_level = module_name.split(".")[0]
    if recipe_dir is not None:
        make_importable(recipe_dir)
        _drop_stale(top_level, Path(recipe_dir))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and module_name.startswith(err.name) and module_name[len(err.name):][:1] in ("", "."):
            where = f"next to the recipe ({recipe_dir}) or installed" if recipe_dir is not None else "installed"
            raise ImportFailed(f"cannot import `{module_name}`: no module named `{err.name}`",
                               f"the module must be {where}") from None
        raise ImportFailed(f"importing `{module_name}` failed: {err}", _place(err)) from None
    except Exception as err:  # user code failing while it is imported: its own error, with where
        raise ImportFailed(f"importing `{module_name}` failed: {type(err).__name__}: {err}", _place(err)) from None
    if recipe_dir is not None:
        _remember(top_level, Path(recipe_dir))
    if not hasattr(module, attribute):
        public = sorted(name for name, value in vars(module).items()
                        if not name.startswith("_") and callable(value) and not isinstance(value, type(sys)))
        from runner.registry import did_you_mean

        guess = did_you_mean(attribute, public)
        raise ImportFailed(f"`{module_name}` has no attribute `{attribute}`",
                           guess or ("it defines: " + ", ".join(public[:20]) if public else None))
    return getattr(module, attribute)


def _place(err: BaseException) -> str | None:
    """`file:line` of the innermost frame of an import error (or of a SyntaxError's own location)."""
    if isinstance(err, SyntaxError) and err.filename:
        return f"at {err.filename}:{err.lineno}"
    frame = err.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    if frame is None:
        return None
    return f"at {frame.tb_frame.f_code.co_filename}:{frame.tb_lineno}"
