"""The documentation stays true: the generated field reference, `nnopt docs`, `nnopt list --args`, README's recipe table."""

from __future__ import annotations

from pathlib import Path

from runner import fieldref
from runner.recipe.stages import STAGE_KINDS

PAGE = Path(__file__).resolve().parent.parent / "runner" / "docs" / "reference.md"


def test_committed_reference_page_is_the_generated_one():
    assert PAGE.read_text() == fieldref.reference_page(), (
        "runner/docs/reference.md is stale: regenerate it with `nnopt docs --all > runner/docs/reference.md`")


def test_every_stage_kind_and_field_is_documented():
    keys = [section.key for section in fieldref.sections()]
    for kind in STAGE_KINDS:
        assert any(key == kind or key.startswith(kind + ".") for key in keys), kind
    trainer = {f.name: f for f in fieldref.fields(fieldref.find("trainer")[0].spec)}
    # type, constraint, default and the comment written next to the field in the spec
    assert trainer["threads"].type == "int > 0 | null" and trainer["threads"].default == "null"
    assert "intra-op threads" in trainer["threads"].meaning
    assert trainer["checkpoint"].default == "{every_n_epochs: 1}"
    prune = {f.name: f for f in fieldref.fields(fieldref.find("prune")[0].spec)}
    assert prune["sparsity"].default == "null" and "module pattern" in prune["sparsity"].meaning  # or a budget
    assert prune["scope"].type.startswith("layer | global")


def test_docs_command_shows_a_section_and_locates_a_typo(nnopt):
    code, out, _ = nnopt("docs", "quantize")
    assert code == 0 and "static_int8" in out and "calibration_batches" in out and "weight_sharing" in out
    code, out, _ = nnopt("docs", "trainer.checkpoint")
    assert code == 0 and "every_n_steps" in out
    code, _, err = nnopt("docs", "trainr")
    assert code == 1 and "did you mean `trainer`?" in err


def test_list_args_shows_arguments_and_defaults(nnopt):
    code, out, _ = nnopt("list", "--args")
    assert code == 0
    assert "in_features=784" in out  # lenet_300_100's factory signature
    assert "lr (required)" in out and "momentum=0.0" in out  # sgd's spec
    assert "calibration_batches (required)" in out


def test_readme_lists_every_shipped_recipe():
    root = Path(__file__).parent.parent
    readme = (root / "README.md").read_text()
    unlisted = [recipe.name for recipe in sorted((root / "recipes").glob("*.yaml"))
                if f"| `recipes/{recipe.name}` |" not in readme]
    assert not unlisted, f"README's recipe table lacks {unlisted}"
