"""Stage caching: finished stages are reused, edits rerun the edited stage and later ones, flags steer it,
half-written folders are redone, and one run at a time writes an output folder."""

from __future__ import annotations

import os
import subprocess
import sys

from runner.lock import run_lock
from tests.conftest import synthetic_recipe


def three_stage_recipe(finetune_lr: float = 0.01) -> dict:
    recipe = synthetic_recipe(epochs=2)
    finetune = {"name": "finetune", "kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": finetune_lr}}
    recipe["stages"].insert(1, finetune)
    return recipe


def model_times(run_dir) -> dict[str, int]:
    return {folder: (run_dir / folder / "model.pt").stat().st_mtime_ns
            for folder in ("01-train", "02-finetune", "03-evaluate")}


def plan_line(out: str, stage: str) -> str:
    return next(line.strip() for line in out.splitlines() if line.strip().split()[1:2] == [stage])


def test_editing_a_stage_reruns_it_and_later_never_earlier(nnopt, write_recipe, tmp_path):
    out_dir, run_dir = tmp_path / "out", tmp_path / "out" / "tiny"
    assert nnopt("run", write_recipe(three_stage_recipe()), "-O", out_dir)[0] == 0
    first = model_times(run_dir)

    code, out, _ = nnopt("run", write_recipe(three_stage_recipe(finetune_lr=0.02)), "-O", out_dir)
    assert code == 0
    assert plan_line(out, "train") == "reuse train (train): finished artifact matches"
    assert plan_line(out, "finetune") == "run   finetune (train): config changed"
    assert plan_line(out, "evaluate") == "run   evaluate (evaluate): an earlier stage runs"
    second = model_times(run_dir)
    assert second["01-train"] == first["01-train"]
    assert second["02-finetune"] > first["02-finetune"] and second["03-evaluate"] > first["03-evaluate"]

    code, out, _ = nnopt("run", write_recipe(three_stage_recipe(finetune_lr=0.02)), "-O", out_dir)
    assert code == 0 and model_times(run_dir) == second
    assert all(plan_line(out, s).startswith("reuse") for s in ("train", "finetune", "evaluate"))


def test_force_from_and_only(nnopt, write_recipe, tmp_path):
    recipe, out_dir, run_dir = write_recipe(three_stage_recipe()), tmp_path / "out", tmp_path / "out" / "tiny"
    assert nnopt("run", recipe, "-O", out_dir)[0] == 0
    before = model_times(run_dir)

    code, out, _ = nnopt("run", recipe, "-O", out_dir, "--from", "finetune")
    after_from = model_times(run_dir)
    assert code == 0 and plan_line(out, "finetune") == "run   finetune (train): --from finetune"
    assert after_from["01-train"] == before["01-train"] and after_from["02-finetune"] > before["02-finetune"]

    code, out, _ = nnopt("run", recipe, "-O", out_dir, "--only", "finetune")
    after_only = model_times(run_dir)
    assert code == 0 and plan_line(out, "evaluate") == "skip  evaluate (evaluate): --only finetune"
    assert after_only["01-train"] == before["01-train"] and after_only["03-evaluate"] == after_from["03-evaluate"]
    assert after_only["02-finetune"] > after_from["02-finetune"]

    code, out, _ = nnopt("run", recipe, "-O", out_dir, "--force")
    assert code == 0 and all(plan_line(out, s).endswith("--force") for s in ("train", "finetune", "evaluate"))
    assert all(t > after_only[f] for f, t in model_times(run_dir).items())


def test_flag_errors_name_the_stages(nnopt, write_recipe, tmp_path):
    recipe = write_recipe(three_stage_recipe())
    code, _, err = nnopt("run", recipe, "-O", tmp_path / "out", "--from", "fintune")
    assert code == 2 and "no stage named `fintune`" in err and "did you mean `finetune`" in err
    assert not (tmp_path / "out" / "tiny" / "01-train").exists()

    code, _, err = nnopt("run", recipe, "-O", tmp_path / "out", "--only", "evaluate")
    assert code == 2 and "needs the finished artifact of `finetune`" in err and "--from finetune" in err


def test_half_written_stage_is_redone(nnopt, write_recipe, tmp_path):
    recipe, out_dir, run_dir = write_recipe(three_stage_recipe()), tmp_path / "out", tmp_path / "out" / "tiny"
    assert nnopt("run", recipe, "-O", out_dir)[0] == 0
    before = model_times(run_dir)
    # What a crash while writing leaves: a truncated model and no DONE marker.
    (run_dir / "02-finetune" / "DONE").unlink()
    (run_dir / "02-finetune" / "model.pt").write_bytes(b"\x80\x02trunc")
    code, out, _ = nnopt("run", recipe, "-O", out_dir)
    assert code == 0 and plan_line(out, "finetune") == "run   finetune (train): unfinished artifact: redone"
    after = model_times(run_dir)
    assert after["01-train"] == before["01-train"] and after["02-finetune"] > before["02-finetune"]
    assert (run_dir / "02-finetune" / "DONE").is_file()


def test_a_second_run_on_the_same_folder_is_refused(nnopt, write_recipe, tmp_path):
    recipe = write_recipe(three_stage_recipe())
    with run_lock(tmp_path / "out" / "tiny"):
        code, _, err = nnopt("run", recipe, "-O", tmp_path / "out")
    assert code == 1 and f"another nnopt run (pid {os.getpid()}) is writing" in err
    assert not (tmp_path / "out" / "tiny" / "01-train").exists()


def test_lock_of_a_killed_run_is_taken_over(nnopt, write_recipe, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from runner.lock import run_lock\n"
         "with run_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)", tmp_path / "out" / "tiny"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    code, _, err = nnopt("run", write_recipe(three_stage_recipe()), "-O", tmp_path / "out")
    assert code == 1 and f"pid {holder.pid}" in err
    holder.kill()
    holder.wait()
    code, _, err = nnopt("run", write_recipe(three_stage_recipe()), "-O", tmp_path / "out")
    assert code == 0, err
