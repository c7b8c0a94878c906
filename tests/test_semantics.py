"""`validate` knows the pipeline: recipes that are well formed but cannot work are refused before any training,
at the line of the offending field, with a hint; legal but suspicious ones pass with a warning."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from tests.conftest import synthetic_recipe

# The synthetic recipe's data: 512 training examples in batches of 32, so 16 optimizer steps per epoch.
QUANTIZE = {"name": "quantize", "kind": "quantize", "method": "dynamic_int8"}
PRUNE = {"name": "prune", "kind": "prune", "sparsity": 0.5}
FINETUNE = {"name": "finetune", "kind": "finetune", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01}}
EVALUATE = {"name": "evaluate", "kind": "evaluate"}


def recipe_with(*stages, train: dict | None = None, **top) -> dict:
    """The synthetic recipe: its train stage (with `train` fields), then `stages`, then top-level changes."""
    recipe = synthetic_recipe(**(train or {}))
    recipe["stages"] = [recipe["stages"][0]] + [copy.deepcopy(stage) for stage in stages]
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    return recipe


def refused(nnopt, write_recipe, recipe, *fragments, args=()):
    """`nnopt validate` exits 2 with each fragment in its message, located at a line of the file."""
    path = write_recipe(recipe)
    code, out, err = nnopt("validate", path, *args)
    err = " ".join(err.split())  # rich wraps long lines
    assert code == 2, out + err
    assert "Traceback" not in err and "unexpected" not in err
    assert f"{path}:" in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    return err


def accepted(nnopt, write_recipe, recipe, *warnings, args=()):
    path = write_recipe(recipe)
    code, out, err = nnopt("validate", path, *args)
    err = " ".join(err.split())
    assert code == 0 and "ok" in out, err
    for fragment in warnings:
        assert "warning" in err and fragment in err, f"{fragment!r} not in:\n{err}"
    return err


# ---- the model's form through the stages --------------------------------------------------------------

ORDERS = {
    "prune after quantize": ([QUANTIZE, PRUNE], ["stages[2].kind: `prune` cannot take the dynamic int8 model "
                                                 "(made by stage `quantize`)", "prune and fine-tune before quantizing"]),
    "iterative_prune after quantize": ([QUANTIZE, {"name": "ip", "kind": "iterative_prune", "rounds": 2,
                                                   "fraction": 0.2, "retrain": {"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01}}}],
                                       ["`iterative_prune` cannot take the dynamic int8 model"]),
    "finetune after quantize": ([QUANTIZE, FINETUNE], ["`finetune` cannot take the dynamic int8 model"]),
    "quantize twice": ([QUANTIZE, {**QUANTIZE, "name": "again"}], ["`quantize dynamic_int8` cannot take the dynamic int8"]),
    "weight sharing after dynamic int8": ([QUANTIZE, {"name": "share", "kind": "quantize", "method": "weight_sharing",
                                                      "bits": 4}], ["`quantize weight_sharing` cannot take the dynamic int8"]),
    "train after static int8": ([{"name": "q", "kind": "quantize", "method": "static_int8", "calibration_batches": 2},
                                 {**FINETUNE, "kind": "train", "name": "again"}], ["`train` cannot take the static int8 model"]),
    "finetune after weight sharing": ([{"name": "share", "kind": "quantize", "method": "weight_sharing", "bits": 4},
                                       FINETUNE], ["`finetune` cannot take the weight-shared model",
                                                   "the quantize stage's own `finetune:` block"]),
    "ONNX export of dynamic int8": ([QUANTIZE, {"name": "export", "kind": "export", "formats": ["onnx"]}],
                                    ["stages[2].formats: ONNX export cannot take the dynamic int8 model",
                                     "static_int8 or qat"]),
}


@pytest.mark.parametrize("case", ORDERS)
def test_impossible_orders_are_refused(nnopt, write_recipe, case):
    stages, fragments = ORDERS[case]
    refused(nnopt, write_recipe, recipe_with(*stages), *fragments)


def test_the_usual_order_passes(nnopt, write_recipe):
    export = {"name": "export", "kind": "export", "formats": ["torchscript"]}
    accepted(nnopt, write_recipe, recipe_with(PRUNE, FINETUNE, QUANTIZE, EVALUATE, export))


# ---- data and model that fit ------------------------------------------------------------------------

SYNTHETIC = synthetic_recipe()["data"]["args"]
DATA = {
    "20 classes into 10 outputs": ({"args": {**SYNTHETIC, "num_classes": 20}}, {},
                                   ["the model outputs 10 classes, the data has 20", "num_classes: 20"]),
    "32 inputs into in_features 16": ({}, {"args": {"hidden": [32], "in_features": 16}},
                                      ["model.args: the model's forward pass fails on a batch of the data's examples (shape (32,))",
                                       "in_features: 32"]),
    "empty val split": ({"args": {**SYNTHETIC, "num_val": 0}}, {}, ["data.args.num_val: the val split is empty"]),
    "empty test split": ({"args": {**SYNTHETIC, "num_test": 0}}, {}, ["the test split is empty"]),
    "no training data": ({"args": {**SYNTHETIC, "num_train": 0}}, {}, ["the train split is empty"]),
    "one class": ({"args": {**SYNTHETIC, "num_classes": 1}}, {"args": {"hidden": [32], "in_features": 32, "num_classes": 1}},
                  ["the data has 1 class: a classifier needs at least 2"]),
    "limit above the split": ({"limit": {"train": 600}}, {}, ["data.limit.train: limit.train is 600, above the 512"]),
    "batch above the data": ({"batch_size": 1024}, {}, ["data.batch_size: batch_size 1024 is above the 512 training"]),
    "mnist limit above its split": ({"name": "mnist", "args": {}, "limit": {"val": 20000}}, {"name": "lenet_300_100", "args": {}},
                                    ["limit.val is 20000, above the 10000 examples"]),
    "a shape with an empty dimension": ({"args": {**SYNTHETIC, "shape": [0]}}, {},
                                        ["data.args.shape: the input shape [0] has a dimension that is not a positive"]),
    "NaN noise in the data's args": ({"args": {**SYNTHETIC, "noise": float("nan")}}, {},
                                     ["data.args.noise: nan is not a finite number"]),
    "a crop larger than the examples": ({"args": {**SYNTHETIC, "shape": [3, 8, 8]}, "transforms": {"train": [{"RandomCrop": {"size": 16}}]}},
                                        {"name": "resnet20", "args": {"width": 4}},
                                        ["data.transforms.train[0]: RandomCrop fails on an example of this data (shape (3, 8, 8))"]),
    "Normalize with another channel count": ({"args": {**SYNTHETIC, "shape": [3, 8, 8]},
                                              "transforms": {"eval": [{"Normalize": {"mean": [0.5], "std": [0.5, 0.5]}}]}},
                                             {"name": "resnet20", "args": {"width": 4}},
                                             ["data.transforms.eval[0]: Normalize fails on an example of this data"]),
    "a resize the model does not take": ({"args": {**SYNTHETIC, "shape": [1, 8, 8]},
                                          "transforms": {"train": [{"Resize": {"size": 4}}], "eval": [{"Resize": {"size": 4}}]}},
                                         {"args": {"hidden": [32], "in_features": 64}},
                                         ["model.args: the model's forward pass fails on a batch of the data's examples (shape (1, 4, 4))",
                                          "in_features: 16"]),
    "train and eval transforms of different sizes": ({"args": {**SYNTHETIC, "shape": [1, 8, 8]},
                                                      "transforms": {"train": [{"RandomCrop": {"size": 4}}]}},
                                                     {"args": {"hidden": [32], "in_features": 64}},
                                                     ["data.transforms: the train transforms give examples of shape (1, 4, 4), "
                                                      "the eval transforms (1, 8, 8)"]),
    "fewer training examples than classes": ({"limit": {"train": 4}}, {}, ["data.limit.train: 4 training examples cannot "
                                                                          "show all 10 classes"]),
    "sensitivity beyond the val split": ({}, {}, ["stages[1].examples: examples is 2000, above the 128 examples of the val split"]),
    "export check beyond the test split": ({"args": {**SYNTHETIC, "num_test": 16}}, {},
                                           ["stages[1].check_examples: check_examples is 256, above the 16 examples of the test split"]),
}
# Cases whose second stage measures something other than evaluate.
SECOND_STAGE = {"sensitivity beyond the val split": {"name": "s", "kind": "sensitivity", "sparsities": [0.5], "bits": [4],
                                                     "examples": 2000},
                "export check beyond the test split": {"name": "x", "kind": "export", "formats": ["torchscript"],
                                                       "check_examples": 256}}


def test_default_example_counts_mean_up_to(nnopt, write_recipe):
    # sensitivity's 2000 and export's 256 are defaults: on 128 validation and 16 test examples they use those
    recipe = recipe_with({"name": "s", "kind": "sensitivity", "sparsities": [0.5], "bits": [4]},
                         {"name": "x", "kind": "export", "formats": ["torchscript"]})
    recipe["data"]["args"]["num_test"] = 16
    accepted(nnopt, write_recipe, recipe)


@pytest.mark.parametrize("case", DATA)
def test_data_and_model_that_do_not_fit(nnopt, write_recipe, case):
    data, model, fragments = DATA[case]
    recipe = recipe_with(SECOND_STAGE.get(case, EVALUATE))
    recipe["data"].update(data)
    recipe["model"].update(model)
    refused(nnopt, write_recipe, recipe, *fragments)


def test_neuron_pruning_needs_a_graph_it_can_follow(nnopt, write_recipe):
    # ShuffleNet's channel shuffle (view, transpose) defeats Torch-Pruning's trace; ResNets are followed
    recipe = recipe_with({"name": "slim", "kind": "prune", "granularity": "neurons", "sparsity": 0.5})
    recipe["model"] = {"torchvision": "shufflenet_v2_x0_5", "args": {"num_classes": 10}}
    recipe["data"]["args"]["shape"] = [3, 32, 32]
    refused(nnopt, write_recipe, recipe, "stages[1].granularity: structured pruning cannot follow this model")


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """8x8 RGB shapes: 16 training, 4 validation and 4 test images of 4 classes."""
    from runner.data.make_image_folder import make_image_folder

    return make_image_folder(tmp_path_factory.mktemp("folder") / "shapes", per_class=4, size=8)


def folder_recipe(root, *stages, batch_size: int = 4) -> dict:
    recipe = recipe_with(*stages, model={"args": {"hidden": [16], "in_features": 192, "num_classes": 4}})
    recipe["data"] = {"name": "image_folder", "batch_size": batch_size, "eval_batch_size": 4, "args": {"root": str(root)}}
    return recipe


FOLDERS = {
    "batch above the images": ({"batch_size": 32}, {}, [EVALUATE],
                               ["data.batch_size: batch_size 32 is above the 16 training examples"]),
    "calibration above the batches": ({}, {}, [{"name": "q", "kind": "quantize", "method": "static_int8", "calibration_batches": 5}],
                                      ["stages[1].calibration_batches: calibration_batches is 5 but the training data gives 4 "
                                       "batches of 4"]),
    "limit above the images": ({"limit": {"train": 100}}, {}, [EVALUATE],
                               ["data.limit.train: limit.train is 100, above the 16 examples of the train split"]),
    "classes against outputs": ({}, {"num_classes": 10}, [EVALUATE],
                                ["model.args.num_classes: the model outputs 10 classes, the data has 4"]),
    "input against in_features": ({}, {"in_features": 100}, [EVALUATE],
                                  ["the model's forward pass fails on a batch of the data's examples (shape (3, 8, 8))",
                                   "in_features: 192"]),
}


@pytest.mark.parametrize("case", FOLDERS)
def test_image_folder_sizes_are_counted_at_validate(nnopt, write_recipe, small_folder, case):
    data, model, stages, fragments = FOLDERS[case]
    recipe = folder_recipe(small_folder, *stages)
    recipe["data"].update(data)
    recipe["model"]["args"].update(model)
    refused(nnopt, write_recipe, recipe, *fragments)


def test_an_image_folder_that_fits_passes(nnopt, write_recipe, small_folder):
    resize = [{"Resize": {"size": 4}}]
    recipe = folder_recipe(small_folder, {"name": "q", "kind": "quantize", "method": "static_int8", "calibration_batches": 4})
    recipe["data"]["transforms"] = {"train": resize, "eval": resize}
    recipe["model"]["args"]["in_features"] = 48  # 3 x 4 x 4 after the resize
    accepted(nnopt, write_recipe, recipe)


@pytest.fixture
def four_cores(monkeypatch):
    """Two CPU processes are allowed whatever the test machine has."""
    from runner.recipe import devices

    machine = devices.Machine(cuda_devices=0, bf16_on_cuda=False, mps=False, cpu_cores=4, torch_xla=False, deepspeed=False)
    monkeypatch.setattr(devices.Machine, "probe", staticmethod(lambda: machine))


@pytest.mark.parametrize("split, field", [("train", "num_train"), ("val", "num_val"), ("test", "num_test")])
def test_every_process_gets_examples_of_every_split(nnopt, write_recipe, four_cores, split, field):
    recipe = recipe_with(EVALUATE, trainer={"devices": 2, "strategy": "ddp"})
    recipe["data"]["args"] |= {field: 1, "num_classes": 2}  # two classes: two training examples can show both
    recipe["model"]["args"]["num_classes"] = 2
    recipe["data"]["batch_size"] = 2
    fragment = f"data.args.{field}: the {split} split has 1 example for 2 processes: 1 of them would get none"
    refused(nnopt, write_recipe, recipe, fragment)
    recipe["data"]["args"][field] = 2
    accepted(nnopt, write_recipe, recipe)


USER_MODELS = """\
import pathlib
import torch

def marked():
    pathlib.Path(__file__).with_name("factory_ran").touch()
    return torch.nn.Sequential(torch.nn.Linear(32, 10))

def number():
    return 42

def no_parameters():
    return torch.nn.Flatten()

def layer_norm():
    return torch.nn.Sequential(torch.nn.Linear(32, 10), torch.nn.LayerNorm(10))
"""


def test_validate_runs_user_code_only_when_asked(nnopt, write_recipe, tmp_path):
    (tmp_path / "user_models.py").write_text(USER_MODELS)
    recipe = recipe_with(EVALUATE, model={"import": "user_models:marked"})
    recipe["model"].pop("name"), recipe["model"].pop("args")
    accepted(nnopt, write_recipe, recipe)
    assert not (tmp_path / "factory_ran").exists()
    accepted(nnopt, write_recipe, recipe, args=("--build-model",))
    assert (tmp_path / "factory_ran").exists()
    recipe["model"]["import"] = "user_models:number"
    accepted(nnopt, write_recipe, recipe)  # not called: nothing to say yet
    refused(nnopt, write_recipe, recipe, "the factory returned a int, not a torch.nn.Module", args=("--build-model",))
    recipe["model"]["import"] = "user_models:no_parameters"
    refused(nnopt, write_recipe, recipe, "the model has no parameters to train", args=("--build-model",))


def test_static_int8_needs_int8_kernels_for_every_layer(nnopt, write_recipe, tmp_path):
    (tmp_path / "user_models.py").write_text(USER_MODELS)
    recipe = recipe_with({"name": "q", "kind": "quantize", "method": "static_int8", "calibration_batches": 2},
                         model={"import": "user_models:layer_norm"})
    recipe["model"].pop("name"), recipe["model"].pop("args")
    refused(nnopt, write_recipe, recipe, "stages[1].method: static_int8 cannot quantize this model: int8 kernels "
            "exist for none of these layers: 1 (LayerNorm)", args=("--build-model",))
    accepted(nnopt, write_recipe, recipe | {"stages": recipe["stages"][:1] + [QUANTIZE]}, args=("--build-model",))


def test_user_data_with_an_empty_split_is_named(nnopt, write_recipe, tmp_path):
    (tmp_path / "empty_user_data.py").write_text(
        "import torch\n\ndef splits():\n    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))\n"
        "    full = torch.utils.data.TensorDataset(x, y)\n"
        "    return torch.utils.data.TensorDataset(x[:0], y[:0]), full, full\n")
    recipe = recipe_with(EVALUATE)
    recipe["data"] = {"import": "empty_user_data:splits", "batch_size": 32}
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    err = " ".join(err.split())
    assert code == 1 and "the train Dataset `empty_user_data:splits` returned is empty" in err and "unexpected" not in err


def test_a_callback_that_is_not_one(nnopt, write_recipe, tmp_path):
    (tmp_path / "not_callbacks.py").write_text("class Plain:\n    pass\n\ndef text():\n    return 'not a callback'\n")
    recipe = recipe_with(EVALUATE, trainer={"callbacks": [{"import": "not_callbacks:Plain"}]})
    refused(nnopt, write_recipe, recipe, "trainer.callbacks[0]", "`not_callbacks:Plain` is a class but not a "
            "pytorch_lightning Callback")
    recipe["trainer"]["callbacks"] = [{"import": "not_callbacks:text"}]  # a function: known only once called
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    err = " ".join(err.split())
    assert code == 2 and "`not_callbacks:text` returned a str, not a pytorch_lightning Callback" in err
    assert "unexpected" not in err


def test_weights_are_read_at_validate(nnopt, write_recipe, tmp_path):
    import torch

    from runner.models import build_model
    from runner.recipe.model import ModelSpec

    recipe = recipe_with(EVALUATE)
    recipe["model"]["weights"] = "recipe.yaml"  # the recipe file itself: not a state dict
    refused(nnopt, write_recipe, recipe, "model.weights:", "cannot be read as weights")
    other = build_model(ModelSpec(name="mlp", args={"hidden": [8], "in_features": 32}))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    recipe["model"]["weights"] = "other.pt"  # another architecture's weights
    refused(nnopt, write_recipe, recipe, "model.weights:")
    fitting = build_model(ModelSpec(**recipe["model"] | {"weights": None}))
    torch.save(fitting.state_dict(), tmp_path / "fitting.pt")
    recipe["model"]["weights"] = "fitting.pt"
    accepted(nnopt, write_recipe, recipe)


def test_run_checks_the_factory_before_any_stage(nnopt, write_recipe, tmp_path):
    (tmp_path / "user_models.py").write_text(USER_MODELS)
    recipe = recipe_with(EVALUATE, model={"import": "user_models:number"})
    recipe["model"].pop("name"), recipe["model"].pop("args")
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert code == 2 and "not a torch.nn.Module" in " ".join(err.split()) and not (tmp_path / "out").exists()


# ---- schedules resolved against the stage's length ---------------------------------------------------

SCHEDULES = {
    "warmup longer than the stage (epochs)": ({"warmup": {"epochs": 5}}, ["stages[0].warmup: the warmup (80 steps) is "
                                                                         "not shorter than the stage (48 steps)"]),
    "warmup longer than the stage (steps vs epochs)": ({"warmup": {"steps": 60}}, ["the warmup (60 steps) is not "
                                                                                  "shorter than the stage (48 steps)"]),
    "milestones beyond the stage": ({"schedule": {"name": "multistep", "milestones": [2, 5]}},
                                    ["stages[0].schedule.milestones: milestone 5 lies at or beyond the stage's end"]),
    "boundaries beyond the stage": ({"schedule": {"name": "piecewise", "boundaries": [3], "values": [0.1, 0.01]}},
                                    ["boundary 3 is at or beyond the stage's end"]),
    "cosine min_lr above lr": ({"schedule": {"name": "cosine", "min_lr": 25}},
                               ["stages[0].schedule.min_lr: cosine min_lr 25 is above the learning rate 0.05",
                                "rise 500x"]),
    "linear min_lr above lr": ({"schedule": {"name": "linear", "min_lr": 0.5}}, ["linear min_lr 0.5 is above"]),
    "onecycle max_lr below lr": ({"schedule": {"name": "onecycle", "max_lr": 0.01}},
                                 ["stages[0].schedule.max_lr: onecycle max_lr 0.01 is below the learning rate 0.05"]),
    "plateau schedule that never validates": ({"val_every_epochs": 5, "schedule": {"name": "reduce_on_plateau"}},
                                              ["stages[0].val_every_epochs: validation runs every 5 epochs, so never",
                                               "reduce_on_plateau would watch no validation"]),
    "early stopping that never validates": ({"val_every_epochs": 4, "early_stopping": {"patience": 1}},
                                            ["early stopping would watch no validation"]),
    "gradual every longer than its window": ({"gradual_pruning": {"sparsity": 0.5, "start": {"steps": 0},
                                                                  "end": {"steps": 20}, "every": {"epochs": 2}}},
                                             ["stages[0].gradual_pruning.every: `every` (32 steps) is longer than the "
                                              "window (steps 0 to 20)"]),
    "gradual window beyond the stage (steps)": ({"gradual_pruning": {"sparsity": 0.5, "end": {"steps": 50},
                                                                     "every": {"steps": 5}}},
                                                ["gradual_pruning.end: the gradual pruning window ends at step 50, not "
                                                 "inside the stage (the stage has 48 steps"]),
    "gradual window ends with the stage (epochs)": ({"gradual_pruning": {"sparsity": 0.5, "end": {"epochs": 3},
                                                                         "every": {"steps": 5}}},
                                                    ["ends at step 48, not inside the stage"]),
    "steps stage shorter than an epoch with plateau": ({"epochs": None, "steps": 10,
                                                        "schedule": {"name": "reduce_on_plateau"}},
                                                       ["so never in this stage of 0.625 epochs"]),
    "keep best that never validates": ({"val_every_epochs": 5, "keep": "best"},
                                       ["stages[0].val_every_epochs: validation runs every 5 epochs",
                                        "keep: best would watch no validation"]),
    "lr finder sweeping down": ({"lr_finder": {"min_lr": 1.0, "max_lr": 0.001, "num_steps": 10}},
                                ["stages[0].lr_finder.max_lr: lr_finder max_lr 0.001 is not above min_lr 1"]),
    "accumulation longer than an epoch": ({"trainer": {"accumulate_grad_batches": 32}},
                                          ["stages[0].trainer.accumulate_grad_batches: accumulate_grad_batches 32 is more "
                                           "than the 16 batches of an epoch"]),
    "early stopping on an accuracy gain above 1": ({"early_stopping": {"monitor": "val_acc", "min_delta": 2, "patience": 1}},
                                                   ["stages[0].early_stopping.min_delta: min_delta 2 on val_acc, a fraction"]),
    "keep best that keeps the worst epoch": ({"keep": {"epoch": "best", "monitor": "val_acc", "mode": "min"}},
                                             ["stages[0].keep.mode: keep: best with mode min on val_acc hands on the least "
                                              "accurate epoch"]),
    "gradual pruning inside QAT": ({"kind": "quantize", "method": "qat", "gradual_pruning": {"sparsity": 0.5, "end": {"epochs": 2},
                                                                                            "every": {"steps": 4}}},
                                   ["stages[0].gradual_pruning: `quantize qat` cannot prune gradually"]),
    "weight decay that flips the weights": ({"optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 40}},
                                            ["stages[0].optimizer.weight_decay: weight_decay 40 at lr 0.05 scales every "
                                             "weight by 1 - lr * weight_decay = -1 each step"]),
}


@pytest.mark.parametrize("case", SCHEDULES)
def test_schedules_that_cannot_do_what_they_say(nnopt, write_recipe, case):
    fields, fragments = SCHEDULES[case]
    recipe = recipe_with(EVALUATE)
    recipe["stages"][0].update(fields)
    recipe["stages"][0] = {k: v for k, v in recipe["stages"][0].items() if v is not None}
    refused(nnopt, write_recipe, recipe, *fragments)


def test_a_gradual_window_is_checked_in_its_own_unit_when_the_data_size_is_unknown(nnopt, write_recipe, tmp_path):
    (tmp_path / "user_data.py").write_text("def splits():\n    raise RuntimeError('never called by validate')\n")
    recipe = recipe_with(train={"gradual_pruning": {"sparsity": 0.5, "end": {"epochs": 3}, "every": {"steps": 5}}})
    recipe["data"] = {"import": "user_data:splits", "batch_size": 32}
    refused(nnopt, write_recipe, recipe, "gradual_pruning.end.epochs: the gradual pruning window ends at epochs 3, "
            "not inside the stage's 3")


WINDOWS = {
    "calibration batches above the data": ({"name": "q", "kind": "quantize", "method": "static_int8",
                                            "calibration_batches": 17},
                                           ["stages[1].calibration_batches: calibration_batches is 17 but the training "
                                            "data gives 16 batches"]),
    "qat freeze after the stage": ({"name": "q", "kind": "quantize", "method": "qat", "epochs": 1,
                                    "optimizer": {"name": "sgd", "lr": 0.01}, "freeze_observers_after": {"epochs": 2}},
                                   ["stages[1].freeze_observers_after: freeze_observers_after is at step 32, not inside "
                                    "the stage's 16 steps"]),
    "rewind after the dense round": ({"name": "lth", "kind": "iterative_prune", "rounds": 2, "fraction": 0.2,
                                      "rewind": {"epochs": 2}, "retrain": {"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01}}},
                                     ["stages[1].rewind: the rewind point (step 32) is not inside the dense round's 16 steps"]),
    "rewind to the end of the dense round": ({"name": "lth", "kind": "iterative_prune", "rounds": 2, "fraction": 0.2,
                                              "rewind": {"fraction": 1.0}, "retrain": {"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01}}},
                                             ["the rewind point (step 16) is not inside the dense round's 16 steps: survivors "
                                              "would keep their trained values"]),
}


@pytest.mark.parametrize("case", WINDOWS)
def test_windows_inside_other_stages(nnopt, write_recipe, case):
    stage, fragments = WINDOWS[case]
    refused(nnopt, write_recipe, recipe_with(stage), *fragments)


WARNINGS = {
    "cosine floor equal to lr": ({"schedule": {"name": "cosine", "min_lr": 0.05}}, "the schedule is constant"),
    "step decay that never decays": ({"schedule": {"name": "step", "every_epochs": 3}}, "never decays"),
    "validation never runs": ({"val_every_epochs": 4}, "the stage reports no val_loss or val_acc"),
    "early stopping that cannot act": ({"early_stopping": {"patience": 3}},
                                       "early stopping has patience 3 but the stage validates only 3 times"),
    "an LR finder longer than the stage": ({"lr_finder": {"num_steps": 1000}},
                                           "stages[0].lr_finder.num_steps: lr_finder asks 1000 steps, but the stage's 3 "
                                           "epochs hold 48"),
}


@pytest.mark.parametrize("case", WARNINGS)
def test_legal_but_suspicious_settings_warn(nnopt, write_recipe, case):
    fields, fragment = WARNINGS[case]
    accepted(nnopt, write_recipe, recipe_with(EVALUATE, train=fields), fragment)


def test_warnings_are_recorded_in_run_json(nnopt, write_recipe, tmp_path):
    recipe = recipe_with(train={"epochs": 1, "schedule": {"name": "step", "every_epochs": 1}})
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert code == 0 and "warning" in err and "never decays" in " ".join(err.split())  # the console wraps lines
    recorded = json.loads((tmp_path / "out" / "tiny" / "run.json").read_text())["warnings"]
    assert len(recorded) == 1 and "stages[0].schedule.every_epochs" in recorded[0] and "never decays" in recorded[0]


# ---- expect rules some stage can satisfy ----------------------------------------------------------

EXPECT = {
    "test_error without an evaluate stage": ([], {"test_error": {"at_most": 0.1}},
                                             ["expect.metrics.test_error: no stage of this recipe reports `test_error`",
                                              "add `{name: evaluate, kind: evaluate}`"]),
    "test_error with an evaluate on val": ([{**EVALUATE, "split": "val"}], {"test_error": {"at_most": 0.1}},
                                           ["no stage of this recipe reports `test_error`"]),
    "latency_ratio with one evaluate": ([EVALUATE], {"latency_ratio": {"at_most": 0.5}},
                                        ["latency_ratio compares two latency measurements, but only stage `evaluate`"]),
    "a metric the stage never reports": ([EVALUATE], {"train.test_acc": {"at_least": 0.5}},
                                         ["stage `train` (train) does not report `test_acc`"]),
    "a layer the model does not have": ([PRUNE], {"prune.layer_sparsity_after.fc9.weight": {"at_least": 0.4}},
                                        ["the model has no layer `fc9.weight`"]),
    "an accuracy above 1": ([EVALUATE], {"evaluate.test_acc": {"at_least": 1.5}},
                            ["expect.metrics.evaluate.test_acc.at_least: `evaluate.test_acc` is a fraction in [0, 1]: "
                             ">= 1.5 can never hold"]),
    "latency_ratio without a common batch size": ([EVALUATE | {"latency_batch_sizes": [1]}, PRUNE,
                                                   EVALUATE | {"name": "final", "latency_batch_sizes": [32]}],
                                                  {"latency_ratio": {"at_most": 2}},
                                                  ["expect.metrics.latency_ratio: latency_ratio compares the first and the "
                                                   "last latency at a batch size both measured, but `evaluate` times "
                                                   "batches [1] and `final` [32]"]),
    "a metric compared with itself": ([EVALUATE], {"evaluate.test_acc": {"within": {"value": "evaluate.test_acc", "tolerance": 0.01}}},
                                      ["expect.metrics.evaluate.test_acc.within: `evaluate.test_acc` is compared with itself"]),
    "a negative error": ([EVALUATE], {"test_error": {"at_most": -0.1}}, ["`test_error` is a fraction in [0, 1]: <= -0.1"]),
}


@pytest.mark.parametrize("case", EXPECT)
def test_expect_rules_no_stage_can_satisfy(nnopt, write_recipe, case):
    stages, metrics, fragments = EXPECT[case]
    recipe = recipe_with(*stages, expect={"source": "a paper", "metrics": metrics})
    refused(nnopt, write_recipe, recipe, *fragments)


def test_satisfiable_expect_passes(nnopt, write_recipe):
    metrics = {"test_error": {"at_most": 0.5}, "latency_ratio": {"at_most": 2}, "weights_kept": {"at_most": 0.6},
               "prune.layer_sparsity_after.fc1.weight": {"at_least": 0.4}}
    accepted(nnopt, write_recipe, recipe_with(EVALUATE, PRUNE, EVALUATE | {"name": "final"},
                                              expect={"source": "a paper", "metrics": metrics}))


# ---- numbers and text at the edge ------------------------------------------------------------------


def test_a_5000_digit_seed_is_a_located_error(nnopt, write_recipe):
    text = "name: x\nseed: " + "9" * 5000 + "\n"
    err = refused(nnopt, write_recipe, text, ":2:7:", "a number of 5000 characters")
    assert len(err) < 1000


def test_seed_plus_stage_index_stays_a_valid_seed(nnopt, write_recipe):
    refused(nnopt, write_recipe, recipe_with(EVALUATE, seed=4294967295),
            "seed: seed 4294967295 is too large: stage 2 runs with seed + 1", "at most 4294967294")
    accepted(nnopt, write_recipe, recipe_with(EVALUATE, seed=4294967294))


@pytest.mark.parametrize("where", ["trainer", "evaluate"])
def test_threads_beyond_the_cores_are_refused(nnopt, write_recipe, where):
    recipe = recipe_with(EVALUATE)
    (recipe["trainer"] if where == "trainer" else recipe["stages"][1])["threads"] = 100000
    refused(nnopt, write_recipe, recipe, "threads 100000 is more than the")


@pytest.mark.parametrize("lr", [".inf", ".nan", "1e400"])
def test_learning_rates_are_finite(nnopt, write_recipe, lr):
    text = yaml.safe_dump(recipe_with(EVALUATE), sort_keys=False).replace("lr: 0.05", f"lr: {lr}")
    refused(nnopt, write_recipe, text, "stages[0].optimizer.lr", "finite number")


def test_a_learning_rate_beyond_float32_is_refused(nnopt, write_recipe):
    text = yaml.safe_dump(recipe_with(EVALUATE), sort_keys=False).replace("lr: 0.05", "lr: 1.0e+308")
    refused(nnopt, write_recipe, text, "stages[0].optimizer.lr: learning rate 1e+308 is beyond what torch's optimizers")


@pytest.mark.parametrize("field", ["data.name", "stages.0.kind", "model.args.huge_unknown"])
def test_a_5_mb_value_is_cut_in_the_message(nnopt, write_recipe, field):
    huge = "x" * 5_000_000
    path = write_recipe(recipe_with(EVALUATE))
    key = field if not field.endswith("huge_unknown") else "model.args." + huge
    code, _, err = nnopt("validate", path, "-o", f"{key}={huge}")
    assert code == 2 and len(err) < 3000 and "characters)" in err


def test_yaml_merge_keys_are_accepted(nnopt, write_recipe):
    text = """\
name: merged
model: {name: mlp, args: {hidden: [16], in_features: 32}}
data: {name: synthetic, batch_size: 32, args: {shape: [32], num_train: 256, num_val: 64, num_test: 64}}
stages:
  - &base {name: train, kind: train, epochs: 1, optimizer: {name: sgd, lr: 0.05}}
  - <<: *base
    name: more
    kind: finetune
"""
    path = write_recipe(text)
    code, out, err = nnopt("validate", path)
    assert code == 0 and "more (finetune)" in out, err


def bomb(levels: int) -> str:
    """A YAML alias bomb: `levels` lists of ten references each to the previous one (10**levels values)."""
    lines = ["[&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f", &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "".join(lines) + "]"


@pytest.mark.parametrize("value, fragment", [
    (bomb(7), "more than 200000 values"),
    ("[" * 100 + "]" * 100, "nests more than 64 levels"),
    ("9" * 5000, "a number of 5000 characters"),
    ("!!python/object/apply:os.system [echo hacked]", "YAML tag `!!python/object/apply:os.system` refused"),
])
def test_override_values_have_the_file_limits(nnopt, write_recipe, value, fragment):
    code, _, err = nnopt("validate", write_recipe(recipe_with(EVALUATE)), "-o", f"model.args.hidden={value}")
    err = " ".join(err.split())
    assert code == 2 and "Traceback" not in err and "override `model.args.hidden=" in err and fragment in err, err


def test_override_index_of_5000_digits(nnopt, write_recipe):
    code, _, err = nnopt("validate", write_recipe(recipe_with(EVALUATE)), "-o", "stages." + "9" * 5000 + ".epochs=1")
    assert code == 2 and "out of range" in err and len(err) < 1000


def test_a_stage_name_with_a_dot_is_refused(nnopt, write_recipe):
    recipe = recipe_with(EVALUATE)
    recipe["stages"][0]["name"] = "train.v2"
    refused(nnopt, write_recipe, recipe, "stages[0].name: a stage name cannot contain `.`")


# ---- degenerate results -----------------------------------------------------------------------------


def test_pruning_a_layer_to_nothing_is_refused_unless_meant(nnopt, write_recipe):
    prune = {"name": "prune", "kind": "prune", "sparsity": 0.9999}
    refused(nnopt, write_recipe, recipe_with(prune), "stages[1].sparsity: `fc2.weight` would keep none of its 320 "
            "weights", "allow_empty_layers: true")
    accepted(nnopt, write_recipe, recipe_with(prune | {"allow_empty_layers": True}))


def test_iterative_rounds_that_leave_nothing_are_refused(nnopt, write_recipe):
    rounds = {"name": "ip", "kind": "iterative_prune", "rounds": 12, "fraction": 0.6,
              "retrain": {"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01}}}
    refused(nnopt, write_recipe, recipe_with(rounds), "`fc2.weight` would keep none of its 320 weights after 12 rounds")


def test_pruning_a_layer_to_nothing_in_a_global_ranking_fails_the_stage(nnopt, write_recipe, tmp_path):
    prune = {"name": "prune", "kind": "prune", "scope": "global", "sparsity": 0.9999}
    code, _, err = nnopt("run", write_recipe(recipe_with(prune)), "-O", tmp_path / "out")
    err = " ".join(err.split())
    assert code == 1 and "stage `prune` failed: pruning left `fc1.weight`, `fc2.weight` without any weight" in err
    assert not (tmp_path / "out" / "tiny" / "02-prune" / "DONE").exists()
    code, _, err = nnopt("run", write_recipe(recipe_with(prune | {"allow_empty_layers": True})), "-O", tmp_path / "out")
    assert code == 0, err


# Stages whose settings cannot do what they say: (stages after train, model args, fragments).
STAGE_SETTINGS = {
    "sparsity 0": ([PRUNE | {"sparsity": 0.0}], {}, ["stages[1].sparsity: sparsity 0 prunes nothing"]),
    "a prune below an earlier one": ([PRUNE, FINETUNE, PRUNE | {"name": "again", "sparsity": 0.3}], {},
                                     ["stages[3].sparsity: sparsity 0.3 is not above the 0.5 stage `prune` left"]),
    "a codebook larger than its layer": ([{"name": "share", "kind": "quantize", "method": "weight_sharing", "bits": 8}],
                                         {"hidden": [4], "in_features": 32},
                                         ["stages[1].bits: 8 bits give `fc1.weight` a codebook of 256 values for its "
                                          "128 weights", "use at most 7 bits"]),
    "gradual pruning inside centroid fine-tuning": ([{"name": "share", "kind": "quantize", "method": "weight_sharing", "bits": 4,
                                                      "finetune": {"epochs": 3, "optimizer": {"name": "sgd", "lr": 0.01},
                                                                   "gradual_pruning": {"sparsity": 0.5, "end": {"epochs": 2},
                                                                                       "every": {"steps": 4}}}}], {},
                                                    ["stages[1].finetune.gradual_pruning: `quantize weight_sharing` cannot "
                                                     "prune gradually"]),
    "scope auto beyond its scan": ([{"name": "p", "kind": "prune", "scope": "auto", "sparsity": 0.95,
                                     "allocation": {"scan": {"sparsities": [0.5, 0.7]}}}], {},
                                   ["stages[1].sparsity: scope auto chooses each layer's sparsity among the scanned levels, "
                                    "and allocation.scan.sparsities holds none above 0.7: no mix of them reaches 0.95"]),
    "scope auto beyond a sensitivity stage's scan": ([{"name": "s", "kind": "sensitivity", "sparsities": [0.5], "examples": 64},
                                                      {"name": "p", "kind": "prune", "scope": "auto", "sparsity": 0.9,
                                                       "allocation": {"sensitivity": "s"}}], {},
                                                     ["stages[2].sparsity:", "stage `s` scanned none above 0.5"]),
    "a bytes budget below the codebooks": ([{"name": "share", "kind": "quantize", "method": "weight_sharing",
                                             "allocation": {"max_bytes": 1, "bits": [2, 4]}}], {},
                                           ["stages[1].allocation.max_bytes: max_bytes 1 is below what the 2 shared layers' "
                                            "codebooks alone take at 2 bits (32 bytes)"]),
    "a temperature whose square is 0 in float32": ([FINETUNE | {"distillation": {"teacher": "train", "temperature": 1e-30}}], {},
                                                   ["stages[1].distillation.temperature: temperature 1e-30: the soft term "
                                                    "is scaled by T^2 = 1e-60, which is 0 in float32"]),
    "an ONNX tolerance below float32's resolution": ([{"name": "x", "kind": "export", "formats": ["onnx"], "tolerance": 1e-9}],
                                                     {}, ["stages[1].tolerance: tolerance 1e-09 is below float32's "
                                                          "resolution"]),
    "gradual pruning below an earlier prune": ([PRUNE, FINETUNE | {"epochs": 3, "gradual_pruning": {
                                                    "sparsity": 0.3, "end": {"epochs": 2}, "every": {"steps": 4}}}], {},
                                               ["stages[2].gradual_pruning.sparsity: gradual pruning to 0.3 is not above the "
                                                "0.5 stage `prune` left"]),
    "a bits pattern an earlier one shadows": ([{"name": "share", "kind": "quantize", "method": "weight_sharing",
                                                "bits": {"*": 2, "fc1.weight": 6}}], {},
                                              ["stages[1].bits.fc1.weight: `fc1.weight` never applies: each layer it matches "
                                               "is also matched by a pattern before it, and the first match decides"]),
    "a sparsity pattern a later one overrides": ([PRUNE | {"sparsity": {"fc1": 0.9, "*": 0.5}}], {},
                                                 ["stages[1].sparsity.fc1: `fc1` never applies", "the last match decides"]),
    "an export format listed twice": ([{"name": "x", "kind": "export", "formats": ["torchscript", "torchscript"]}], {},
                                      ["stages[1].formats[1]: `torchscript` is listed twice in formats"]),
    "neuron pruning that empties a layer": ([PRUNE | {"granularity": "neurons", "sparsity": 0.9999}], {},
                                            ["stages[1].sparsity: sparsity 0.9999 would remove every neuron of `fc1` (32 of 32)"]),
    "neuron pruning of the classifier": ([PRUNE | {"granularity": "neurons", "sparsity": {"fc2": 0.5}}], {},
                                         ["stages[1].sparsity.fc2: `fc2` matches no layer whose neurons can be removed",
                                          "`fc2` produces the model's outputs, one per class"]),
    "ONNX of static int8 at the float tolerance": ([{"name": "q", "kind": "quantize", "method": "static_int8",
                                                     "calibration_batches": 2},
                                                    {"name": "x", "kind": "export", "formats": ["onnx"]}], {},
                                                   ["stages[2]: ONNX export of the static int8 model (made by stage `q`) "
                                                    "keeps the float default tolerance 0.0001"]),
    "keeping more weights than the model has": ([{"name": "p", "kind": "prune", "scope": "auto",
                                                   "allocation": {"keep_params": 10_000_000}}], {},
                                                 ["stages[1].allocation.keep_params: keep_params asks to keep 10,000,000 "
                                                  "weights, but the pruned layers have 1,344"]),
    "allocation bounds that match nothing": ([{"name": "p", "kind": "prune", "scope": "auto", "sparsity": 0.5,
                                               "allocation": {"bounds": {"conv*": [0.1, 0.5]}}}], {},
                                             ["stages[1].allocation.bounds.conv*: `conv*` matches no pruned layer",
                                              "pruned: fc1, fc1.weight, fc2, fc2.weight"]),
    "allocation bounds with a misspelt layer": ([{"name": "p", "kind": "prune", "scope": "auto", "sparsity": 0.5,
                                                  "allocation": {"bounds": {"fc11": [0.1, 0.5]}}}], {},
                                                ["stages[1].allocation.bounds.fc11: `fc11` matches no pruned layer",
                                                 "did you mean `fc1`?"]),
    "a bits pattern with a misspelt weight": ([{"name": "share", "kind": "quantize", "method": "weight_sharing",
                                                "bits": {"fc1.wieght": 4, "*": 2}}], {},
                                              ["stages[1].bits.fc1.wieght: `fc1.wieght` matches no parameter of the model",
                                               "did you mean `fc1.weight` or `fc2.weight`?"]),
    "an int8 skip the model lacks": ([{**QUANTIZE, "method": "static_int8", "calibration_batches": 2,
                                       "skip": ["fc2", "fc3"]}], {},
                                     ["stages[1].skip[1]: `fc3` is no layer of the model that static_int8 quantizes",
                                      "did you mean `fc2` or `fc1`?"]),
    "an int8 skip of a layer int8 leaves in float": ([QUANTIZE | {"skip": ["act1"]}], {},
                                                     ["stages[1].skip[0]: `act1` is a ReLU, which dynamic_int8 does not "
                                                      "quantize: it stays in float without `skip`",
                                                      "dynamic_int8 quantizes: fc1, fc2"]),
}


@pytest.mark.parametrize("case", STAGE_SETTINGS)
def test_stage_settings_that_cannot_work(nnopt, write_recipe, case):
    stages, model_args, fragments = STAGE_SETTINGS[case]
    recipe = recipe_with(*stages)
    recipe["model"]["args"].update(model_args)
    refused(nnopt, write_recipe, recipe, *fragments)


def test_pruning_further_after_an_earlier_prune_passes(nnopt, write_recipe):
    accepted(nnopt, write_recipe, recipe_with(PRUNE, FINETUNE, PRUNE | {"name": "again", "sparsity": 0.8}))


# ---- checks on every path: a stage that failed a check is never DONE on a rerun ----------------------

GRADUAL = {"sparsity": 0.6, "end": {"epochs": 1.5}, "every": {"steps": 4}}


def test_a_missed_gradual_target_fails_also_when_resuming_a_finished_fit(nnopt, write_recipe, tmp_path, monkeypatch):
    from runner.lightning import fit, gradual

    path, out = write_recipe(recipe_with(train={"epochs": 2, "gradual_pruning": GRADUAL})), tmp_path / "out"
    done = out / "tiny" / "01-train" / "DONE"
    # A pruner that reaches only half its targets, and a process that dies right after its fit, before the
    # check could discard the fit's checkpoint: the rerun finds a fit that is already over.
    targets_at = gradual.GradualPruning.targets_at
    monkeypatch.setattr(gradual.GradualPruning, "targets_at",
                        lambda self, step: {name: t / 2 for name, t in targets_at(self, step).items()})
    monkeypatch.setattr(fit, "forget_resume_point", lambda folder: None)
    code, _, err = nnopt("run", path, "-O", out)
    assert code == 1 and "instead of the target 0.6000" in err and not done.exists()
    monkeypatch.undo()
    code, text, err = nnopt("run", path, "-O", out)  # Lightning runs no hook for it: the check still does
    assert "resumes from its last checkpoint" in text
    assert code == 1 and "instead of the target 0.6000" in err and not done.exists()
    code, text, err = nnopt("run", path, "-O", out)  # the failed fit was discarded: trained again, and right
    assert code == 0 and "resumes" not in text and done.exists(), err


def test_early_stopping_before_the_gradual_end_fails_on_every_rerun(nnopt, write_recipe, tmp_path):
    # val_loss never improves by 10, so training stops after the second epoch (step 32), before the window's end.
    train = {"epochs": 4, "gradual_pruning": GRADUAL | {"end": {"epochs": 3.5}},
             "early_stopping": {"patience": 1, "min_delta": 10}}
    path, out = write_recipe(recipe_with(train=train)), tmp_path / "out"
    for attempt in range(2):
        code, text, err = nnopt("run", path, "-O", out)
        assert code == 1 and "training stopped at step 32, before gradual pruning reached its final sparsity" in err
        assert "resumes" not in text, f"attempt {attempt} resumed the early-stopped fit"
        assert not (out / "tiny" / "01-train" / "DONE").exists()


def test_training_that_ends_at_chance_fails_unless_meant(nnopt, write_recipe, tmp_path):
    frozen = {"epochs": 1, "optimizer": {"name": "sgd", "lr": 1e-9}}  # the weights barely move from their init
    code, _, err = nnopt("run", write_recipe(recipe_with(train=frozen)), "-O", tmp_path / "out")
    err = " ".join(err.split())
    assert code == 1 and "stage `train` failed: training ended at chance: validation accuracy" in err
    assert "(a guess gets 0.100)" in err and "allow_chance_accuracy: true" in err
    code, _, err = nnopt("run", write_recipe(recipe_with(train=frozen | {"allow_chance_accuracy": True})),
                         "-O", tmp_path / "out")
    assert code == 0, err
