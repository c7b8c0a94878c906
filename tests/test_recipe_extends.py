"""`extends:`: a recipe built on another file merges as documented, errors name the file that wrote the field,
and the merged recipe runs, is recorded and is fingerprinted exactly as its flat copy."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import yaml

from runner.plan import fingerprints
from runner.recipe import load_recipe
from runner.recipe.inherit import read_recipe
from runner.templates import PACKAGE, extended_by, shipped

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

BASE = """\
name: base
description: the parent
seed: 0
model: {name: mlp, args: {hidden: [32], in_features: 32}}
data:
  name: synthetic
  batch_size: 32
  args: {shape: [32], num_train: 512, num_val: 128, num_test: 256, noise: 2.0}
trainer: {progress_bar: false}
stages:
  - name: train
    kind: train
    epochs: 1
    optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
    schedule: {name: cosine}
  - {name: prune, kind: prune, method: magnitude, scope: global, sparsity: 0.5}
  - {name: evaluate, kind: evaluate, latency_batch_sizes: [1], latency_repeats: 3, latency_warmup: 0}
expect:
  source: the parent's rule
  metrics: {weights_kept: {at_most: 0.6}}
"""

CHILD = """\
extends: base.yaml
name: child
model: {args: {hidden: [16]}}
data:
  batch_size: 64
  args: {_replace_: true, shape: [32], num_train: 256, num_val: 128, num_test: 128}
stages:
  - {name: prune, sparsity: 0.75}
  - name: train
    optimizer: {name: adam, lr: 0.01}
  - name: finetune
    _after_: prune
    kind: finetune
    epochs: 1
    optimizer: {name: sgd, lr: 0.01}
  - {name: evaluate_again, kind: evaluate, latency_batch_sizes: [1], latency_repeats: 3, latency_warmup: 0}
"""


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.fixture
def family(tmp_path):
    """Write recipe texts by file name into one folder; returns that folder."""
    def write(**files: str) -> Path:
        for name, text in files.items():
            (tmp_path / f"{name}.yaml").write_text(text)
        return tmp_path
    return write


def test_child_merges_over_the_parent(family):
    folder = family(base=BASE, child=CHILD)
    data = read_recipe(folder / "child.yaml").data
    assert data["model"] == {"name": "mlp", "args": {"hidden": [16], "in_features": 32}}  # lists replaced whole
    assert data["data"]["batch_size"] == 64 and data["data"]["name"] == "synthetic"
    assert "noise" not in data["data"]["args"]  # `_replace_: true`: the child's block, not merged
    stages = {stage["name"]: stage for stage in data["stages"]}
    assert [stage["name"] for stage in data["stages"]] == ["train", "prune", "finetune", "evaluate", "evaluate_again"]
    assert stages["prune"] == {"name": "prune", "kind": "prune", "method": "magnitude", "scope": "global",
                               "sparsity": 0.75}
    # Another optimizer: the parent's SGD momentum does not leak into Adam; the schedule beside it stays.
    assert stages["train"]["optimizer"] == {"name": "adam", "lr": 0.01}
    assert stages["train"]["schedule"] == {"name": "cosine"} and stages["train"]["epochs"] == 1

    recipe = load_recipe(folder / "child.yaml")
    assert (recipe.name, recipe.description, recipe.expect) == ("child", "", None)  # the child's own, not inherited
    assert recipe.extends.file == "base.yaml" and "extends" not in recipe.model_dump()


def test_stages_removed_placed_and_replaced_by_kind_and_inherit(family):
    folder = family(base=BASE, child="""\
extends: {file: base.yaml, inherit: [expect]}
name: child
stages:
  - {name: prune, _remove_: true}
  - {name: export, kind: export, formats: [torchscript], _before_: train}
  - {name: evaluate, kind: sensitivity}
""")
    data = read_recipe(folder / "child.yaml").data
    assert [stage["name"] for stage in data["stages"]] == ["export", "train", "evaluate"]
    assert data["stages"][2] == {"name": "evaluate", "kind": "sensitivity"}  # another kind: the parent's fields gone
    assert data["expect"]["source"] == "the parent's rule" and "description" not in data


def test_a_chain_merges_nearest_parent_last(family):
    folder = family(base=BASE,
                    middle="extends: base.yaml\nname: middle\n"
                           "stages: [{name: prune, sparsity: {fc*: 0.6, fc2: 0.3}}]\n",
                    leaf="extends: middle.yaml\nname: leaf\n"
                         "stages: [{name: prune, scope: layer, sparsity: {fc1: 0.9, fc*: 0.7}}]\n")
    prune = read_recipe(folder / "leaf.yaml").data["stages"][1]
    assert (prune["scope"], prune["method"]) == ("layer", "magnitude")
    # A pattern map merges key by key; a later pattern wins, so the leaf's new `fc1` comes after the parents'.
    assert list(prune["sparsity"].items()) == [("fc*", 0.7), ("fc2", 0.3), ("fc1", 0.9)]


def test_errors_name_the_file_and_line_that_wrote_the_field(family, nnopt):
    bad_base = BASE.replace("lr: 0.05", "lr: -0.05")
    child = "extends: base.yaml\nname: child\nstages:\n  - {name: prune, sparsity: 1.5}\n"
    folder = family(base=bad_base, child=child)
    code, _, err = nnopt("validate", folder / "child.yaml")
    assert code == 2 and "Traceback" not in err
    assert f"base.yaml:{line_of(bad_base, 'lr: -0.05')}:" in err and "stages[0].optimizer.lr" in err
    assert f"child.yaml:{line_of(child, 'sparsity: 1.5')}:" in err and "stages[1].sparsity" in err


def test_validate_names_the_parent(family, nnopt):
    folder = family(base=BASE, child=CHILD)
    code, out, _ = nnopt("validate", folder / "child.yaml")
    shown = " ".join(out.split())  # as one line, however the console wrapped it
    assert code == 0 and "recipe `child` (extends base.yaml), 5 stages: train (train), prune (prune), finetune" in shown


def test_an_override_on_an_inherited_field_says_so(family, nnopt):
    folder = family(base=BASE, child="extends: base.yaml\nname: child\n")
    code, _, err = nnopt("validate", folder / "child.yaml", "-o", "stages.train.epochs=0")
    assert code == 2 and "stages[0].epochs" in err and "set by override `stages.train.epochs=0`" in err


@pytest.mark.parametrize("files, message, where", [
    ({"a": "extends: b.yaml\nname: a\n", "b": "extends: a.yaml\nname: b\n"},
     "extend each other in a loop: ", "b.yaml:1:1"),
    ({"a": "extends: missing.yaml\nname: a\n"}, "missing.yaml, does not exist", "a.yaml:1:1"),
    ({"a": "extends: b.yaml\nname: a\n", "b": "- 1\n- 2\n"}, "a recipe must be a mapping", "b.yaml:1:1"),
    ({"a": "extends: base.yaml\nname: a\nstages:\n  - {name: prnue, _remove_: true}\n"},
     "no stage `prnue` to remove\n    hint: did you mean `prune`?", "a.yaml:4:6"),
    ({"a": "extends: base.yaml\nname: a\nstages:\n  - {name: x, kind: evaluate, _after_: trian}\n"},
     "no stage `trian` to place it after", "a.yaml:4:"),
    ({"a": "extends: base.yaml\nname: a\nstages:\n  - {name: prune}\n  - {name: prune}\n"},
     "stage `prune` is listed twice", "a.yaml:5:"),
    ({"a": "extends: base.yaml\nname: a\nstages:\n  - {sparsity: 0.9}\n"}, "needs a `name`", "a.yaml:4:"),
    ({"a": "extends: base.yaml\nname: a\ndata: {_replace_: yes please}\n"}, "`_replace_` takes true", "a.yaml:3:"),
    ({"a": "extends: base.yaml\n"}, "needs its own `name:`", "a.yaml:1:1"),
    ({"a": "extends: [base.yaml]\nname: a\n"}, "hint: write `extends: parent.yaml`", "a.yaml:1:1"),
    ({"a": "extends: {file: base.yaml, inherit: [name]}\nname: a\n"}, "`name` is not allowed", "a.yaml:1:38"),
])
def test_bad_extends_is_a_located_error_with_a_hint(family, nnopt, files, message, where):
    folder = family(base=BASE, **files)
    code, _, err = nnopt("validate", folder / "a.yaml")
    assert code == 2 and message in err and where in err and "Traceback" not in err, err


def test_an_endless_chain_of_distinct_files_is_refused(family, nnopt):
    folder = family(**{f"r{i}": f"extends: r{i + 1}.yaml\nname: r{i}\n" for i in range(40)})
    code, _, err = nnopt("validate", folder / "r0.yaml")
    assert code == 2 and "more than 32 recipes extend one another" in err and "r31.yaml:1:1" in err


def test_extends_cannot_be_overridden(family, nnopt):
    folder = family(base=BASE, a="extends: base.yaml\nname: a\n")
    code, _, err = nnopt("validate", folder / "a.yaml", "-o", "extends=other.yaml")
    assert code == 2 and "`extends` is read with the file" in err


def test_run_records_and_fingerprints_the_merged_recipe_as_its_flat_copy(family, nnopt, tmp_path):
    folder = family(base=BASE, child=CHILD)
    merged = read_recipe(folder / "child.yaml").data
    flat = {key: value for key, value in merged.items() if key != "extends"}
    (folder / "flat.yaml").write_text(yaml.safe_dump(flat, sort_keys=False))
    child, flat_copy = load_recipe(folder / "child.yaml"), load_recipe(folder / "flat.yaml")
    expected = fingerprints(flat_copy)
    assert fingerprints(child) == expected and child.model_dump() == flat_copy.model_dump()

    code, out, err = nnopt("run", folder / "child.yaml", "-O", tmp_path / "out")
    assert code == 0, err
    run_dir = tmp_path / "out" / "child"
    recorded = json.loads((run_dir / "run.json").read_text())["recipe"]
    assert "extends" not in recorded and recorded["stages"][1]["sparsity"] == 0.75
    assert [stage["name"] for stage in recorded["stages"]] == [stage["name"] for stage in flat["stages"]]
    done = [(run_dir / f"{i + 1:02d}-{stage['name']}" / "DONE").read_text().strip()
            for i, stage in enumerate(flat["stages"])]
    assert done == expected


def test_auto_prune_98_is_the_95_recipe_at_98_percent():
    """The shipped child changes one value: its stages are the parent's run with that one override."""
    child = load_recipe(RECIPES / "auto_prune_lenet300_98.yaml")
    parent = load_recipe(RECIPES / "auto_prune_lenet300.yaml", ["stages.prune.sparsity=0.98"])
    assert fingerprints(child) == fingerprints(parent)
    own = {"name", "description", "expect"}
    assert child.model_dump(exclude=own) == parent.model_dump(exclude=own) and child.expect != parent.expect


def test_shipped_recipes_extend_shipped_recipes_and_resolve_from_the_package(nnopt, tmp_path):
    extending = [t for t in shipped() if "extends" in yaml.safe_load(t.text)]
    assert {t.name for t in extending} >= {"auto_prune_lenet300_98", "deep_compression_lenet300_max"}
    for template in extending:
        with resources.as_file(resources.files(PACKAGE) / f"{template.name}.yaml") as path:
            stages = [stage["name"] for stage in read_recipe(path).data["stages"]]
        assert stages and extended_by(template)
    # `nnopt new` of a recipe two files deep writes both parents next to the copy, which then reads whole.
    code, out, err = nnopt("new", "mine", "--from", "deep_compression_lenet300_max", "--dir", tmp_path)
    assert code == 0, err
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {"mine.yaml", "deep_compression_lenet300.yaml", "han2015_lenet300.yaml"}
    data = read_recipe(tmp_path / "mine.yaml").data
    assert data["name"] == "mine"
    assert [s["name"] for s in data["stages"]][-3:] == ["evaluate_pruned", "share", "evaluate"]
