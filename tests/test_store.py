"""The stage store: artifacts built apart and swapped in whole, kept by fingerprint, pruned with a bound,
and one recipe file per output folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from runner import artifacts
from runner.errors import RunError
from runner.modelio import load_model
from runner.store import OWNER, Store, claim, find_store, keep_setting, store_of
from tests.conftest import read_metrics, synthetic_recipe

A, B, C = "a" * 16, "b" * 16, "c" * 16


def build(store: Store, fingerprint: str, numbered, payload: str, stage: str = "train"):
    """What the pipeline does for a stage that runs: build apart, then commit."""
    with store.building_lock(fingerprint):
        folder = store.begin(fingerprint, {"name": stage, "kind": "train"})
        (folder / "model.pt").write_text(payload)
        return store.commit(fingerprint, numbered)


@pytest.fixture
def layout(tmp_path):
    recipe_output = tmp_path / "out" / "tiny"
    return store_of(recipe_output), recipe_output / "01-train"


def test_commit_builds_apart_and_the_numbered_folder_shows_the_new_artifact(layout):
    store, numbered = layout
    first = build(store, A, numbered, "A")
    assert numbered.is_symlink() and not os.path.isabs(os.readlink(numbered))
    assert (numbered / "model.pt").read_text() == "A" and store.shown(numbered) == first
    assert artifacts.is_done(numbered, A) and not store.building(A).exists()
    assert not (numbered / artifacts.CHECKPOINTS).exists()  # superseded by the finished artifact

    second = build(store, B, numbered, "B")
    assert (numbered / "model.pt").read_text() == "B"
    assert store.finished(A) == first and (first / "model.pt").read_text() == "A"  # kept by fingerprint
    assert store.finished(B) == second and store.finished(C) is None


def test_a_rebuild_of_the_same_config_gets_a_new_entry(layout):
    store, numbered = layout
    first, again = build(store, A, numbered, "old"), build(store, A, numbered, "new")
    assert first.name == f"{A}.1" and again.name == f"{A}.2"
    assert store.finished(A) == again and (numbered / "model.pt").read_text() == "new"


def test_a_failure_between_any_two_steps_of_the_commit_leaves_the_old_or_the_new(layout, monkeypatch):
    store, numbered = layout
    build(store, A, numbered, "old")
    for step in ("rename", "symlink", "replace"):
        with monkeypatch.context() as patch, pytest.raises(OSError, match="killed"):
            def killed(*args, **kwargs):
                raise OSError("killed")
            patch.setattr(os, step, killed)
            build(store, B, numbered, "new")
        assert (numbered / "model.pt").read_text() in ("old", "new")
        # The next run finds the new build whole, whichever step it stopped at (a build stopped after its
        # DONE marker is completed by the lookup).
        assert store.finished(B) is not None and (store.finished(B) / "model.pt").read_text() == "new"


def test_a_build_killed_before_its_done_marker_is_not_finished(layout):
    store, numbered = layout
    build(store, A, numbered, "old")
    with store.building_lock(B):
        (store.begin(B, {"name": "train"}) / "model.pt").write_text("half")
    assert store.finished(B) is None and (numbered / "model.pt").read_text() == "old"


def test_resume_checkpoints_of_an_interrupted_build_stay_for_the_same_config_only(layout):
    store, _ = layout
    folder = store.begin(A, {"name": "train"})
    (folder / artifacts.CHECKPOINTS / artifacts.LAST_CHECKPOINT).write_text("state")
    assert store.begin(A, {"name": "train"}) == folder and artifacts.resume_points(folder, A)
    store.begin(A, {"name": "train"}, resume=False)  # --force, --from, --only: afresh
    assert not artifacts.resume_points(folder, A)


def test_a_second_builder_of_one_config_is_refused(layout):
    store, _ = layout
    with store.building_lock(A):
        with pytest.raises(RunError, match=f"another nnopt run \\(pid {os.getpid()}\\) is building"):
            with store.building_lock(A):
                pass
        with store.building_lock(B):  # another config builds meanwhile
            pass


def test_a_link_the_store_did_not_make_is_refused(layout, tmp_path):
    store, numbered = layout
    precious = tmp_path / "precious"
    precious.mkdir()
    numbered.parent.mkdir(parents=True)
    numbered.symlink_to(precious)
    with pytest.raises(OSError, match="is a symbolic link that nnopt did not make"):
        store.prepare(numbered)
    with pytest.raises(OSError, match="is a symbolic link"):
        build(store, A, numbered, "A")
    assert list(precious.iterdir()) == []


def test_old_layout_folders_move_into_the_store(layout):
    store, numbered = layout
    finished, interrupted = numbered, numbered.with_name("02-finetune")
    finished.mkdir(parents=True)
    (finished / "model.pt").write_text("A")
    (finished / artifacts.DONE).write_text(A + "\n")
    (interrupted / artifacts.CHECKPOINTS).mkdir(parents=True)
    (interrupted / artifacts.CHECKPOINTS / artifacts.CHECKPOINT_OWNER).write_text(B + "\n")
    (interrupted / artifacts.CHECKPOINTS / artifacts.LAST_CHECKPOINT).write_text("state")
    store.prepare(finished)
    store.prepare(interrupted)
    assert finished.is_symlink() and (finished / "model.pt").read_text() == "A" and store.finished(A)
    assert not interrupted.exists() and artifacts.resume_points(store.building(B), B)


def test_prune_keeps_what_numbered_folders_show_and_the_newest_configs(layout, tmp_path):
    store, numbered = layout
    seed_one = numbered.parent / "seed-1" / "01-train"
    build(store, A, numbered, "A")
    build(store, A, seed_one, "A again")  # A.2 shown by seed-1; A.1 by the run folder
    for fingerprint, mtime in ((B, 100), (C, 200)):
        entry = build(store, fingerprint, numbered, fingerprint)
        os.utime(entry / artifacts.DONE, (mtime, mtime))
    build(store, A, numbered, "A third")  # A.3 shown; B (older) and C stay findable
    listed = {entry.folder.name: entry for entry in store.entries()}
    assert {name: entry.state for name, entry in listed.items()} == {
        f"{A}.1": "kept", f"{A}.2": "current", f"{A}.3": "current", f"{B}.1": "kept", f"{C}.1": "kept"}
    assert listed[f"{A}.3"].used_by == (numbered,) and listed[f"{B}.1"].stage == "train"
    files = [path for path in listed[f"{A}.2"].folder.iterdir()]  # model.pt, stage.json, DONE
    assert len(files) == 3 and listed[f"{A}.2"].size == sum(path.stat().st_size for path in files)

    removed = store.prune(keep=1)
    assert sorted(entry.folder.name for entry in removed) == [f"{A}.1", f"{B}.1"]
    assert store.finished(C) and not store.finished(B) and (numbered / "model.pt").read_text() == "A third"
    assert (seed_one / "model.pt").read_text() == "A again"
    assert sorted(path.name for path in (store.root / ".locks").iterdir()) == [A, C]


def test_prune_waits_for_no_run_and_never_removes_an_interrupted_build_it_keeps(layout):
    store, numbered = layout
    build(store, A, numbered, "A")
    store.begin(B, {"name": "train"})  # interrupted: no finished build of B
    with store.in_use():
        assert store.prune(keep=0) is None
    assert store.prune(keep=1) == [] and store.building(B).is_dir()
    assert [entry.folder.name for entry in store.prune(keep=0)] == [B]


def test_keep_setting(monkeypatch):
    monkeypatch.setenv("NNOPT_STORE_KEEP", "7")
    assert keep_setting() == 7 and keep_setting(2) == 2
    monkeypatch.setenv("NNOPT_STORE_KEEP", "many")
    with pytest.raises(RunError, match="whole number"):
        keep_setting()


def test_find_store_from_a_run_or_stage_folder(layout):
    store, numbered = layout
    build(store, A, numbered, "A")
    assert find_store(numbered.parent).root == store.root and find_store(numbered.parent / "sweep" / "01_x").root == store.root
    assert find_store(numbered.parent.parent / "elsewhere") is None


def test_one_recipe_file_owns_an_output_folder(tmp_path):
    first, second, folder = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "out" / "tiny"
    first.write_text("name: tiny")
    second.write_text("name: tiny")
    claim(folder, first)
    claim(folder, first)
    with pytest.raises(RunError) as refused:
        claim(folder, second)
    assert str(first) in refused.value.message and "-O DIR" in refused.value.hint and "--force" in refused.value.hint
    claim(folder, second, take_over=True)
    assert (folder / OWNER).read_text().strip() == str(second)
    second.unlink()  # the owner is gone (renamed or deleted): the folder is free again
    claim(folder, first)


# -- what a user runs ---------------------------------------------------------------------------

def train_state(run_dir) -> tuple[int, bytes]:
    """When the numbered train folder's model was written, and its bytes."""
    model = run_dir / "01-train" / "model.pt"
    return model.stat().st_mtime_ns, model.read_bytes()


def plan_lines(out: str) -> dict[str, str]:
    lines = [line.strip() for line in out.split("plan:", 1)[1].splitlines()[1:3]]
    return {line.split()[1]: line for line in lines}


def test_a_failing_override_leaves_the_finished_stage_and_a_plain_rerun_reuses_it(nnopt, write_recipe, tmp_path):
    path, out_dir, run_dir = write_recipe(synthetic_recipe(epochs=1)), tmp_path / "out", tmp_path / "out" / "tiny"
    assert nnopt("run", path, "-O", out_dir)[0] == 0
    finished = train_state(run_dir)

    code, out, err = nnopt("run", path, "-O", out_dir, "-o", "stages.train.optimizer.lr=1e30")  # .inf is refused at validate now
    assert code == 1 and "stage `train` failed: the training loss is" in err
    assert plan_lines(out)["train"] == "run   train (train): config changed"
    assert not list((run_dir / ".store" / ".building").iterdir())  # it failed before any checkpoint: nothing kept
    assert train_state(run_dir) == finished and load_model(run_dir / "01-train") is not None

    code, out, _ = nnopt("run", path, "-O", out_dir)
    assert code == 0 and plan_lines(out) == {"train": "reuse train (train): finished artifact matches",
                                             "evaluate": "reuse evaluate (evaluate): finished artifact matches"}
    assert train_state(run_dir) == finished


def test_flipping_an_override_back_reruns_nothing_and_prune_keeps_the_current(nnopt, write_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("NNOPT_STORE_KEEP", "1")  # each run's own prune keeps one other config per stage
    path, out_dir, run_dir = write_recipe(synthetic_recipe(epochs=1)), tmp_path / "out", tmp_path / "out" / "tiny"
    lr_b = ("-o", "stages.train.optimizer.lr=0.02")
    assert nnopt("run", path, "-O", out_dir)[0] == 0
    state_a, evaluate_a = train_state(run_dir), read_metrics(run_dir, "02-evaluate")
    assert nnopt("run", path, "-O", out_dir, *lr_b)[0] == 0
    state_b = train_state(run_dir)
    assert state_b[1] != state_a[1]

    code, out, _ = nnopt("run", path, "-O", out_dir)  # back to A: nothing trains
    assert code == 0 and plan_lines(out) == {
        "train": "reuse train (train): finished artifact matches (kept in the store)",
        "evaluate": "reuse evaluate (evaluate): finished artifact matches (kept in the store)"}
    assert train_state(run_dir) == state_a and read_metrics(run_dir, "02-evaluate") == evaluate_a

    code, out, _ = nnopt("store", run_dir)
    rows = [line for line in out.splitlines() if " train " in line or " evaluate " in line]
    assert len(rows) == 4 and sum("current" in row for row in rows) == 2 and sum("kept" in row for row in rows) == 2
    code, out, _ = nnopt("store", run_dir, "--prune", "--keep", "0")
    assert code == 0 and "pruned 2 artifacts" in out
    assert train_state(run_dir) == state_a and nnopt("run", path, "-O", out_dir)[1].count("reuse ") == 2
    code, out, _ = nnopt("run", path, "-O", out_dir, *lr_b)
    assert "run   train (train): config changed" in out and train_state(run_dir)[1] == state_b[1]  # B was pruned: rebuilt


KILLED_AT = """
import os, signal, sys
from runner.cli import main
from runner.store import Store
setattr(Store, sys.argv[1], lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL))
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("step", ["_enter", "show"], ids=["after-DONE-before-the-rename", "before-the-link-swap"])
def test_a_kill_during_the_commit_leaves_a_loadable_artifact(nnopt, write_recipe, tmp_path, step):
    path, out_dir, run_dir = write_recipe(synthetic_recipe(epochs=1)), tmp_path / "out", tmp_path / "out" / "tiny"
    assert nnopt("run", path, "-O", out_dir)[0] == 0
    finished = train_state(run_dir)
    lr_b = ["-o", "stages.train.optimizer.lr=0.02"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT, step, "run", path, "-O", out_dir, *lr_b],
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert "run train (train)" in killed.stdout  # killed in train's commit, after training
    assert train_state(run_dir) == finished and load_model(run_dir / "01-train") is not None

    code, out, _ = nnopt("run", path, "-O", out_dir, *lr_b)  # the killed build is whole: train is not retrained
    assert code == 0 and plan_lines(out)["train"] == "reuse train (train): finished artifact matches (kept in the store)"
    assert train_state(run_dir)[1] != finished[1] and load_model(run_dir / "01-train") is not None


def test_a_same_name_recipe_from_another_file_is_refused_and_force_takes_over(nnopt, write_recipe, tmp_path):
    first = write_recipe(synthetic_recipe(epochs=1), "first.yaml")
    second = write_recipe(synthetic_recipe(epochs=1, optimizer={"name": "sgd", "lr": 0.02, "momentum": 0.9}), "second.yaml")
    out_dir, run_dir = tmp_path / "out", tmp_path / "out" / "tiny"
    assert nnopt("run", first, "-O", out_dir)[0] == 0
    finished = train_state(run_dir)

    code, _, err = nnopt("run", second, "-O", out_dir)
    err = " ".join(err.split())
    assert code == 1 and f"holds the runs of another recipe file with the same `name:`, {first}" in err
    assert "-O DIR" in err and "another `name:`" in err and "--force" in err
    assert train_state(run_dir) == finished

    code, out, _ = nnopt("run", second, "-O", out_dir, "--force")
    assert code == 0 and plan_lines(out)["train"] == "run   train (train): --force"
    assert (run_dir / OWNER).read_text().strip() == str(second) and train_state(run_dir)[1] != finished[1]
    assert nnopt("run", first, "-O", out_dir)[0] == 1
    assert nnopt("sweep", first, "-O", out_dir, "-s", "stages.train.epochs=1")[0] == 1


@pytest.mark.slow
def test_sweep_points_and_a_plain_run_share_one_store(nnopt, write_recipe, tmp_path):
    recipe = synthetic_recipe(epochs=1)
    recipe["stages"].insert(1, {"name": "prune", "kind": "prune", "sparsity": 0.5})
    path, out_dir = write_recipe(recipe), tmp_path / "out"
    code, out, err = nnopt("sweep", path, "-O", out_dir, "-s", "stages.prune.sparsity=0.5,0.8")
    assert code == 0, err
    assert out.count("run train (train)") == 1  # the baseline both points share trains once
    point = out_dir / "tiny" / "sweep" / "02_sparsity=0.8"
    assert "finished artifact matches (kept in the store)" in out and (point / "01-train").is_symlink()
    code, out, _ = nnopt("run", path, "-O", out_dir)  # the plain run's config is the first point's: reused whole
    assert code == 0 and out.count("reuse ") == 3 and "run " not in out.split("plan:", 1)[1].split("\n\n")[0]
    stores = [p for p in (out_dir / "tiny").rglob(".store")]
    assert stores == [out_dir / "tiny" / ".store"]
