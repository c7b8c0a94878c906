"""validate's facts cache (runner.recipe.facts_cache): a known recipe answers as before, at its lines as they are
now, and a changed input (data folder, weights, user code) is seen at once."""

from __future__ import annotations

import shutil

import pytest
import torch

from runner.data import PREFLIGHT
from runner.data import image_folder
from runner.recipe import dry_build
from tests.conftest import synthetic_recipe


def _never_built(*_args, **_kwargs):
    raise AssertionError("the dry build ran again for a recipe validated before")


def test_a_known_recipe_answers_the_same_at_its_lines_as_they_are_now(nnopt, write_recipe, monkeypatch):
    recipe = synthetic_recipe()
    recipe["model"]["args"]["in_features"] = 30  # the data gives 32 values: the dry build's forward pass fails
    recipe["stages"].insert(1, {"name": "prune", "kind": "prune", "sparsity": 0.5, "params": ["fc9.*"]})
    path = write_recipe(recipe)
    first = nnopt("validate", path)
    assert first[0] == 2 and "matches no parameter of the model" in first[2] and "in_features: 32" in first[2]
    monkeypatch.setattr(dry_build, "check_model_fits", _never_built)
    assert nnopt("validate", path) == first
    path.write_text("# a comment moves every line down by one\n" + path.read_text())
    code, _, err = nnopt("validate", path)
    assert code == 2 and err.count(f"{path}:") == first[2].count(f"{path}:")
    for line in (int(part.split(":")[0]) for part in first[2].split(f"{path}:")[1:]):
        assert f"{path}:{line + 1}:" in err


def _folder_recipe(root, write_recipe):
    recipe = synthetic_recipe()
    recipe["model"]["args"] = {"hidden": [16], "in_features": 192, "num_classes": 4}
    recipe["data"] = {"name": "image_folder", "batch_size": 4, "eval_batch_size": 4, "args": {"root": str(root)}}
    return write_recipe(recipe)


def test_an_image_folder_is_scanned_once_and_its_changes_are_seen(nnopt, write_recipe, tmp_path, monkeypatch):
    from runner.data.make_image_folder import make_image_folder

    root = make_image_folder(tmp_path / "shapes", per_class=4, size=8)
    path = _folder_recipe(root, write_recipe)
    scans = []

    def counted(*args, **kwargs):
        scans.append(args or kwargs)
        return scan(*args, **kwargs)

    scan = image_folder.scan
    monkeypatch.setattr(image_folder, "scan", counted)
    monkeypatch.setitem(PREFLIGHT, "image_folder", counted)
    assert nnopt("validate", path)[0] == 0
    assert len(scans) == 1  # the preflight's scan gives the facts too
    for split in ("train", "val", "test"):  # a fifth class: the model's four outputs no longer fit
        shutil.copytree(root / split / "circle", root / split / "extra")
    code, _, err = nnopt("validate", path)
    assert code == 2 and "model.args.num_classes: the model outputs 4 classes, the data has 5" in err
    for split in ("train", "val", "test"):
        shutil.rmtree(root / split / "extra")
    assert nnopt("validate", path)[0] == 0 and len(scans) == 2  # the four-class answer again, from the cache


def test_changed_weights_are_read_again(nnopt, write_recipe, tmp_path):
    from runner.models import build_model
    from runner.recipe.model import ModelSpec

    recipe = synthetic_recipe()
    weights = tmp_path / "weights.pt"
    recipe["model"]["weights"] = str(weights)
    path = write_recipe(recipe)
    torch.save(build_model(ModelSpec.model_validate(recipe["model"] | {"weights": None})).state_dict(), weights)
    assert nnopt("validate", path)[0] == 0
    other = dict(recipe["model"], args={"hidden": [8], "in_features": 32})
    torch.save(build_model(ModelSpec.model_validate(other | {"weights": None})).state_dict(), weights)
    code, _, err = nnopt("validate", path)
    assert code == 2 and "model.weights" in err and "fc1.weight" in err


@pytest.mark.parametrize("outputs", [10, 3])
def test_edited_user_code_is_built_again(nnopt, write_recipe, tmp_path, outputs):
    code_file = tmp_path / "mynets.py"
    recipe = synthetic_recipe()
    recipe["model"] = {"import": "mynets:net"}
    path = write_recipe(recipe)
    code_file.write_text("import torch\ndef net():\n    return torch.nn.Linear(32, 10)\n")
    assert nnopt("validate", path, "--build-model")[0] == 0
    code_file.write_text(f"import torch\ndef net():\n    return torch.nn.Linear(32, {outputs})\n")
    code, _, err = nnopt("validate", path, "--build-model")
    assert (code, "the model outputs 3 classes, the data has 10" in err) == ((0, False) if outputs == 10 else (2, True))
