"""Shipped recipes as templates: installed with the package, listed by `nnopt recipes`, copied by `nnopt new`."""

from __future__ import annotations

from pathlib import Path

from runner.templates import shipped

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def test_every_recipe_file_is_shipped_with_a_description():
    templates = shipped()
    assert {t.name for t in templates} == {p.stem for p in RECIPES.glob("*.yaml")}
    assert all(t.description for t in templates), [t.name for t in templates if not t.description]


def test_recipes_lists_names_and_descriptions(nnopt):
    code, out, _ = nnopt("recipes")
    assert code == 0 and "prune_then_quant" in out and "static int8" in out


def test_new_copies_a_recipe_that_validates_under_its_new_name(nnopt, tmp_path):
    code, out, _ = nnopt("new", "my_run", "--from", "smoke_synthetic", "--dir", tmp_path)
    copy = tmp_path / "my_run.yaml"
    assert code == 0 and copy.is_file() and str(copy) in out
    text = copy.read_text()
    assert "name: my_run\n" in text and "name: smoke_synthetic" not in text
    assert text.startswith("# A few seconds")  # the template's comments come along
    code, out, _ = nnopt("validate", copy)
    assert code == 0 and "recipe `my_run`, 2 stages" in out
    code, _, err = nnopt("new", "my_run", "--from", "smoke_synthetic", "--dir", tmp_path)
    assert code == 1 and "already exists" in err  # never overwritten
    code, _, err = nnopt("new", "other", "--from", "prune_then_quan", "--dir", tmp_path)
    assert code == 1 and "did you mean `prune_then_quant`?" in err
    code, _, err = nnopt("new", "../escape", "--dir", tmp_path)
    assert code == 1 and "cannot be a recipe name" in err


def test_validate_says_one_stage(nnopt, write_recipe):
    from tests.conftest import synthetic_recipe

    recipe = synthetic_recipe()
    recipe["stages"] = recipe["stages"][:1]
    code, out, _ = nnopt("validate", write_recipe(recipe))
    assert code == 0 and "1 stage: train (train)" in out
