"""The thread count is part of a result: it enters the fingerprint, run.json records it, and a recipe's count
holds for its own run only."""

from __future__ import annotations

import json
import re

import pytest
import torch

from runner.plan import fingerprints
from runner.recipe import load_recipe
from tests.conftest import synthetic_recipe


@pytest.fixture
def process_threads():
    """Run the test at 2 torch threads and give the process its own count back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def _plan(out: str) -> list[str]:
    return re.findall(r"^  (run|reuse|skip) +\w+ \(", out, re.MULTILINE)


def test_fingerprints_follow_the_thread_count_the_run_computes_with(write_recipe, process_threads):
    unpinned = write_recipe(synthetic_recipe())
    pinned = {count: load_recipe(unpinned, [f"trainer.threads={count}"]) for count in (1, 2)}
    at_two = fingerprints(load_recipe(unpinned))
    torch.set_num_threads(1)
    at_one = fingerprints(load_recipe(unpinned))
    assert all(a != b for a, b in zip(at_one, at_two))  # every stage: each computes on the CPU
    assert fingerprints(pinned[2]) == at_two  # the process's count is the count: the same artifacts
    torch.set_num_threads(2)
    assert fingerprints(pinned[1]) == at_one


def test_a_recipe_thread_count_holds_for_its_run_only(nnopt, write_recipe, tmp_path, process_threads):
    recipe = synthetic_recipe(epochs=1)
    path = write_recipe(recipe)
    code, out, err = nnopt("run", path, "-O", tmp_path, "-o", "trainer.threads=1")
    assert code == 0 and _plan(out) == ["run", "run"], err
    assert json.loads((tmp_path / "tiny" / "run.json").read_text())["threads"] == 1
    assert ", seed 0, 1 torch thread(s)" in (tmp_path / "tiny" / "report.md").read_text()
    assert torch.get_num_threads() == 2  # given back
    code, out, err = nnopt("run", path, "-O", tmp_path)  # 2 threads now: another result, computed anew
    assert code == 0 and _plan(out) == ["run", "run"], err
    assert json.loads((tmp_path / "tiny" / "run.json").read_text())["threads"] == 2
    code, out, err = nnopt("run", path, "-O", tmp_path, "-o", "trainer.threads=2")  # the same computation
    assert code == 0 and _plan(out) == ["reuse", "reuse"], err
