"""Accelerators and distributed runs: 2-process DDP on CPU equals one process, bf16, rejected combinations."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runner.modelio import load_model
from runner.distributed import state_digest
from runner.recipe.devices import Machine
from tests.conftest import read_metrics, synthetic_recipe
from tests.test_validation import assert_clean_error

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None, check=True) -> subprocess.CompletedProcess:
    """The CLI in a fresh process: Lightning's ddp launcher re-executes sys.argv, so never in-process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([sys.executable, "-m", "runner", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def files_under(folder: Path) -> list[str]:
    """Every file's path, with stage fingerprints (which hash the trainer settings) left out of store paths."""
    return sorted(re.sub(r"[0-9a-f]{16}", "<fingerprint>", str(p.relative_to(folder)))
                  for p in folder.rglob("*") if p.is_file())


def assert_same_metrics(one: dict, two: dict, keys) -> None:
    for key in keys:
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


def prune_recipe() -> dict:
    """train with gradual pruning to 50% -> prune (one-shot, global magnitude) to 80% -> finetune distilled from
    the trained model -> evaluate."""
    recipe = synthetic_recipe(epochs=2, regularization=[{"l1": 1e-4}],
                              gradual_pruning={"sparsity": 0.5, "scope": "global", "end": {"fraction": 0.7},
                                               "every": {"steps": 4}})
    recipe["stages"][1:1] = [
        {"name": "prune", "kind": "prune", "scope": "global", "sparsity": 0.8},
        {"name": "finetune", "kind": "finetune", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
         "distillation": {"teacher": "train", "temperature": 3.0, "alpha": 0.8}},
    ]
    return recipe


def test_two_process_ddp_equals_one_process_on_the_same_global_batch(write_recipe, nnopt, tmp_path):
    """Distillation included: each rank loads the teacher stage itself and scores its own half of every batch."""
    path = write_recipe(prune_recipe())
    code, _, err = nnopt("run", path, "-O", tmp_path / "one")
    assert code == 0, err
    run_cli("run", path, "-O", tmp_path / "two", "-o", "trainer.strategy=ddp", "-o", "trainer.devices=2")

    one, two = tmp_path / "one" / "tiny", tmp_path / "two" / "tiny"
    assert files_under(two) == files_under(one)  # one set of artifacts, written by rank 0 alone
    assert [p.name for p in (tmp_path / "two").iterdir()] == ["tiny"]
    for stage in ("01-train", "03-finetune"):
        single, ddp = read_metrics(one, stage), read_metrics(two, stage)
        assert ddp["steps"] == single["steps"] > 0
        assert_same_metrics(single, ddp, ["train_loss", "val_loss", "val_acc"])
        # Both ranks ended training with the model rank 0 saved, pruning masks included.
        assert ddp["rank_digests"] == [state_digest(load_model(two / stage))] * 2
        assert "rank_digests" not in single
        # Each rank trained on its own half of every epoch: no example on both, together the whole set.
        epochs = {"01-train": 2, "03-finetune": 1}[stage]
        assert ddp["rank_examples"] == [{"epoch": epoch, "per_rank": [256, 256], "shared": 0, "distinct": 512}
                                        for epoch in range(epochs)]
        assert "rank_examples" not in single
    assert any(name.endswith("mask") for name in torch.load(two / "03-finetune" / "model.pt", weights_only=True))
    gradual = [read_metrics(run, "01-train")["gradual_pruning"] for run in (one, two)]
    assert gradual[1]["pruned_at_steps"] == gradual[0]["pruned_at_steps"]  # the same schedule, the same sparsities
    assert gradual[1]["sparsity"] == gradual[0]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert read_metrics(two, "03-finetune")["sparsity"] == read_metrics(one, "03-finetune")["sparsity"] > 0.7
    assert_same_metrics(read_metrics(one, "04-evaluate"), read_metrics(two, "04-evaluate"), ["test_loss", "test_acc"])
    # The teacher's cost is reported; every rank's teacher scored its half of the epoch, in eval mode, frozen.
    taught = [read_metrics(run, "03-finetune")["distillation"] for run in (one, two)]
    assert taught[1]["teacher"] == "train" and taught[1]["teacher_params"] == taught[0]["teacher_params"] > 0
    assert taught[1]["teacher_seconds"] > 0 and 0 < taught[1]["teacher_share"] < 1
    assert taught[1]["ranks"] == [{"examples": 256, "eval_mode": True, "frozen": True}] * 2
    assert taught[0]["ranks"] == [{"examples": 512, "eval_mode": True, "frozen": True}]


@pytest.mark.slow
def test_environment_variable_launch_joins_processes_started_by_hand(write_recipe, tmp_path):
    """What torchrun or a cluster scheduler does: start every rank with MASTER_ADDR/PORT, WORLD_SIZE, ranks."""
    path = write_recipe(synthetic_recipe(epochs=1) | {"trainer": {"progress_bar": False, "strategy": "ddp",
                                                                    "devices": 2}})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2", "NODE_RANK": "0"}
    ranks = [subprocess.Popen([sys.executable, "-m", "runner", "run", str(path), "-O", str(tmp_path / "out")],
                              cwd=REPO, env={**env, "LOCAL_RANK": str(rank), "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    outputs = [process.communicate(timeout=300) for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1][1]
    assert "nnopt run: tiny" in outputs[0][0] and "nnopt run: tiny" not in outputs[1][0]  # rank 0 reports
    digests = read_metrics(tmp_path / "out" / "tiny", "01-train")["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_bf16_mixed_on_cpu_trains_in_bfloat16(write_recipe, nnopt, tmp_path):
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        recipe = synthetic_recipe(epochs=2)
        recipe["trainer"]["precision"] = precision
        code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / precision)
        assert code == 0, err
        results[precision] = read_metrics(tmp_path / precision / "tiny", "01-train")
    bf16, fp32 = results["bf16-mixed"], results["32-true"]
    assert bf16["val_acc"] > 0.6  # it learns (chance is 0.1) ...
    assert bf16["train_loss"] != pytest.approx(fp32["train_loss"], rel=1e-5)  # ... with bfloat16 rounding


def test_a_stage_overrides_accumulation_and_precision(write_recipe, nnopt, tmp_path):
    recipe = synthetic_recipe(epochs=2, trainer={"accumulate_grad_batches": 2, "precision": "bf16-mixed"})
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 0, err
    assert read_metrics(tmp_path / "tiny", "01-train")["steps"] == 2 * (512 // 32) // 2


MACHINE = Machine.probe()


def rejected(write_recipe, nnopt, run_wide: dict, **stage):
    recipe = synthetic_recipe(**stage)
    recipe["trainer"].update(run_wide)
    path = write_recipe(recipe)
    code, _, err = nnopt("validate", path)
    return code, " ".join(err.split()), path  # rich wraps long lines


@pytest.mark.parametrize("trainer, field, message", [
    ({"strategy": "fsdp"}, "trainer.strategy", "`fsdp` runs only on CUDA GPUs; Lightning refuses it with accelerator `cpu`"),
    ({"precision": "16-mixed"}, "trainer.precision", "`16-mixed` (float16 AMP) runs only on GPUs"),
    ({"fsdp": {"sharding_strategy": "SHARD_GRAD_OP"}}, "trainer.fsdp", "`fsdp` options given but the strategy is `auto`"),
    ({"strategy": "ddp_spawn"}, "trainer.strategy", "`ddp_spawn` is not supported"),
    ({"sync_batchnorm": True}, "trainer.sync_batchnorm", "torch's SyncBatchNorm runs only on CUDA GPUs"),
    ({"devices": MACHINE.cpu_cores + 1}, "trainer.devices",
     f"devices: {MACHINE.cpu_cores + 1} CPU processes but this machine has {MACHINE.cpu_cores} cores"),
    pytest.param({"accelerator": "tpu"}, "trainer.accelerator", "accelerator `tpu` needs torch_xla",
                 marks=pytest.mark.skipif(MACHINE.torch_xla, reason="torch_xla is installed")),
    pytest.param({"accelerator": "gpu"}, "trainer.accelerator", "accelerator `gpu` but no CUDA GPU is visible",
                 marks=pytest.mark.skipif(MACHINE.cuda_devices > 0, reason="a GPU is visible")),
    pytest.param({"strategy": "deepspeed"}, "trainer.strategy", "strategy `deepspeed` needs the deepspeed package",
                 marks=pytest.mark.skipif(MACHINE.deepspeed, reason="deepspeed is installed")),
])
def test_combinations_lightning_cannot_run_are_rejected_before_anything_starts(write_recipe, nnopt, trainer,
                                                                               field, message):
    code, err, path = rejected(write_recipe, nnopt, trainer)
    assert_clean_error(code, err, f"{path}:", f"{field}: {message}", "hint")


def test_multi_process_rules_and_stage_overrides_are_located(write_recipe, nnopt):
    code, err, path = rejected(write_recipe, nnopt, {"strategy": "ddp", "devices": 2},
                               lr_finder={}, trainer={"precision": "16-mixed"})
    assert_clean_error(code, err, "stages[0].lr_finder: Lightning's `lr_finder` runs in one process",
                       "stages[0].trainer.precision: `16-mixed`")
    code, err, _ = rejected(write_recipe, nnopt, {"strategy": "ddp", "devices": 2, "num_nodes": 3})
    assert_clean_error(code, err, "data.batch_size: batch_size 32 is the global batch and does not split evenly "
                       "over 6 processes", "use a multiple of 6")


def test_a_training_block_inside_a_stage_overrides_and_is_checked_too(write_recipe, nnopt, tmp_path):
    recipe = synthetic_recipe(epochs=1)
    recipe["stages"].insert(1, {"name": "rounds", "kind": "iterative_prune", "rounds": 1, "fraction": 0.5,
                                "retrain": {"epochs": 2, "optimizer": {"name": "sgd", "lr": 0.01},
                                            "trainer": {"accumulate_grad_batches": 4}}})
    path = write_recipe(recipe)
    code, _, err = nnopt("run", path, "-O", tmp_path)
    assert code == 0, err
    assert read_metrics(tmp_path / "tiny", "02-rounds")["rounds"][0]["steps"] == 2 * (512 // 32) // 4
    code, _, err = nnopt("validate", path, "-o", "stages.rounds.retrain.trainer.precision=16-mixed")
    assert_clean_error(code, " ".join(err.split()), f"{path}:", "stages[1].retrain.trainer.precision: `16-mixed`")


def test_a_launcher_with_another_process_count_is_rejected(write_recipe, nnopt, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    code, err, _ = rejected(write_recipe, nnopt, {"strategy": "ddp", "devices": 2})
    assert_clean_error(code, err, "trainer.devices: the launcher started 4 processes (WORLD_SIZE=4) but devices x "
                       "num_nodes = 2")


# A model validate cannot see fail (it does not run user code): it trains and validates on batches, and
# fails only on evaluate's batch-1 latency, which runs on rank 0 alone.
FAILS_ON_ONE_EXAMPLE = """
from torch import nn


class RefusesSingleExamples(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        if x.shape[0] == 1:
            raise RuntimeError("this model takes batches of two or more")
        return self.net(x)
"""


@pytest.mark.slow
def test_a_stage_failing_on_rank_0_stops_every_rank(write_recipe, tmp_path):
    recipe = synthetic_recipe(epochs=1)
    recipe["model"] = {"import": "batchy:RefusesSingleExamples"}
    recipe["trainer"].update(strategy="ddp", devices=2)
    path = write_recipe(recipe)
    (path.parent / "batchy.py").write_text(FAILS_ON_ONE_EXAMPLE)
    done = run_cli("run", path, "-O", tmp_path / "out", check=False)  # a hang would hit the timeout
    assert done.returncode == 1
    stderr = " ".join(done.stderr.split())
    assert "stage `evaluate` failed" in stderr and "this model takes batches of two or more" in stderr
    assert "rank 0 failed it; this is rank 1, stopping too" in stderr
    run_dir = tmp_path / "out" / "tiny"
    assert (run_dir / "01-train" / "DONE").is_file() and not (run_dir / "02-evaluate" / "DONE").exists()
