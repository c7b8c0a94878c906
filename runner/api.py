"""The Python interface behind `import nnopt`: run or validate a recipe from a notebook, load an artifact."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from runner.recipe import Recipe, load_recipe, validate_source
from runner.recipe.inherit import resolve_extends
from runner.recipe.overrides import apply_overrides
from runner.recipe.source import Source

RecipeLike = str | Path | Mapping[str, Any] | Recipe


def _override_texts(overrides: Mapping[str, Any] | list[str] | None) -> list[str]:
    """`{"stages.train.epochs": 3}` or `["stages.train.epochs=3"]`: the `-o` texts (values as YAML)."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]  # JSON is YAML
    return list(overrides)


def validate(recipe: RecipeLike, overrides: Mapping[str, Any] | list[str] | None = None) -> Recipe:
    """The validated recipe from a file path, a dict or a Recipe; raises runner.errors.RecipeError
    listing every problem (each with file:line:col for a file)."""
    texts = _override_texts(overrides)
    if isinstance(recipe, Recipe):
        recipe = recipe.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if isinstance(recipe, Mapping):
        return validate_source(apply_overrides(resolve_extends(Source("<recipe dict>", copy.deepcopy(dict(recipe)))), texts))
    return load_recipe(recipe, texts)


def run(recipe: RecipeLike, overrides: Mapping[str, Any] | list[str] | None = None, *,
        output_dir: str | Path = "outputs", force: bool = False, start: str | None = None,
        only: str | None = None, console=None):
    """Run a recipe as `nnopt run` does (reusing finished stages) into `output_dir/<name>`.

    Returns runner.experiment.Result: `values` (run metrics and every `stage.metric`; means with seeds),
    `spread`, `verdicts` (the `expect` checks; `passed`) and `run_dirs`. Raises RecipeError for a bad
    recipe and StageError/RunError when a stage fails.
    """
    from rich.console import Console

    from runner.experiment import run_experiment

    validated = validate(recipe, overrides)
    recipe_file = Path(recipe) if isinstance(recipe, (str, Path)) else None
    return run_experiment(validated, Path(output_dir) / validated.name, console or Console(highlight=False),
                          recipe_file=recipe_file, force=force, start=start, only=only)


def load(path: str | Path) -> nn.Module:
    """The model a stage wrote, in eval mode: a stage folder (`outputs/<name>/03-finetune`) or a packed
    `model.dcz`. Masks, slimmed widths, int8 modules and shared weights are rebuilt from data, never
    unpickled; built-in models take float images as the data set gives them and return logits."""
    from runner.modelio import load_model

    return load_model(Path(path)).eval()
