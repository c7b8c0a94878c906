"""Load a recipe file: parse (with line marks), apply overrides, validate, check."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from runner.errors import RecipeError
from runner.recipe.checks import check_names, check_recipe, look_at_data
from runner.recipe.inherit import read_recipe
from runner.recipe.locate import issues_from_validation
from runner.recipe.overrides import apply_overrides
from runner.recipe.schema import Recipe
from runner.recipe.semantics import check_semantics
from runner.recipe.source import Source


def validate_source(source: Source, build_user_code: bool = False) -> Recipe:
    """The validated recipe with its warnings (`recipe.warnings`); `build_user_code` lets the dry build of the
    model call an `import:` factory."""
    try:
        # The context lets the model spec resolve paths and imports relative to the recipe file.
        recipe = Recipe.model_validate(source.data, context={"source": source})
    except ValidationError as err:
        # Report unknown model/data names too, so one run of `validate` shows every problem.
        issues = issues_from_validation(err, source, Recipe) + check_names(source)
        raise RecipeError(sorted(issues, key=lambda i: (i.line or 0, i.column or 0))) from None
    data = look_at_data(recipe.data)
    issues = check_recipe(recipe, source, data)
    # The dry build needs names and arguments that resolve: it runs once the checks above pass.
    found = check_semantics(recipe, source, data, build_user_code, dry_build=not issues)
    issues += found.errors
    if issues:
        raise RecipeError(sorted(issues, key=lambda i: (i.line or 0, i.column or 0)))
    recipe.warnings.extend(found.warnings)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None, build_user_code: bool = False) -> Recipe:
    """The validated recipe, or a RecipeError listing every problem found."""
    source = apply_overrides(read_recipe(path), overrides or [])
    return validate_source(source, build_user_code)


__all__ = ["Recipe", "load_recipe", "validate_source"]
