"""End-to-end wall time of shipped recipes, run in-process exactly as `nnopt run` runs them."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path

from runner.cli import main as nnopt


def run_recipe(recipe: Path, output_root: Path) -> float:
    """Seconds for `nnopt run RECIPE -O OUTPUT_ROOT` (a fresh root: nothing is reused)."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = nnopt(["run", str(recipe), "-O", str(output_root)])
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"`nnopt run {recipe}` exited with {code}:\n{printed.getvalue()[-2000:]}")
    return seconds
