"""Your model, your weights: torchvision builders, trained weights to start from (state dict, Lightning
checkpoint, stage folder), user factories of any signature next to the recipe, and fingerprints that
follow the weights' and the code's content."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import pytorch_lightning as pl
import torch
import torchvision
import yaml
from torch import nn

from runner.cli import main
from runner.modelio import load_model
from tests.conftest import read_metrics, synthetic_recipe
from tests.test_caching import plan_line


def flat(text: str) -> str:
    """Console output with the lines it wrapped joined again."""
    return " ".join(text.split())


def assert_clean_error(code: int, err: str, *fragments: str) -> None:
    """A located error (exit 2, no traceback) holding each fragment."""
    assert code == 2 and "Traceback" not in err, err
    for fragment in fragments:
        assert flat(fragment) in flat(err), f"{fragment!r} not in:\n{err}"


EVALUATE = {"name": "evaluate", "kind": "evaluate", "latency_batch_sizes": [1], "latency_repeats": 3,
            "latency_warmup": 0}


def evaluate_only(model: dict, name: str = "start") -> dict:
    recipe = synthetic_recipe()
    recipe.update(name=name, model=model, stages=[EVALUATE])
    return recipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small MLP trained on the synthetic data (stage folder) and its test accuracy."""
    folder = tmp_path_factory.mktemp("trained")
    recipe = synthetic_recipe()
    recipe["stages"][1] = EVALUATE
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(folder / "recipe.yaml"), "-O", str(folder / "out")]) == 0
    run_dir = folder / "out" / "tiny"
    return run_dir / "01-train", read_metrics(run_dir, "02-evaluate")["test_acc"]


MLP = {"name": "mlp", "args": {"hidden": [32], "in_features": 32}}


def test_torchvision_resnet18_builds_trains_and_reloads(nnopt, write_recipe, tmp_path):
    recipe = synthetic_recipe(epochs=1)
    recipe["model"] = {"torchvision": "resnet18", "args": {"num_classes": 4}}
    recipe["data"] = {"name": "synthetic", "batch_size": 16,
                      "args": {"shape": [3, 16, 16], "num_classes": 4, "num_train": 32, "num_val": 16, "num_test": 16}}
    recipe["stages"] = [{**recipe["stages"][0], "allow_chance_accuracy": True}]  # two steps: built and trained, not learnt
    code, out, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert code == 0, err
    reloaded = load_model(tmp_path / "out" / "tiny" / "01-train")
    fresh = torchvision.models.resnet18(num_classes=4)
    assert type(reloaded) is type(fresh) and reloaded.fc.out_features == 4
    assert reloaded.state_dict().keys() == fresh.state_dict().keys()
    assert reloaded.bn1.num_batches_tracked.item() == 2  # two training steps ran on it


def test_timm_models_build_and_train_and_need_the_extra(nnopt, write_recipe, tmp_path, monkeypatch):
    recipe = synthetic_recipe(epochs=1)
    recipe["model"] = {"timm": "test_resnet", "args": {"num_classes": 4}}
    recipe["data"] = {"name": "synthetic", "batch_size": 16,
                      "args": {"shape": [3, 16, 16], "num_classes": 4, "num_train": 32, "num_val": 16, "num_test": 16}}
    recipe["stages"] = [{**recipe["stages"][0], "allow_chance_accuracy": True}]  # two steps: built and trained, not learnt
    path = write_recipe(recipe)
    code, _, err = nnopt("run", path, "-O", tmp_path / "out")
    assert code == 0, err
    assert load_model(tmp_path / "out" / "tiny" / "01-train").get_classifier().out_features == 4

    recipe["model"]["args"]["pretrained"] = True
    code, _, err = nnopt("validate", write_recipe(recipe))
    assert_clean_error(code, err, "model.args.pretrained: `pretrained` asks timm for pretrained weights")

    import runner.models.hub as hub

    real_find_spec = hub.importlib.util.find_spec
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None if name == "timm" else real_find_spec(name))
    code, _, err = nnopt("validate", path)
    assert_clean_error(code, err, "model.timm: `timm` is not installed", "pip install 'nnopt[timm]'")


def _lightning_checkpoint(model: nn.Module, path) -> None:
    """A real Lightning checkpoint of a LightningModule holding the network as `net` (so keys read `net.*`)."""

    class Holder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model
            self.criterion = nn.CrossEntropyLoss(weight=torch.ones(10))  # a buffer outside the network

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, max_epochs=0)
    trainer.strategy.connect(Holder())
    trainer.save_checkpoint(path)


@pytest.mark.parametrize("form", ["stage folder", "state dict", "lightning checkpoint"])
def test_weights_start_the_run_from_the_trained_model(nnopt, write_recipe, tmp_path, trained, form):
    folder, trained_acc = trained
    if form == "stage folder":
        weights = str(folder)
    elif form == "state dict":
        torch.save(load_model(folder).state_dict(), tmp_path / "weights.pt")
        weights = "weights.pt"  # relative to the recipe file
    else:
        _lightning_checkpoint(load_model(folder), tmp_path / "trained.ckpt")
        weights = "trained.ckpt"
    code, out, err = nnopt("run", write_recipe(evaluate_only({**MLP, "weights": weights})), "-O", tmp_path / "out")
    assert code == 0, err
    assert f"weights {weights}: loaded 4 of the model's 4 tensors" in flat(out)
    assert read_metrics(tmp_path / "out" / "start", "01-evaluate")["test_acc"] == trained_acc
    saved = json.loads((tmp_path / "out" / "start" / "01-evaluate" / "model.json").read_text())
    assert saved["model"] == MLP  # the architecture: the artifact holds its own weights, not a path to the user's

    code, _, err = nnopt("run", write_recipe(evaluate_only(MLP, name="fresh")), "-O", tmp_path / "out")
    assert code == 0, err
    assert abs(read_metrics(tmp_path / "out" / "fresh", "01-evaluate")["test_acc"] - trained_acc) > 0.2


def test_weights_that_do_not_fit_are_located_errors_naming_keys(nnopt, write_recipe, tmp_path, trained):
    folder, _ = trained
    state = load_model(folder).state_dict()
    torch.save({"encoder." + k: v for k, v in state.items()} | {"extra.weight": torch.zeros(1)}, tmp_path / "odd.pt")
    state_wide = {k: torch.zeros(64, 32) if k == "fc1.weight" else v for k, v in state.items()}
    torch.save(state_wide, tmp_path / "wide.pt")
    torch.save({k: v for k, v in state.items() if k != "fc2.bias"}, tmp_path / "short.pt")

    path = write_recipe(evaluate_only({**MLP, "weights": "short.pt"}))
    code, _, err = nnopt("run", path, "-O", tmp_path / "out")
    assert_clean_error(code, err, f"{path}:", "model.weights: the weights do not fit the model: missing keys: "
                       "`fc2.bias`", "strict: false")

    path = write_recipe(evaluate_only({**MLP, "weights": "wide.pt"}))
    code, _, err = nnopt("run", path, "-O", tmp_path / "out")
    assert_clean_error(code, err, "shape mismatch: `fc1.weight` [64, 32] in the weights, [32, 32] in the model")

    path = write_recipe(evaluate_only({**MLP, "weights": "odd.pt"}))
    code, _, err = nnopt("run", path, "-O", tmp_path / "out")  # `encoder.` is stripped; `extra.weight` is not the model's
    assert code == 0, err

    path = write_recipe(evaluate_only({**MLP, "weights": "wide.pt", "strict": False}))
    code, out, err = nnopt("run", path, "-O", tmp_path / "out")
    assert code == 0 and "loaded 3 of the model's 4 tensors from the state dict; kept as built: `fc1.weight`" in flat(out)

    torch.save({"optimizer": {}, "epoch": 3}, tmp_path / "nostate.pt")
    path = write_recipe(evaluate_only({**MLP, "weights": "nostate.pt"}))
    code, _, err = nnopt("run", path, "-O", tmp_path / "out")
    assert_clean_error(code, err, "holds no state dict (top-level keys: `optimizer`, `epoch`)")

    torch.save(nn.Linear(2, 2), tmp_path / "pickled.pt")  # a whole pickled model: never unpickled
    path = write_recipe(evaluate_only({**MLP, "weights": "pickled.pt"}))
    code, _, err = nnopt("run", path, "-O", tmp_path / "out")
    assert_clean_error(code, err, "cannot be read as weights", "whole pickled models are never loaded")


DATA_MODULE = ("import torch\n"
               "from torch.utils.data import TensorDataset\n"
               "def splits(classes: int = 4):\n"
               "    g = torch.Generator().manual_seed(0)\n"
               "    make = lambda n: TensorDataset(torch.randn(n, 32, generator=g), torch.arange(n) % classes)\n"
               "    return make(64), make(32), make(32)\n")


def test_class_count_mismatch_is_found_before_training(nnopt, write_recipe, tmp_path, trained):
    folder, _ = trained
    recipe = synthetic_recipe()
    recipe["model"] = {**MLP, "weights": str(folder)}
    recipe["data"]["args"]["num_classes"] = 4
    path = write_recipe(recipe)
    code, _, err = nnopt("run", path, "-O", tmp_path / "out")
    # weights loaded strictly fix the output layer: the hint names the three ways out, as at run start (below)
    with_weights = ("model.weights: the model outputs 10 classes, the data has 4 (with these weights)",
                    "these weights end in 10 outputs: to train a new classifier head from them, set `args: "
                    "{num_classes: 4}` and `strict: false`; or give weights trained on 4 classes, or data with 10")
    assert_clean_error(code, err, f"{path}:", *with_weights)
    assert not (tmp_path / "out" / "tiny" / "01-train").exists()
    # loaded leniently, the architecture's arguments decide the head
    lenient = write_recipe({**recipe, "model": {**recipe["model"], "strict": False}}, "lenient.yaml")
    code, _, err = nnopt("validate", lenient)
    assert_clean_error(code, err, f"{lenient}:", "model.args: the model outputs 10 classes, the "
                       "data has 4", "set `model.args.num_classes: 4`")

    # Data whose classes only running it tells: found as the run starts, before the first stage trains.
    (tmp_path / "mydata.py").write_text(DATA_MODULE)
    recipe["data"] = {"import": "mydata:splits", "batch_size": 32}
    code, out, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert_clean_error(code, err, f"{path}:", *with_weights)
    assert "run train" not in out

    recipe["model"] = {"name": "mlp", "args": {"hidden": [32], "in_features": 32, "num_classes": 4},
                       "weights": str(folder), "strict": False}
    recipe["stages"][0]["allow_chance_accuracy"] = True  # mydata's labels are noise: this checks the start only
    code, out, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")  # a new 4-class head
    assert code == 0, err
    assert "loaded 2 of the model's 4 tensors from the stage folder; kept as built: `fc2.weight`, `fc2.bias`" in flat(out)


@pytest.mark.parametrize("model, fragments", [
    ({"torchvision": "resnt18"}, ["model.torchvision: unknown torchvision model `resnt18`", "did you mean `resnet18`?"]),
    ({"torchvision": "resnet18", "args": {"weights": "IMAGENET1K_V1"}},
     ["model.args.weights: `weights` asks torchvision for pretrained weights", "model.weights: PATH"]),
    ({"torchvision": "resnet18", "args": {"num_clases": 4}},
     ["model.args.num_clases: unknown argument `num_clases`", "did you mean `num_classes`?"]),
    ({**MLP, "weights": "missing.pt"}, ["model.weights: no such file or folder", "relative to the recipe file's folder"]),
    ({**MLP, "weights": "."}, ["not an nnopt stage folder", "lacks model.pt and model.json"]),
    ({**MLP, "strict": False}, ["`strict` applies to `weights`"]),
    ({"import": "torch.nn:nothing"}, ["model.import: `torch.nn` has no attribute `nothing`"]),
    ({"import": "no_such_module:build"}, ["cannot import `no_such_module`", "next to the recipe"]),
])
def test_model_errors_at_validate(nnopt, write_recipe, model, fragments):
    path = write_recipe(evaluate_only(model))
    code, _, err = nnopt("validate", path)
    assert_clean_error(code, err, f"{path}:", *fragments)


def test_factories_of_any_signature_bind_named_parameters_only(nnopt, write_recipe, tmp_path):
    for model in ({"import": "torchvision.models:resnet18", "args": {"num_classes": 10}},
                  {"import": "torch.nn:Identity", "args": {"anything": 1}}):
        code, out, err = nnopt("validate", write_recipe(evaluate_only(model)))
        assert code == 0 and "ok" in out, err
    (tmp_path / "widths.py").write_text(
        "import torch\n"
        "CALLS = []\n"
        "def build(width: int, *layers, depth: int = 1, **extra):\n"
        "    CALLS.append(width)\n"
        "    return torch.nn.Linear(32, 10)\n")
    code, _, err = nnopt("validate", write_recipe(evaluate_only({"import": "widths:build", "args": {"wdth": 3}})))
    assert_clean_error(code, err, "model.args.width: missing required argument `width`")
    code, _, err = nnopt("validate", write_recipe(evaluate_only({"import": "widths:build", "args": {"width": "x"}})))
    assert_clean_error(code, err, "model.args.width", "valid integer")
    code, out, err = nnopt("validate", write_recipe(evaluate_only({"import": "widths:build",
                                                                   "args": {"width": 3, "colour": "red"}})))
    assert code == 0, err
    assert sys.modules["widths"].CALLS == []  # validate never calls the factory


MODULE = ("from collections import OrderedDict\n"
          "from torch import nn\n"
          "def build(hidden: int = 16):  # the layer names of nnopt's mlp: its weights load here\n"
          "    return nn.Sequential(OrderedDict(fc1=nn.Linear(32, hidden), act=nn.{act}(), fc2=nn.Linear(hidden, 10)))\n")


def test_a_module_next_to_the_recipe_imports_without_pythonpath(nnopt, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "tanh_models.py").write_text(MODULE.format(act="Tanh"))
    (project / "recipe.yaml").write_text(yaml.safe_dump(evaluate_only({"import": "tanh_models:build"})))
    monkeypatch.chdir(tmp_path)  # neither the working folder nor sys.path holds the module
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(project))])
    code, out, err = nnopt("run", "project/recipe.yaml", "-O", "out")
    assert code == 0, err
    assert isinstance(load_model(tmp_path / "out" / "start" / "01-evaluate")[1], nn.Tanh)


def test_editing_the_code_or_the_weights_reruns_and_says_why(nnopt, tmp_path, trained):
    folder, _ = trained
    project = tmp_path / "project"
    project.mkdir()
    (project / "mymodels.py").write_text(MODULE.format(act="ReLU"))
    shutil.copytree(folder, project / "start")
    recipe = synthetic_recipe(epochs=1)
    recipe["model"] = {"import": "mymodels:build", "args": {"hidden": 32}, "weights": "start"}
    recipe["stages"][1] = EVALUATE
    path = project / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out_dir = tmp_path / "out"

    def plan(*args):
        code, out, err = nnopt("run", path, "-O", out_dir, *args)
        assert code == 0, err
        return plan_line(out, "train"), plan_line(out, "evaluate")

    assert plan()[0] == "run   train (train): new"
    assert plan() == ("reuse train (train): finished artifact matches", "reuse evaluate (evaluate): finished artifact matches")

    (project / "mymodels.py").write_text(MODULE.format(act="Tanh"))
    assert plan() == ("run   train (train): model code changed (mymodels.py)",
                      "run   evaluate (evaluate): an earlier stage runs")
    assert isinstance(load_model(out_dir / "tiny" / "01-train")[1], nn.Tanh)  # the edited code was built

    state = torch.load(project / "start" / "model.pt", weights_only=True)
    torch.save({k: v * 0.5 for k, v in state.items()}, project / "start" / "model.pt")
    assert plan()[0] == "run   train (train): weights changed"

    moved = tmp_path / "moved"
    project.rename(moved)  # the path of the weights is not in the fingerprint, their content is
    path = moved / "recipe.yaml"
    assert plan()[0] == "reuse train (train): finished artifact matches"


@pytest.mark.slow
def test_every_ddp_rank_imports_the_recipe_folder_and_starts_from_the_weights(tmp_path, trained):
    from tests.test_distributed import run_cli

    folder, _ = trained
    (tmp_path / "relu_models.py").write_text(MODULE.format(act="ReLU"))
    recipe = synthetic_recipe(epochs=1)
    recipe["model"] = {"import": "relu_models:build", "args": {"hidden": 32}, "weights": str(folder)}
    recipe["trainer"].update(strategy="ddp", devices=2)
    recipe["stages"] = recipe["stages"][:1]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    done = run_cli("run", tmp_path / "recipe.yaml", "-O", tmp_path / "out")  # from nnopt's folder, not the recipe's
    assert "loaded 4 of the model's 4 tensors from the stage folder" in flat(done.stdout)
    digests = read_metrics(tmp_path / "out" / "tiny", "01-train")["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_code_digests_cover_a_whole_user_package_and_no_installed_one(tmp_path):
    from runner.provenance import changes, code_files, files_digest

    package = tmp_path / "mypkg"
    (package / "nets").mkdir(parents=True)
    for name in ("__init__.py", "nets/__init__.py", "nets/small.py", "blocks.py"):
        (package / name).write_text(f"# {name}\n")
    before = files_digest(code_files("mypkg.nets.small:build", tmp_path))
    assert sorted(before) == ["mypkg/__init__.py", "mypkg/blocks.py", "mypkg/nets/__init__.py", "mypkg/nets/small.py"]
    (package / "blocks.py").write_text("# a block the factory uses, edited\n")
    after = files_digest(code_files("mypkg.nets.small:build", tmp_path))
    assert changes({"model": {"code": before}}, {"model": {"code": after}}) == ["model code changed (mypkg/blocks.py)"]
    assert code_files("torchvision.models:resnet18", tmp_path) == {}  # a release, not the user's edits
    assert code_files("torch.nn:Identity") == {}
