"""The CLI surface: list, schema, validate every shipped recipe, run the smoke recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.recipe.stages import STAGE_KINDS
from runner.stages import STAGES

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_list_shows_every_registry(nnopt):
    code, out, _ = nnopt("list")
    assert code == 0
    for name in ["train", "evaluate", "lenet_300_100", "lenet5", "resnet20", "mlp", "mnist", "synthetic",
                 "sgd", "adamw", "onecycle", "piecewise", "inv"]:
        assert name in out


def test_stage_registry_matches_schema():
    assert sorted(STAGES.names()) == sorted(STAGE_KINDS)


def test_schema_is_json_with_stage_union(nnopt):
    code, out, _ = nnopt("schema")
    schema = json.loads(out)
    assert code == 0 and schema["title"] == "nnopt recipe"
    assert set(schema["required"]) >= {"name", "model", "data", "stages"}
    assert "import" in json.dumps(schema["$defs"]["ModelSpec"])


@pytest.fixture(scope="module")
def prepared_inputs(tmp_path_factory) -> dict[str, list[str]]:
    """The overrides that point the recipes on your own data at inputs made here: an image folder, and
    ResNet-18 weights (untrained: validate checks they fit the model, not what they learned)."""
    import torch
    import torchvision

    from runner.data.make_image_folder import make_image_folder

    root = tmp_path_factory.mktemp("inputs")
    # 128 training images of 32x32: the recipes' batch of 32, 4 calibration batches and 32 export checks fit
    shapes = make_image_folder(root / "shapes", per_class=32, size=32)
    weights = root / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), weights)
    data = ["-o", f"data.args.root={shapes}"]
    return {"resnet18_shapes.yaml": data, "resnet18_image_folder.yaml": data + ["-o", f"model.weights={weights}"]}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(nnopt, recipe, prepared_inputs):
    code, out, err = nnopt("validate", recipe, *prepared_inputs.get(recipe.name, []))
    assert code == 0, err


def test_smoke_recipe_runs_and_writes_artifacts(nnopt, tmp_path):
    code, out, err = nnopt("run", Path("recipes/smoke_synthetic.yaml"), "-O", tmp_path)
    assert code == 0, err
    run_dir = tmp_path / "smoke_synthetic"
    run = json.loads((run_dir / "run.json").read_text())
    assert [s["name"] for s in run["stages"]] == ["train", "evaluate"]
    assert run["versions"]["torch"] and run["recipe"]["seed"] == 0
    for stage in ("01-train", "02-evaluate"):
        for name in ("model.pt", "model.json", "metrics.json", "stage.json", "DONE"):
            assert (run_dir / stage / name).is_file()
    assert not list(run_dir.rglob("*.tmp"))
    assert "test err" in out and "evaluate" in out  # the summary table
