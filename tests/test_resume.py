"""Exact resume: a training stage interrupted after a checkpoint continues from it and ends bit-identical
to a run that was never interrupted."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from runner.cli import main
from tests.conftest import (building_folder, interrupt_after_checkpoint, kill_at_step, mnist_recipe, read_metrics,
                            run_straight_and_resumed, synthetic_recipe, timing, untimed_metrics)


def resumable_recipe() -> dict:
    # Dropout draws from the global RNG, momentum and the schedule carry state: all three must resume.
    recipe = synthetic_recipe(epochs=3, warmup={"steps": 6}, schedule={"name": "cosine"},
                              early_stopping={"patience": 5})
    recipe["model"]["args"]["dropout"] = 0.3
    recipe["trainer"]["checkpoint"] = {"every_n_steps": 8, "every_n_epochs": 1}  # 16 batches per epoch
    return recipe


def results(run_dir) -> tuple[dict, dict, dict]:
    train, evaluate = untimed_metrics(run_dir, "01-train"), untimed_metrics(run_dir, "02-evaluate")
    return train, evaluate, torch.load(run_dir / "01-train" / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, dict, dict]:
    folder = tmp_path_factory.mktemp("straight")
    (folder / "recipe.yaml").write_text(yaml.safe_dump(resumable_recipe()))
    assert main(["run", str(folder / "recipe.yaml"), "-O", str(folder)]) == 0
    return results(folder / "tiny")


@pytest.mark.parametrize("count", [2, 3, 4, 10],
                         ids=["step16-before-validation", "end-of-epoch0", "mid-epoch1", "after-the-fit"])
def test_interrupted_training_resumes_bit_identical(nnopt, write_recipe, tmp_path, monkeypatch, uninterrupted, count):
    recipe, expected = write_recipe(resumable_recipe()), uninterrupted

    with monkeypatch.context() as patch:
        saved = interrupt_after_checkpoint(patch, count)
        code, _, err = nnopt("run", recipe, "-O", tmp_path / "interrupted")
    assert code == 130 and f"nnopt run {recipe} -O {tmp_path / 'interrupted'}" in err
    run_dir = tmp_path / "interrupted" / "tiny"
    assert not (run_dir / "01-train").exists() and (building_folder(run_dir, recipe) / "checkpoint" / "last.ckpt").is_file()

    code, out, _ = nnopt("run", recipe, "-O", tmp_path / "interrupted")
    assert code == 0 and f"train (train): unfinished: resumes from its last checkpoint at step {saved[-1]}" in out
    train, evaluate, weights = results(run_dir)
    assert read_metrics(run_dir, "01-train")["resumed"] is True
    assert (train, evaluate) == expected[:2]
    assert weights.keys() == expected[2].keys() and all(torch.equal(weights[k], expected[2][k]) for k in weights)
    assert not (run_dir / "01-train" / "checkpoint").exists()  # superseded by the finished artifact
    assert not building_folder(run_dir, recipe).exists()  # moved whole into the store


def test_gradual_pruning_resumes_with_its_masks_schedule_and_generator(nnopt, write_recipe, tmp_path, monkeypatch):
    recipe = resumable_recipe()
    # Random selection draws from the callback's own generator: its state must come back too.
    recipe["stages"][0]["gradual_pruning"] = {"sparsity": 0.8, "start": {"steps": 4}, "end": {"steps": 40},
                                              "every": {"steps": 4}, "method": "random"}
    run = run_straight_and_resumed(nnopt, monkeypatch, write_recipe(recipe), tmp_path,
                                   checkpoints=4)  # step 24: 6 of the 10 pruning events done
    straight, resumed = run.straight, run.resumed
    for folder in ("01-train", "02-evaluate"):
        assert untimed_metrics(resumed, folder) == untimed_metrics(straight, folder)
    assert len(read_metrics(resumed, "01-train")["gradual_pruning"]["pruned_at_steps"]) == 10
    weights = torch.load(resumed / "01-train" / "model.pt", weights_only=True)
    expected = torch.load(straight / "01-train" / "model.pt", weights_only=True)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)


def test_iterative_pruning_resumes_inside_its_rounds(nnopt, write_recipe, tmp_path, monkeypatch):
    recipe = resumable_recipe()
    recipe["stages"][0]["epochs"] = 1  # 4 checkpoints: steps 8, 16, end of epoch 0, end of the fit
    retrain = {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9}}
    recipe["stages"].insert(1, {"name": "rounds", "kind": "iterative_prune", "rounds": 2, "fraction": 0.5,
                                "rewind": "init", "retrain": retrain})
    run = run_straight_and_resumed(nnopt, monkeypatch, write_recipe(recipe), tmp_path,
                                   checkpoints=4 + 7 + 7 + 4)  # round 0 and 1 done (7 each), round 2 at step 24
    assert run.saved_after == [32, 32, 32]  # only round 2 trains again, from step 24: step 32, end of epoch 1, of fit
    assert ("rounds (iterative_prune): unfinished: resumes from its last checkpoint at "
            "round-0 step 32 (epoch 2), round-1 step 32 (epoch 2), round-2 step 24 (epoch 1)") in run.out
    straight, resumed = run.straight, run.resumed
    assert read_metrics(resumed, "02-rounds")["rounds"][1]["steps"] == 32
    for folder in ("02-rounds", "03-evaluate"):
        expected, got = untimed_metrics(straight, folder), untimed_metrics(resumed, folder)
        assert {k: v for k, v in got.items() if k not in ("dense", "rounds")} == \
            {k: v for k, v in expected.items() if k not in ("dense", "rounds")}
        for key in ("dense", "rounds"):
            if key in expected:
                assert _untimed(got[key]) == _untimed(expected[key])


def _untimed(metrics):
    if isinstance(metrics, list):
        return [_untimed(m) for m in metrics]
    return {k: v for k, v in metrics.items() if not timing(k)}


def test_force_starts_an_interrupted_stage_afresh(nnopt, write_recipe, tmp_path, monkeypatch):
    path = write_recipe(resumable_recipe())
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, 4)
        assert nnopt("run", path, "-O", tmp_path / "out")[0] == 130
    with monkeypatch.context() as patch:
        saved = interrupt_after_checkpoint(patch, 0)  # count only
        code, out, _ = nnopt("run", path, "-O", tmp_path / "out", "--force")
    assert code == 0 and "train (train): --force" in out and saved[0] == 8
    assert "resumed" not in read_metrics(tmp_path / "out" / "tiny", "01-train")


def test_checkpoint_of_another_config_is_not_resumed(nnopt, write_recipe, tmp_path, monkeypatch):
    recipe = resumable_recipe()
    with monkeypatch.context() as patch:
        interrupt_after_checkpoint(patch, 2)
        assert nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")[0] == 130
    recipe["stages"][0]["optimizer"]["lr"] = 0.02
    code, out, _ = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert code == 0 and "train (train): new" in out  # config A's checkpoints stay in its own build folder
    assert "resumed" not in read_metrics(tmp_path / "out" / "tiny", "01-train")


def test_finetune_of_a_pruned_model_resumes_with_its_masks(nnopt, write_recipe, tmp_path, monkeypatch):
    recipe = resumable_recipe()
    recipe["stages"][0]["epochs"] = 2  # 7 checkpoints: steps 8, 16, end of epoch 0, 24, 32, end of epoch 1, of fit
    finetune = {"name": "finetune", "kind": "finetune", "epochs": 2, "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9}}
    recipe["stages"][1:1] = [{"name": "prune", "kind": "prune", "sparsity": 0.8, "scope": "global"}, finetune]
    run = run_straight_and_resumed(nnopt, monkeypatch, write_recipe(recipe), tmp_path,
                                   checkpoints=7 + 4)  # finetune's step 24, mid-epoch 1
    assert "finetune (finetune): unfinished: resumes from its last checkpoint at step 24" in run.out

    straight, resumed = run.straight, run.resumed
    for folder in ("03-finetune", "04-evaluate"):
        assert untimed_metrics(resumed, folder) == untimed_metrics(straight, folder)
    assert read_metrics(resumed, "04-evaluate")["sparsity"] > 0.5
    weights = torch.load(resumed / "03-finetune" / "model.pt", weights_only=True)
    expected = torch.load(straight / "03-finetune" / "model.pt", weights_only=True)
    assert any(".mask" in key for key in weights)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)


def test_qat_resumes_with_frozen_observers_and_batchnorm(nnopt, write_recipe, tmp_path, monkeypatch):
    recipe = resumable_recipe()
    recipe["model"] = {"import": "tests.models:conv_bn"}
    recipe["data"]["args"]["shape"] = [1, 8, 8]
    recipe["stages"][0]["epochs"] = 1  # 4 checkpoints: steps 8, 16, end of epoch 0, end of the fit
    qat = {"name": "qat", "kind": "quantize", "method": "qat", "epochs": 2, "optimizer": {"name": "sgd", "lr": 0.01},
           "freeze_observers_after": {"steps": 4}, "freeze_batchnorm_after": {"steps": 12}}
    recipe["stages"].insert(1, qat)
    run = run_straight_and_resumed(nnopt, monkeypatch, write_recipe(recipe), tmp_path,
                                   checkpoints=4 + 4)  # QAT's step 24: observers and BatchNorm frozen before it
    assert "qat (quantize): unfinished: resumes from its last checkpoint at step 24" in run.out, run.err
    for folder in ("02-qat", "03-evaluate"):
        assert untimed_metrics(run.resumed, folder) == untimed_metrics(run.straight, folder)


def nnopt_process(recipe, out_dir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runner", "run", str(recipe), "-O", str(out_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_matches_an_uninterrupted_run(write_recipe, tmp_path):
    train = {"name": "train", "kind": "train", "epochs": 2, "schedule": {"name": "cosine"},
             "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True}}
    evaluate = {"name": "evaluate", "kind": "evaluate", "latency_batch_sizes": [1], "latency_repeats": 3}
    recipe = mnist_recipe([train, evaluate], train_limit=4000, model={"name": "mlp", "args": {
        "hidden": [300, 100], "in_features": 784, "dropout": 0.2}})
    recipe["trainer"].update(checkpoint={"every_n_steps": 10}, threads=1)  # 63 steps per epoch
    path = write_recipe(recipe)
    straight = nnopt_process(path, tmp_path / "straight")  # runs while the other one is killed and resumed

    victim = nnopt_process(path, tmp_path / "killed")
    stage = tmp_path / "killed" / "mnist_small" / "01-train"
    position = building_folder(tmp_path / "killed" / "mnist_small", path) / "checkpoint" / "last.json"
    kill_at_step(victim, position, 70)  # into the second epoch
    assert not (stage / "DONE").exists()

    resumed = nnopt_process(path, tmp_path / "killed")
    out = resumed.communicate()[0]
    assert resumed.returncode == 0, out
    assert "train (train): unfinished: resumes from its last checkpoint at step" in out
    assert straight.wait() == 0, straight.stdout.read()
    for folder in ("01-train", "02-evaluate"):
        assert untimed_metrics(tmp_path / "killed" / "mnist_small", folder) == \
            untimed_metrics(tmp_path / "straight" / "mnist_small", folder)
    weights = torch.load(stage / "model.pt", weights_only=True)
    reference = torch.load(tmp_path / "straight" / "mnist_small" / "01-train" / "model.pt", weights_only=True)
    assert all(torch.equal(weights[k], reference[k]) for k in reference)
