"""The stage store: artifacts built apart and swapped in whole, kept by fingerprint, pruned with a bound,
and one recipe file per output folder."""

from __future__ import annotations

import os

import pytest

from runner import artifacts
from runner.errors import RunError
from runner.store import OWNER, Store, claim, find_store, keep_setting, store_of

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
