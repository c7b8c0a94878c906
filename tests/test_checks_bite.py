"""Settings and guards that a do-nothing implementation would also pass, checked by their effect on a run:
the validation interval, the LR finder's rate in training, a stage's precision, fine-tuning's revived-weight check."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import read_metrics, synthetic_recipe

# A user callback, imported from the recipe's folder as a user's would be (trainer.callbacks).
CALLBACKS = '''
import json
import pytorch_lightning as pl
import torch


class RecordStepDtype(pl.Callback):
    """Appends, per fit, the dtype of the first layer's output in the first training step and whether autocast is on."""

    def __init__(self, path):
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            first = next(m for m in pl_module.model.modules() if isinstance(m, torch.nn.Linear))
            self.hook = first.register_forward_hook(self._record)

    def _record(self, module, inputs, output):
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"dtype": str(output.dtype),
                                     "autocast": torch.is_autocast_enabled("cpu")}) + "\\n")
        self.hook.remove()


class BreakMasks(pl.Callback):
    """At the end of a fit of a pruned model, bring one pruned weight back: reopen its mask, or write into the
    stored weight under the mask. A buggy callback, optimizer or strategy could do the same."""

    def __init__(self, how):
        self.how = how

    @torch.no_grad()
    def on_train_end(self, trainer, pl_module):
        for module in pl_module.model.modules():
            parametrizations = getattr(module, "parametrizations", None)
            if parametrizations is None or "weight" not in parametrizations:
                continue
            mask = parametrizations["weight"][0].mask
            pruned = (~mask).nonzero()[0].tolist()
            if self.how == "reopen_mask":
                mask[tuple(pruned)] = True
            else:
                parametrizations["weight"].original[tuple(pruned)] = 0.5
            return
'''


def _run(nnopt, write_recipe, tmp_path: Path, recipe: dict) -> Path:
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert code == 0, err
    return tmp_path / "out" / recipe["name"]


def _logged(stage_dir: Path, column: str) -> list[dict]:
    """The rows of the stage's CSV log that hold `column`."""
    with open(stage_dir / "logs" / "metrics.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get(column)]


def test_validation_runs_only_every_val_every_epochs(nnopt, write_recipe, tmp_path):
    """4 epochs validated every 2: after epochs 2 and 4 (0-based 1 and 3), not after 1 or 3."""
    run_dir = _run(nnopt, write_recipe, tmp_path, synthetic_recipe(epochs=4, val_every_epochs=2))
    validated = _logged(run_dir / "01-train", "val_loss")
    assert [int(row["epoch"]) for row in validated] == [1, 3]
    assert {int(row["epoch"]) for row in _logged(run_dir / "01-train", "train_loss")} == {0, 1, 2, 3}


def test_training_runs_at_the_rate_the_lr_finder_found(nnopt, write_recipe, tmp_path):
    """The finder's suggestion (lr_finder.json) is lr_found, differs from the recipe's 0.05, and is the rate of
    every optimizer step (constant schedule: the lr monitor's log and final_lr)."""
    recipe = synthetic_recipe(epochs=2, lr_finder={"num_steps": 20})
    recipe["trainer"]["log_every_n_steps"] = 1
    run_dir = _run(nnopt, write_recipe, tmp_path, recipe)
    metrics = read_metrics(run_dir, "01-train")
    suggestion = json.loads((run_dir / "01-train" / "lr_finder.json").read_text())["suggestion"]
    assert metrics["lr_found"] == pytest.approx(suggestion, rel=1e-12)
    assert metrics["lr_found"] != pytest.approx(recipe["stages"][0]["optimizer"]["lr"], rel=1e-3)
    stepped = [float(row["lr-SGD"]) for row in _logged(run_dir / "01-train", "lr-SGD")]
    assert stepped and stepped == [pytest.approx(metrics["lr_found"], rel=1e-12)] * len(stepped)
    assert metrics["final_lr"] == pytest.approx(metrics["lr_found"], rel=1e-12)


def test_a_stage_precision_is_the_dtype_its_steps_compute_in(nnopt, write_recipe, tmp_path):
    """Run-wide 32-true; the train stage says bf16-mixed, the finetune after it says nothing: the first
    layer's output is bfloat16 under autocast in train's steps, float32 in finetune's."""
    (tmp_path / "my_callbacks.py").write_text(CALLBACKS)
    seen = tmp_path / "dtypes.jsonl"
    recipe = synthetic_recipe(epochs=2, trainer={"precision": "bf16-mixed"})
    recipe["trainer"]["callbacks"] = [{"import": "my_callbacks:RecordStepDtype", "args": {"path": str(seen)}}]
    recipe["stages"].insert(1, {"name": "finetune", "kind": "finetune", "epochs": 1,
                                "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}})
    _run(nnopt, write_recipe, tmp_path, recipe)
    assert [json.loads(line) for line in seen.read_text().splitlines()] == [
        {"dtype": "torch.bfloat16", "autocast": True}, {"dtype": "torch.float32", "autocast": False}]


@pytest.mark.parametrize("how", ["reopen_mask", "write_under_mask"])
def test_finetune_fails_when_a_pruned_weight_comes_back(nnopt, write_recipe, tmp_path, how):
    (tmp_path / "my_callbacks.py").write_text(CALLBACKS)
    recipe = synthetic_recipe(epochs=2)
    recipe["trainer"]["callbacks"] = [{"import": "my_callbacks:BreakMasks", "args": {"how": how}}]
    recipe["stages"][1:1] = [{"name": "prune", "kind": "prune", "sparsity": 0.5},
                             {"name": "finetune", "kind": "finetune", "epochs": 1,
                              "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9}}]
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    message = " ".join(err.split())
    assert code != 0 and "finetune" in message, message
    assert "pruned weights came back during fine-tuning: fc1.weight" in message, message
    assert not (tmp_path / "out" / "tiny" / "03-finetune" / "DONE").exists()
