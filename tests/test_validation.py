"""Every bad input a user can hit gets a located error, exit code 2, and no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import synthetic_recipe


def assert_clean_error(code, err, *fragments):
    """Exit 2, no traceback, each fragment in the message read as one line: the console wraps long lines, at
    points that move with the length of the temp folder's path in them."""
    assert code == 2, err
    assert "Traceback" not in err
    flat = " ".join(err.split())
    for fragment in fragments:
        assert " ".join(fragment.split()) in flat, f"{fragment!r} not in:\n{err}"


BAD_RECIPE = """\
name: bad
model: {name: lenet300}
data: {name: synthetic, batch_sise: 12}
stages:
  - name: train
    kind: train
    epoch: 3
    optimizer: {name: sgd, lr: -1}
    schedule: {name: cosin}
  - name: other
    kind: evaluat
"""


def test_several_errors_each_with_line_column_field_and_hint(write_recipe, nnopt):
    path = write_recipe(BAD_RECIPE)
    code, _, err = nnopt("validate", path)
    assert_clean_error(
        code, err, "6 problems",
        f"{path}:2:9: model.name: unknown model `lenet300`", "did you mean `lenet_300_100`?",
        f"{path}:3:25: data.batch_sise: unknown field `batch_sise`", "did you mean `batch_size`?",
        f"{path}:7:5: stages[0].epoch: unknown field `epoch`", "did you mean `epochs`?",
        f"{path}:8:28: stages[0].optimizer.lr: Input should be greater than 0",
        f"{path}:9:16: stages[0].schedule.name: unknown name `cosin`", "did you mean `cosine`?",
        f"{path}:11:5: stages[1].kind: unknown kind `evaluat`", "did you mean `evaluate`?",
    )


@pytest.mark.parametrize("text, fragments", [
    ("", ["the recipe is empty"]),
    ("name: x\nmodel: [1, 2\n", ["YAML syntax error", ":3:1"]),
    ("name: x\nname: y\n", [":2:1: duplicate key `name` (first at line 1)"]),
    ("name: x\nmodel: !!python/object/apply:os.system [echo hacked]\n", ["YAML tag `!!python/object/apply:os.system` refused"]),
    ("- just\n- a list\n", ["a recipe must be a mapping"]),
])
def test_unreadable_yaml(write_recipe, nnopt, text, fragments):
    code, _, err = nnopt("validate", write_recipe(text))
    assert_clean_error(code, err, *fragments)


def test_missing_file_and_directory(tmp_path, nnopt):
    code, _, err = nnopt("validate", tmp_path / "nope.yaml")
    assert_clean_error(code, err, "nope.yaml: no such file")
    code, _, err = nnopt("run", tmp_path)
    assert_clean_error(code, err, "this is a directory")


def _with(recipe: dict, path: tuple, value) -> dict:
    node = recipe
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return recipe


@pytest.mark.parametrize("path, value, fragments", [
    (("stages", 0, "epochs"), "three", ["stages[0].epochs", "valid integer"]),
    (("stages", 0, "epochs"), -1, ["stages[0].epochs", "greater than 0"]),
    (("stages", 0, "optimizer", "momentum"), 1.5, ["stages[0].optimizer.momentum", "less than 1"]),
    (("stages", 0, "optimizer", "name"), "sgdd", ["unknown name `sgdd`", "did you mean `sgd`?"]),
    (("data", "name"), "mnsit", ["data.name: unknown data set `mnsit`", "did you mean `mnist`?"]),
    (("model", "args", "hiden"), [3], ["model.args.hiden: unknown argument `hiden`", "did you mean `hidden`?"]),
    (("model", "args", "activation"), "gelu", ["model.args.activation"]),
    (("stages", 1, "name"), "train", ["stages[1].name: duplicate stage name `train`"]),
    (("stages", 0, "name"), "../escape", ["stages[0].name", "should match pattern"]),
    (("trainer", "precision"), "16", ["trainer.precision", "expected one of"]),
    (("stages", 0, "regularization"), [{"l1": 0.01, "params": ["fc9.weight"]}],
     ["stages[0].regularization[0].params[0]: `fc9.weight` matches no parameter"]),
    (("stages", 0, "schedule"), {"name": "piecewise", "boundaries": [10, 20], "values": [0.1, 0.01, 0.001, 0.0001]},
     ["stages[0].schedule", "need one more value than boundaries"]),
    (("stages", 0, "steps"), 10, ["give exactly one of `epochs` or `steps`"]),
])
def test_bad_values_are_located(write_recipe, nnopt, path, value, fragments):
    recipe_path = write_recipe(_with(synthetic_recipe(), path, value))
    code, _, err = nnopt("validate", recipe_path)
    assert_clean_error(code, err, str(recipe_path) + ":", *fragments)


def test_override_errors_name_the_override(write_recipe, nnopt):
    path = write_recipe(synthetic_recipe())
    code, _, err = nnopt("validate", path, "-o", "stages.train.optimizer.lr=abc")
    assert_clean_error(code, err, "stages[0].optimizer.lr", "set by override `stages.train.optimizer.lr=abc`")
    code, _, err = nnopt("validate", path, "-o", "stages.nosuch.epochs=1")
    assert_clean_error(code, err, "no list item named `nosuch`")
    code, _, err = nnopt("validate", path, "-o", "justakey")
    assert_clean_error(code, err, "is not `key.path=value`")


def test_overrides_apply_before_validation(write_recipe, nnopt):
    path = write_recipe(synthetic_recipe())
    code, out, _ = nnopt("validate", path, "-o", "stages.train.epochs=1", "-o", "stages.1.split=val")
    assert code == 0 and "ok" in out


def test_an_override_into_a_block_left_at_its_default_starts_from_the_default(write_recipe, nnopt):
    """`loss` is left out (cross-entropy, a discriminated union's default): setting one field inside it keeps the
    default's variant, in a train stage as in a QAT quantize stage (a union inside the stage union); a misspelt
    field there is still located, with the override and a did-you-mean."""
    from runner.recipe import load_recipe
    from runner.recipe.training import CrossEntropy

    recipe = synthetic_recipe()
    recipe["stages"].insert(1, {"name": "qat", "kind": "quantize", "method": "qat", "epochs": 1,
                                "optimizer": {"name": "sgd", "lr": 0.01}})
    path = write_recipe(recipe)
    loaded = load_recipe(path, ["stages.train.loss.label_smoothing=0.1", "stages.qat.loss.label_smoothing=0.2"])
    assert loaded.stages[0].loss == CrossEntropy(name="cross_entropy", label_smoothing=0.1)
    assert loaded.stages[1].loss == CrossEntropy(name="cross_entropy", label_smoothing=0.2)
    code, _, err = nnopt("validate", path, "-o", "stages.qat.loss.label_smoting=0.1")
    assert_clean_error(code, err, f"{path}:", "stages[1].loss.label_smoting: unknown field `label_smoting`",
                       "set by override `stages.qat.loss.label_smoting=0.1`", "did you mean `label_smoothing`?")


def test_cli_process_prints_no_traceback(write_recipe):
    """The real console script path: a separate process, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "runner", "validate", str(write_recipe(BAD_RECIPE))],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "unknown field `epoch`" in done.stderr


def test_a_crash_in_user_code_is_a_short_message(write_recipe, nnopt, tmp_path, monkeypatch):
    """`import:` code that fails gets a one-screen message naming its place, not a traceback: the forward pass
    fails on the run's dry build of the model, before any stage."""
    (tmp_path / "broken_models.py").write_text(
        "import torch\n"
        "class Broken(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(32, 10)\n"
        "    def forward(self, x):\n"
        "        raise IndexError('class 12 out of range')\n"
        "def build():\n"
        "    return Broken()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = synthetic_recipe()
    recipe["model"] = {"import": "broken_models:build"}
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    err = " ".join(err.split())
    assert code == 2 and "Traceback" not in err and not (tmp_path / "out").exists()
    assert "forward pass fails" in err and "IndexError: class 12 out of range (at broken_models.py:7)" in err
