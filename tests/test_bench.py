"""The benchmark compares like with like: every training variant does the same math."""

from __future__ import annotations

import json

import torch

from bench import train
from bench.__main__ import main as bench_main


def test_every_training_variant_reaches_the_same_weights():
    data = train.load_mnist(batch_size=128)
    initial = train._model("lenet_300_100").state_dict()
    trained = {name: run("lenet_300_100", data, steps=6)[1].state_dict() for name, run in train.RUNNERS.items()}
    reference = trained["plain_loop"]
    assert not torch.allclose(reference["fc1.weight"], initial["fc1.weight"])  # it did train
    for name, state in trained.items():
        for key, tensor in reference.items():
            assert torch.allclose(state[key], tensor, atol=1e-6), (name, key)
    # nnopt's foreach update and in-place batches give torch's default results bit for bit
    assert all(torch.equal(trained["nnopt"][key], tensor) for key, tensor in reference.items())


def test_harness_writes_results_and_readme_table(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    code = bench_main(["--sections", "train", "--repeats", "2", "--steps", "lenet_300_100=2",
                       "--out", str(tmp_path / "r.json"), "--readme", str(readme)])
    assert code == 0
    results = json.loads((tmp_path / "r.json").read_text())
    entry = results["train"]["lenet_300_100"]["cpu"]
    assert set(entry["speed_vs_plain_loop"]) == set(train.RUNNERS) and entry["speed_vs_plain_loop"]["plain_loop"] == 1.0
    assert all(len(v) == 2 and min(v) > 0 for v in entry["seconds"].values())
    assert "| lenet_300_100, 2 steps |" in readme.read_text()
    bench_main(["--sections", "train", "--repeats", "1", "--steps", "lenet_300_100=1",
                "--out", str(tmp_path / "r.json"), "--readme", str(readme)])
    assert readme.read_text().count("bench:start") == 1  # rewritten in place, not appended twice
