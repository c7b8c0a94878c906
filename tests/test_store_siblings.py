"""Stages reused across recipes: a finished artifact of the same fingerprint in a sibling recipe's store (under the
same output folder) is brought into the recipe's own store, which stays whole when the sibling is pruned or deleted."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from runner import artifacts
from runner import store as store_module
from runner.store import ORIGIN, Store, store_of
from tests.conftest import synthetic_recipe

FP = "f" * 16


def recipe(name: str, *, lr: float = 0.05, prune: bool = False) -> dict:
    """The tiny synthetic recipe under another name: its one-epoch train stage, then a prune stage if `prune`."""
    made = synthetic_recipe(epochs=1, optimizer={"name": "sgd", "lr": lr, "momentum": 0.9})
    made["stages"] = made["stages"][:1] + ([{"name": "prune", "kind": "prune", "sparsity": 0.5}] if prune else [])
    return {**made, "name": name}


def plan_line(out: str, stage: str) -> str:
    return next(line.strip() for line in out.split("plan:", 1)[1].splitlines() if line.split()[1:2] == [stage])


def stage_record(run_dir, stage: str) -> dict:
    return next(s for s in json.loads((run_dir / "run.json").read_text())["stages"] if s["name"] == stage)


def test_a_stage_another_recipe_finished_is_brought_not_trained(nnopt, write_recipe, tmp_path):
    out_dir = tmp_path / "out"
    code, _, err = nnopt("run", write_recipe(recipe("a"), "a.yaml"), "-O", out_dir, "--seeds", "0")
    assert code == 0, err
    theirs = out_dir / "a" / "seed-0" / "01-train"

    code, out, err = nnopt("run", write_recipe(recipe("b", prune=True), "b.yaml"), "-O", out_dir)
    assert code == 0, err
    mine = out_dir / "b" / "01-train"
    assert plan_line(out, "train") == "reuse train (train): finished in a (seed-0)"
    assert "run train (train)" not in out and "run prune (prune)" in out
    record = stage_record(out_dir / "b", "train")
    entry = store_of(out_dir / "b").shown(mine)
    assert record["status"] == "reused" and record["seconds"] == 0.0 and record["origin"] == {
        "recipe": "a", "shown_by": ["seed-0"], "artifact": f"a/.store/{record['fingerprint']}.1", "files": "linked"}
    assert entry.parent == out_dir / "b" / ".store" and json.loads((entry / ORIGIN).read_text()) == record["origin"]
    assert record["metrics"] == json.loads((theirs / artifacts.METRICS).read_text()) and record["metrics"]["val_acc"] > 0.5
    assert (mine / "model.pt").read_bytes() == (theirs / "model.pt").read_bytes()
    assert os.path.samefile(mine / "model.pt", theirs / "model.pt")  # hard-linked, not copied
    assert stage_record(out_dir / "b", "prune")["origin"] is None  # built in b's own store


def test_a_stage_of_another_config_is_not_reused(nnopt, write_recipe, tmp_path):
    out_dir = tmp_path / "out"
    assert nnopt("run", write_recipe(recipe("a"), "a.yaml"), "-O", out_dir)[0] == 0
    code, out, _ = nnopt("run", write_recipe(recipe("b", lr=0.02), "b.yaml"), "-O", out_dir)
    assert code == 0 and plan_line(out, "train") == "run   train (train): new" and "run train (train)" in out
    assert stage_record(out_dir / "b", "train")["origin"] is None
    assert (out_dir / "b" / "01-train" / "model.pt").read_bytes() != (out_dir / "a" / "01-train" / "model.pt").read_bytes()


def test_pruning_or_deleting_the_other_recipe_leaves_this_one_whole(nnopt, write_recipe, tmp_path):
    out_dir, a_file = tmp_path / "out", write_recipe(recipe("a"), "a.yaml")
    b_file = write_recipe(recipe("b"), "b.yaml")
    assert nnopt("run", a_file, "-O", out_dir)[0] == 0
    assert nnopt("run", b_file, "-O", out_dir)[0] == 0
    mine = out_dir / "b" / "01-train"
    model = (mine / "model.pt").read_bytes()

    a_store = store_of(out_dir / "a")
    shared = a_store.shown(out_dir / "a" / "01-train")
    assert nnopt("run", a_file, "-O", out_dir, "-o", "stages.train.optimizer.lr=0.02")[0] == 0  # a moves on
    code, out, _ = nnopt("store", out_dir / "a", "--prune", "--keep", "0")
    assert code == 0 and "pruned 1 artifacts" in out and not shared.exists()  # the artifact b was brought from
    assert (mine / "model.pt").read_bytes() == model
    assert artifacts.is_done(mine, stage_record(out_dir / "b", "train")["fingerprint"])

    shutil.rmtree(out_dir / "a")
    code, out, _ = nnopt("run", b_file, "-O", out_dir)
    assert code == 0 and plan_line(out, "train") == "reuse train (train): finished artifact matches"
    assert (mine / "model.pt").read_bytes() == model and stage_record(out_dir / "b", "train")["origin"]["recipe"] == "a"
    code, out, _ = nnopt("store", out_dir / "b")
    assert code == 0 and "current, from a" in next(line for line in out.splitlines() if " train " in line)


# -- the store alone: what is taken, and how --------------------------------------------------------------------

def finished_entry(store: Store, fingerprint: str, numbered, payload: str):
    """A stage built and committed as the pipeline does, with a file in a subfolder as logs are."""
    with store.building_lock(fingerprint):
        folder = store.begin(fingerprint, {"name": "train", "kind": "train"})
        (folder / "model.pt").write_text(payload)
        (folder / "logs").mkdir()
        (folder / "logs" / "metrics.csv").write_text("step,loss\n")
        return store.commit(fingerprint, numbered)


@pytest.fixture
def two_recipes(tmp_path):
    """The stores of recipes `a` and `b` under one output folder, each once used by a run (which makes its lock)."""
    out_dir = tmp_path / "out"
    stores = store_of(out_dir / "a"), store_of(out_dir / "b")
    for store in stores:
        with store.in_use():
            pass
    return *stores, out_dir


def test_a_half_built_or_uncommitted_sibling_build_is_never_taken(two_recipes):
    theirs, mine, _ = two_recipes
    with theirs.building_lock(FP):
        (theirs.begin(FP, {"name": "train"}) / "model.pt").write_text("half")  # killed while training
    assert mine.bring(FP) is None
    artifacts.mark_done(theirs.building(FP), FP)  # DONE written, not yet renamed into a's store: a's to finish
    assert mine.bring(FP) is None and mine.finished(FP) is None and not mine.building(FP).exists()
    assert (theirs.building(FP) / "model.pt").read_text() == "half"  # only read


def test_a_bring_stopped_before_its_done_marker_leaves_nothing_finished(two_recipes, monkeypatch):
    theirs, mine, out_dir = two_recipes
    finished_entry(theirs, FP, out_dir / "a" / "01-train", "A")
    with monkeypatch.context() as patch, pytest.raises(OSError, match="killed"):
        def killed(*args, **kwargs):
            raise OSError("killed")
        patch.setattr(artifacts, "mark_done", killed)
        mine.bring(FP)
    assert mine.finished(FP) is None and mine.entries()[0].state == "unfinished"  # a prune removes it
    entry, where = mine.bring(FP)  # the next plan brings it afresh
    assert where == "a" and entry == mine.root / f"{FP}.1" and (entry / "logs" / "metrics.csv").is_file()
    assert mine.finished(FP) == entry and not mine.building(FP).exists()


def test_across_file_systems_the_files_are_copied(two_recipes, monkeypatch):
    theirs, mine, out_dir = two_recipes
    source = finished_entry(theirs, FP, out_dir / "a" / "01-train", "A")
    os.unlink(out_dir / "a" / "01-train")  # shown by no run folder now

    def cross_device(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(os, "link", cross_device)
    entry, where = mine.bring(FP)
    assert where == "a (kept in its store)" and json.loads((entry / ORIGIN).read_text())["files"] == "copied"
    assert (entry / "model.pt").read_text() == "A" and not os.path.samefile(entry / "model.pt", source / "model.pt")


def test_a_prune_of_the_other_recipe_cannot_remove_what_is_being_brought(two_recipes, monkeypatch):
    theirs, mine, out_dir = two_recipes
    source = finished_entry(theirs, FP, out_dir / "a" / "01-train", "A")
    os.unlink(out_dir / "a" / "01-train")  # no longer current in a: a prune with --keep 0 removes it
    prunes = []

    def copy_while_a_prunes(*args):
        prunes.append(theirs.prune(keep=0))
        return link_or_copy(*args)
    link_or_copy = store_module._link_or_copy
    monkeypatch.setattr(store_module, "_link_or_copy", copy_while_a_prunes)
    entry, _ = mine.bring(FP)
    assert prunes == [None] and source.is_dir()  # refused while b reads a's store, as while a run uses it
    assert [removed.folder for removed in theirs.prune(keep=0)] == [source] and (entry / "model.pt").read_text() == "A"
