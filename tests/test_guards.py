"""Guards: a diverging loss, a full disk, an unwritable or linked output folder and tampered files all end
in a clear message and an exit code, never a traceback, and never cost finished stages."""

from __future__ import annotations

import ast
import errno
import os
import pickle
import signal
from pathlib import Path

import pytest

import runner
from runner.artifacts import CHECKPOINT_OWNER, CHECKPOINTS, LAST_CHECKPOINT
from runner.plan import fingerprints
from runner.recipe import load_recipe
from tests.conftest import building_folder, synthetic_recipe


def two_trainings(second_lr: float) -> dict:
    recipe = synthetic_recipe(epochs=1)
    recipe["stages"].insert(1, {"name": "again", "kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": second_lr}})
    return recipe


def test_absurd_learning_rate_stops_the_stage_and_keeps_earlier_ones(nnopt, write_recipe, tmp_path):
    code, _, err = nnopt("run", write_recipe(two_trainings(second_lr=1e12)), "-O", tmp_path / "out")
    assert code == 1 and "stage `again` failed: the training loss is" in err and "at step" in err
    assert "learning rate 1e+12" in err and "lower `optimizer.lr`" in err and "Traceback" not in err
    run_dir = tmp_path / "out" / "tiny"
    assert (run_dir / "01-train" / "DONE").is_file() and not (run_dir / "02-again" / "DONE").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Lightning's handling undone


def test_full_disk_is_a_clear_error_and_leaves_no_half_files(nnopt, write_recipe, tmp_path, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    code, _, err = nnopt("run", write_recipe(synthetic_recipe(epochs=1)), "-O", tmp_path / "out")
    assert code == 1 and "the disk is full" in err and "rerun to continue" in err
    assert not (tmp_path / "out" / "tiny" / "01-train").exists() and not list((tmp_path / "out").rglob("*.tmp"))


def test_unwritable_output_folder_is_a_clear_error(nnopt, write_recipe, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = nnopt("run", write_recipe(synthetic_recipe(epochs=1)), "-O", blocker / "out")
    err = " ".join(err.split())  # the console wraps at 80 columns, where depends on the temp folder's length
    assert code == 1 and "cannot write" in err and "choose a writable output folder with -O" in err


@pytest.mark.parametrize("linked", ["tiny", "tiny/01-train"])
def test_run_or_stage_folder_linked_outside_is_refused(nnopt, write_recipe, tmp_path, linked):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "thesis.tex").write_text("years of work")
    (tmp_path / "out" / linked).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "out" / linked).symlink_to(outside)
    code, _, err = nnopt("run", write_recipe(synthetic_recipe(epochs=1)), "-O", tmp_path / "out")
    assert code == 1 and "is a symbolic link" in err
    assert [p.name for p in outside.iterdir()] == ["thesis.tex"] and (outside / "thesis.tex").read_text() == "years of work"


class _Exploit:
    """What a malicious file would carry: unpickling it runs code (here, it creates a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_tampered_checkpoint_and_artifact_never_run_code(nnopt, write_recipe, tmp_path):
    recipe, marker = synthetic_recipe(epochs=1), tmp_path / "pwned"
    path = write_recipe(recipe)
    assert nnopt("run", path, "-O", tmp_path / "out")[0] == 0
    train, building = tmp_path / "out" / "tiny" / "01-train", building_folder(tmp_path / "out" / "tiny", path)
    # A poisoned checkpoint where a resumable one would be (with the right owner mark) is dropped...
    (train / "DONE").unlink()
    (building / CHECKPOINTS).mkdir(parents=True)
    (building / CHECKPOINTS / CHECKPOINT_OWNER).write_text(fingerprints(load_recipe(path))[0])
    (building / CHECKPOINTS / LAST_CHECKPOINT).write_bytes(pickle.dumps({"state_dict": _Exploit(marker)}))
    code, out, err = nnopt("run", path, "-O", tmp_path / "out")
    assert code == 0 and "resumes from its last checkpoint" in out and not marker.exists()
    assert "not resuming from" in err and "does not load as plain tensors (UnpicklingError)" in err
    # ... and a poisoned model in a finished stage stops the next stage with a message.
    (train / "model.pt").write_bytes(pickle.dumps(_Exploit(marker)))
    code, _, err = nnopt("run", path, "-O", tmp_path / "out", "--from", "evaluate")
    err = " ".join(err.split())  # rich wraps long paths
    assert code == 1 and "does not load" in err and "--from train" in err and not marker.exists()


def test_every_torch_load_is_weights_only():
    calls = []
    for source in Path(runner.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "load_checkpoint", "pl_load"):
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls.append((source.name, keywords.get("weights_only")))
    assert calls and all(value == "True" for _, value in calls), calls


@pytest.mark.parametrize("field, value", [("name", "../escaped"), ("name", ".hidden"), ("name", "/tmp/abs"),
                                          ("stage", "../../etc"), ("stage", "a/b"), ("stage", "")])
def test_names_cannot_leave_the_output_folder(nnopt, write_recipe, tmp_path, field, value):
    recipe = synthetic_recipe(epochs=1)
    if field == "name":
        recipe["name"] = value
    else:
        recipe["stages"][0]["name"] = value
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert code == 2 and ("should match pattern" in err or "at least 1 character" in err)
    assert not (tmp_path / "out").exists()


def test_absurd_model_size_is_an_out_of_memory_message(nnopt, write_recipe, tmp_path):
    recipe = synthetic_recipe(epochs=1)
    recipe["model"]["args"]["hidden"] = [10**11]  # valid by the schema; 12.8 TB of weights
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert code == 1 and "out of memory" in err and "smaller model" in err and "Traceback" not in err
