"""The benchmark compares like with like: every training variant does the same math."""

from __future__ import annotations

import json

import pytest
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


@pytest.mark.slow  # fresh processes for startup and scale: about 60 s of CPU
def test_streaming_scale_bf16_and_startup_sections_write_their_tables(tmp_path):
    """Tiny configurations of the newer sections: structure and a table each, never timings."""
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    code = bench_main(["--sections", "startup", "streaming", "scale", "bf16", "--repeats", "1",
                       "--images-per-class", "4", "--image-size", "16", "--image-batch-size", "4", "--stream-steps", "1",
                       "--workers", "1", "--scale-factors", "2", "--scale-per-class", "2", "--scale-image-size", "16",
                       "--bf16-steps", "lenet5=1", "resnet18=1", "--out", str(tmp_path / "r.json"),
                       "--readme", str(readme)])
    assert code == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert set(results["startup"]) == {"nnopt validate recipes/prune_then_quant.yaml", "nnopt list", "nnopt schema",
                                       "python -c 'import torch' (the floor)"}
    assert all(entry["median_cpu_seconds"] > 0 for entry in results["startup"].values())
    stream = results["streaming"]
    assert stream["train_images"] == 16 and stream["wall"]["speed_vs_pre_decoded"]["pre_decoded"] == 1.0
    assert set(stream["cpu"]["seconds"]) == {"image_folder", "pre_decoded"}
    scale = results["scale"]
    # one point (each is a fresh process: seconds of imports): 2 images per class at 1x, times 2, 4 classes
    assert list(scale) == ["2x"] and scale["2x"]["train_images"] == 16
    assert all(entry["peak_rss_mb"] >= entry["rss_before_mb"] > 50 and entry["epoch_seconds"] > 0
               for entry in scale.values())
    for model in ("lenet5", "resnet18"):
        entry = results["bf16"][model]
        assert set(entry["wall"]["seconds"]) == {"32-true", "bf16-mixed"}
        assert all(0 <= accuracy <= 1 for accuracy in entry["test_accuracy"].values())
    table = readme.read_text()
    for heading in ("| `nnopt list` |", "| image folder, 1 worker(s)", "| 2x | 16 |", "| lenet5, 1 steps"):
        assert heading in table, heading


def test_pre_decoded_images_are_the_folder_s_images(tmp_path):
    from bench import streaming
    from runner.data.build import build_data

    root = streaming.make_folder(tmp_path / "images", per_class=3, image_size=16)
    recipe = streaming.image_recipe(root, 16, 4, 0, steps=1)
    streamed = build_data(recipe.data, recipe.seed)
    decoded = streaming.pre_decoded(streamed, recipe)
    for split in ("train", "val", "test"):
        images, labels = getattr(decoded, split)
        assert len(labels) == streamed.split_size(split) and images.shape[1:] == (3, 16, 16)
        first = streamed.examples(split, 2)
        assert torch.equal(images[:2], first[0]) and torch.equal(labels[:2], first[1])


def test_profile_splits_each_runner_s_step_into_parts(capsys):
    from bench import profile

    assert profile.main(["--steps", "3", "--runners", "plain_loop", "nnopt", "--marginal-steps", "2", "4",
                         "--repeats", "1"]) == 0
    shown = capsys.readouterr().out
    assert "costliest Python" in shown and "us per step" in shown and "ms per fit" in shown
    data = train.load_mnist(batch_size=128)
    parts = profile.profile_runner("nnopt", "lenet_300_100", data, steps=3)["us_per_step"]
    assert parts["lightning"] > 0 and parts["torch kernels"] > 0 and set(parts) == set(profile.BUCKETS)
    plain = profile.profile_runner("plain_loop", "lenet_300_100", data, steps=3)["us_per_step"]
    assert plain["lightning"] == 0  # the plain loop runs no Lightning code: the buckets tell them apart



def test_allocation_grid_runs_every_allocation_at_the_same_total(tmp_path, monkeypatch, capsys):
    from bench import allocation_grid

    tiny = ["data.limit={train: 2000, val: 500}", "data.batch_size=32", "stages.train.epochs=2",
            "stages.train.warmup=null", "stages.sensitivity.examples=500", "stages.sensitivity.bits=[2]", "stages.sensitivity.int8=false",
            "stages.finetune.epochs=1", "stages.finetune.warmup=null", "stages.evaluate.latency_batch_sizes=[64]",
            "stages.evaluate.latency_repeats=3"]
    monkeypatch.setattr("sys.argv", ["allocation_grid", "recipes/auto_prune_lenet300.yaml", "-O", str(tmp_path),
                                     "--seeds", "0", *[arg for override in tiny for arg in ("-o", override)],
                                     "--vary", "fc1.weight=9000", "--vary", "fc3.weight=500,2000",
                                     "--rest", "fc2.weight"])
    allocation_grid.main()
    out = capsys.readouterr().out
    assert "skipped (9000, 2000): fc3.weight would keep 2,000 of 1,000" in out
    rows = [line.split(" | ")[0] for line in out.split("sorted by validation error")[1].splitlines()
            if line.startswith("| ") and not line.startswith("| allocation")]
    assert sorted(rows) == ["| auto", "| global", "| grid fc1.weight=9000 fc2.weight=3810 fc3.weight=500"]
    sizes = {"fc1.weight": 235200, "fc2.weight": 30000, "fc3.weight": 1000}
    kept = {}
    for folder in tmp_path.glob("*/seed-0/03-prune"):
        after = json.loads((folder / "metrics.json").read_text())["layer_sparsity_after"]
        kept[folder.parent.parent.name] = {name: round((1 - after[name]) * size) for name, size in sizes.items()}
    assert len(kept) == 3, kept
    assert all(sum(layers.values()) == 13310 for layers in kept.values()), kept  # 5% of 266,200 in each
    assert kept["auto_prune_lenet300_grid_9000_500"] == {"fc1.weight": 9000, "fc2.weight": 3810, "fc3.weight": 500}
