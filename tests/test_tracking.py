"""Experiment tracking: loggers through Lightning (offline), user callbacks by `import:`, `keep: best`."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runner.lightning.keep import KeepBest
from tests.conftest import synthetic_recipe

ROOT = Path(__file__).resolve().parent.parent


def _metrics(run_dir: Path, folder: str) -> dict:
    return json.loads((run_dir / folder / "metrics.json").read_text())


def test_a_logger_whose_package_is_missing_is_a_located_error(nnopt, write_recipe, monkeypatch):
    import runner.recipe.tracking as tracking

    real = importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    recipe = synthetic_recipe()
    recipe["trainer"]["loggers"] = ["csv", "mlflow"]
    code, _, err = nnopt("validate", write_recipe(recipe))
    assert code == 2 and "trainer.loggers[1]" in err and "pip install mlflow" in err


CALLBACK = '''
import pytorch_lightning as pl

class CountEpochs(pl.Callback):
    def __init__(self, path, label):
        self.path, self.label = path, label

    def on_train_epoch_end(self, trainer, pl_module):
        with open(self.path, "a") as handle:
            handle.write(f"{self.label} {trainer.current_epoch}\\n")
'''


def test_loggers_callbacks_and_keep_best_in_one_run(nnopt, write_recipe, tmp_path):
    """One small run: a TensorBoard log next to the CSV one, a user callback with arguments, the best epoch kept."""
    (tmp_path / "my_callbacks.py").write_text(CALLBACK)
    seen = tmp_path / "seen.txt"
    recipe = synthetic_recipe(epochs=6, optimizer={"name": "sgd", "lr": 0.8, "momentum": 0.9},
                              keep={"epoch": "best", "monitor": "val_acc"})
    recipe["trainer"]["callbacks"] = [{"import": "my_callbacks:CountEpochs", "args": {"path": str(seen), "label": "x"}}]
    tensorboard = importlib.util.find_spec("tensorboard") is not None
    if tensorboard:
        recipe["trainer"]["loggers"] = ["csv", "tensorboard"]
    recipe["stages"][1]["split"] = "val"  # evaluate the handed-on model on the validation split
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert code == 0, err
    run_dir = tmp_path / "out" / "tiny"
    logs = run_dir / "01-train" / "logs"

    assert seen.read_text().split("\n")[:6] == [f"x {epoch}" for epoch in range(6)]

    kept = _metrics(run_dir, "01-train")["kept"]
    with open(logs / "metrics.csv") as handle:
        per_epoch = [float(row["val_acc"]) for row in csv.DictReader(handle) if row.get("val_acc")]
    assert len(per_epoch) == 6
    assert kept["val_acc"] == pytest.approx(max(per_epoch)) and kept["epoch"] == per_epoch.index(max(per_epoch)) + 1
    # the next stage measures exactly the kept epoch's weights
    assert _metrics(run_dir, "02-evaluate")["val_acc"] == pytest.approx(kept["val_acc"], abs=1e-6)

    if tensorboard:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(logs / "tensorboard")).Reload()
        assert [event.value for event in events.Scalars("val_acc")] == pytest.approx(per_epoch)

    recipe["trainer"]["callbacks"] = [{"import": "my_callbacks:CountEpoch"}]
    code, _, err = nnopt("validate", write_recipe(recipe))
    assert code == 2 and "trainer.callbacks[0]" in err and "CountEpochs" in err


def test_keep_best_state_survives_a_checkpoint_loaded_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    keeper = KeepBest("val_loss", "min")
    keeper.best_score, keeper.best_epoch = 0.25, 3
    keeper.best_state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"callbacks": {"KeepBest": keeper.state_dict()}}, tmp_path / "last.ckpt")
    restored = KeepBest("val_loss", "min")
    restored.load_state_dict(torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]["KeepBest"])
    other = torch.nn.Linear(3, 2)
    assert restored.restore(other) == {"epoch": 3, "val_loss": 0.25}
    assert torch.equal(other.weight, model.weight)


def test_lr_finder_short_of_batches_warns_saves_its_curve_and_prints_nothing_foreign(write_recipe, tmp_path):
    recipe = synthetic_recipe(epochs=1, lr_finder={"num_steps": 40})
    recipe["data"]["args"]["num_train"] = 768  # 24 batches of 32: the test asked for 40 steps
    from runner.recipe.stages import TrainStage

    if "allow_chance_accuracy" in TrainStage.model_fields:  # the rate found on 24 points is useless, as warned
        recipe["stages"][0]["allow_chance_accuracy"] = True
    done = subprocess.run([sys.executable, "-m", "runner", "run", str(write_recipe(recipe)), "-O", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "weights_only" not in output and "Finding best initial lr" not in output  # Lightning's, not ours
    assert "the LR finder ran 24 of 40 steps" in " ".join(done.stderr.split())
    stage = tmp_path / "out" / "tiny" / "01-train"
    curve = json.loads((stage / "lr_finder.json").read_text())
    assert len(curve["lr"]) == len(curve["loss"]) == 24 and curve["lr"] == sorted(curve["lr"])
    assert _metrics(tmp_path / "out" / "tiny", "01-train")["lr_finder"] == {"steps": 24, "steps_asked": 40}
    assert (stage / "lr_finder.png").stat().st_size > 0
