"""Sensitivity scans and the allocation they drive: per-layer sparsity reaching a global target exactly, within
bounds, with the least predicted loss; a plain recipe reproduces the chosen levels."""

from __future__ import annotations

import itertools
import json
from fnmatch import fnmatchcase

import pytest
import torch

from runner.allocation import AllocationError, allocate_bits, allocate_pruned, allocate_sparsity, drop_curve, pruned_for
from tests.conftest import read_metrics, synthetic_recipe

LEVELS = [0.5, 0.7, 0.8, 0.9, 0.95, 0.98]


def _scan(sizes: dict[str, int], drops: dict[str, list[float]], baseline: float = 0.9) -> dict:
    """A scan as the sensitivity stage writes it, with the given accuracy drop at each of LEVELS."""
    return {"examples": 1000, "baseline_acc": baseline, "layers": {
        name: {"size": size, "sparsity": 0.0, "pruned": [[level, baseline - d] for level, d in zip(LEVELS, drops[name])],
               "shared": [[2, baseline - 0.05], [4, baseline - 0.01], [8, baseline]]}
        for name, size in sizes.items()}}


SIZES = {"fc1.weight": 23520, "fc2.weight": 3000, "fc3.weight": 1000}
DROPS = {"fc1.weight": [0.0, 0.0, 0.001, 0.003, 0.01, 0.05],  # robust, and most of the weights
         "fc2.weight": [0.0, 0.002, 0.005, 0.02, 0.06, 0.2],
         "fc3.weight": [0.01, 0.03, 0.08, 0.2, 0.4, 0.6]}  # the output layer: fragile


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.93, 0.95])
def test_allocation_reaches_the_target_exactly_within_bounds(target):
    bounds = {"fc2.weight": (0.6, 0.9), "fc3.weight": (0.0, 0.7)}
    chosen = allocate_sparsity(_scan(SIZES, DROPS), list(SIZES), target, bounds)
    total = sum(SIZES.values())
    assert sum(chosen["pruned"].values()) == round(target * total)
    for name, (low, high) in bounds.items():
        assert low <= chosen["sparsity"][name] <= high
    for name, sparsity in chosen["sparsity"].items():
        assert chosen["pruned"][name] == round(sparsity * SIZES[name])  # what the prune stage will remove
        assert sparsity <= LEVELS[-1]  # never beyond what was scanned
    assert chosen["predicted_total_drop"] == pytest.approx(sum(chosen["predicted_drop"].values()))


@pytest.mark.parametrize("budget", [{"keep_params": 1372}, {"keep_params": 2750}, {"keep_params": 13760},
                                    {"keep_bytes": 4 * 1372 + 3}, {"keep_bytes": 11_111}])
def test_a_parameter_or_bytes_budget_is_reached_exactly_within_bounds(budget):
    scan = _scan(SIZES, DROPS)
    bounds = {"fc1.weight": (0.4, 0.98), "fc2.weight": (0.5, 0.95), "fc3.weight": (0.0, 0.8)}
    chosen = allocate_pruned(scan, list(SIZES), pruned_for(scan, list(SIZES), **budget), bounds)
    kept = sum(SIZES[name] - count for name, count in chosen["pruned"].items())
    # every weight of the budget is used: the parameter count exactly, the most 4-byte values that fit the bytes
    assert kept == budget.get("keep_params", budget.get("keep_bytes", 0) // 4)
    for name, (low, high) in bounds.items():
        assert low <= chosen["sparsity"][name] <= high
        assert chosen["pruned"][name] == round(chosen["sparsity"][name] * SIZES[name])


def test_a_budget_outside_the_layers_or_their_bounds_is_refused():
    scan = _scan(SIZES, DROPS)
    with pytest.raises(AllocationError, match="more than the 27,520 the pruned layers have"):
        pruned_for(scan, list(SIZES), keep_params=30_000)
    bounds = {"fc1.weight": (0.0, 0.9)}  # fc1 keeps at least 2,352: fewer kept in all cannot be reached
    with pytest.raises(AllocationError, match="outside what the layers can reach"):
        allocate_pruned(scan, list(SIZES), pruned_for(scan, list(SIZES), keep_params=2000), bounds)


def test_allocation_is_as_good_as_an_exhaustive_search_on_a_fine_grid():
    scan, target = _scan(SIZES, DROPS), 0.9
    chosen = allocate_sparsity(scan, list(SIZES), target, {})
    curves = {n: drop_curve(scan["layers"][n]["pruned"], 0.0, scan["baseline_acc"]) for n in SIZES}
    wanted, total = round(target * sum(SIZES.values())), sum(SIZES.values())
    best = float("inf")
    grid = [i / 200 for i in range(0, 197)]
    for s2, s3 in itertools.product(grid, grid):  # fc1 takes what is left
        rest = wanted - s2 * SIZES["fc2.weight"] - s3 * SIZES["fc3.weight"]
        s1 = rest / SIZES["fc1.weight"]
        if 0 <= s1 <= LEVELS[-1]:
            best = min(best, float(curves["fc1.weight"](s1) + curves["fc2.weight"](s2) + curves["fc3.weight"](s3)))
    assert chosen["predicted_total_drop"] <= best + 1e-3
    # and far better than the same sparsity everywhere
    uniform = sum(float(curves[n](target)) for n in SIZES)
    assert chosen["predicted_total_drop"] < uniform / 3
    assert chosen["sparsity"]["fc3.weight"] < chosen["sparsity"]["fc1.weight"]
    assert total  # the sizes are real


def test_allocation_says_what_cannot_be_reached():
    with pytest.raises(AllocationError, match=r"outside what the layers can reach"):
        allocate_sparsity(_scan(SIZES, DROPS), list(SIZES), 0.97, {"fc1.weight": (0.0, 0.96)})
    with pytest.raises(AllocationError, match=r"no sparsity within its bounds"):
        allocate_sparsity(_scan(SIZES, DROPS), list(SIZES), 0.5, {"fc3.weight": (0.99, 0.99)})


def test_a_lucky_point_of_the_scan_is_not_a_gain():
    drop = drop_curve([[0.5, 0.91], [0.8, 0.85], [0.9, 0.88]], 0.0, 0.9)
    assert drop(0.5) == 0.0  # above the baseline: no negative drop
    assert drop(0.9) == pytest.approx(0.05)  # never less than at a lower sparsity


def test_bits_from_a_bytes_budget_and_from_a_drop_budget():
    scan = _scan(SIZES, DROPS)
    names = dict(SIZES)  # nonzero weights per layer
    dense = sum(4 * n for n in SIZES.values())
    chosen = allocate_bits(scan, names, max_bytes=dense / 6)
    assert chosen["bytes"] <= dense / 6 and all(b is not None for b in chosen["bits"].values())
    loose = allocate_bits(scan, names, max_drop=0.02)
    assert loose["predicted_total_drop"] <= 0.02
    assert sorted(b for b in loose["bits"].values() if b is not None)  # something was quantized
    strict = allocate_bits(scan, names, max_drop=0.0)
    assert set(strict["bits"].values()) <= {8, None}  # only the lossless width, or float
    with pytest.raises(AllocationError, match="cannot fit"):
        allocate_bits(scan, names, max_bytes=100)


# ---- through the CLI, as a user runs it ------------------------------------------------------------------


def _stages(prune: dict, sensitivity: dict | None = None) -> dict:
    recipe = synthetic_recipe(epochs=3)
    recipe["model"]["args"]["hidden"] = [64, 32]
    scan = {"name": "scan", "kind": "sensitivity", "examples": 128, "sparsities": [0.5, 0.8, 0.9, 0.95, 0.98],
            "bits": [1, 2, 4], **(sensitivity or {})}
    recipe["stages"] = [recipe["stages"][0], scan, {"name": "prune", "kind": "prune", **prune}]
    return recipe


def test_sensitivity_stage_writes_its_scan_plot_and_declared_metrics(nnopt, write_recipe, tmp_path):
    from runner.recipe import load_recipe

    path = write_recipe(_stages({"sparsity": 0.5}))
    code, _, err = nnopt("run", path, "-O", tmp_path)
    assert code == 0, err
    folder = tmp_path / "tiny" / "02-scan"
    scan = json.loads((folder / "sensitivity.json").read_text())
    assert (folder / "sensitivity.png").stat().st_size > 10_000
    assert scan["examples"] == 128 and list(scan["layers"]) == ["fc1.weight", "fc2.weight", "fc3.weight"]
    metrics = read_metrics(tmp_path / "tiny", "02-scan")
    assert metrics["val_acc"] == scan["baseline_acc"] > 0.5  # trained: far above chance (0.1)
    for name, entry in scan["layers"].items():
        accuracies = [acc for _, acc in entry["pruned"]]
        assert [level for level, _ in entry["pruned"]] == [0.5, 0.8, 0.9, 0.95, 0.98]
        assert accuracies[-1] < scan["baseline_acc"]  # 98% of one layer gone costs accuracy
        assert [bits for bits, _ in entry["shared"]] == [1, 2, 4] and 0 <= entry["int8"] <= 1
    # an int8 weight format loses almost nothing; a 1-bit codebook loses more on some layer
    assert all(abs(e["int8"] - scan["baseline_acc"]) < 0.05 for e in scan["layers"].values())
    assert min(e["shared"][0][1] for e in scan["layers"].values()) < scan["baseline_acc"]
    declared = [m.name for m in load_recipe(path).stages[1].declared_metrics()]
    for metric, value in metrics.items():
        for name in ([f"{metric}.{key}" for key in value] if isinstance(value, dict) else [metric]):
            assert any(fnmatchcase(name, p) for p in declared), name
    # the model is handed on unchanged
    trained = torch.load(tmp_path / "tiny" / "01-train" / "model.pt", weights_only=True)
    scanned = torch.load(folder / "model.pt", weights_only=True)
    assert all(torch.equal(trained[k], scanned[k]) for k in trained)


def _masks(folder) -> dict[str, torch.Tensor]:
    state = torch.load(folder / "model.pt", weights_only=True)
    return {k: v for k, v in state.items() if k.endswith(".mask")}


def test_auto_prune_reaches_the_target_within_bounds_and_a_plain_recipe_reproduces_it(nnopt, write_recipe, tmp_path):
    prune = {"scope": "auto", "sparsity": 0.9, "allocation": {"sensitivity": "scan", "bounds": {"fc3": [0, 0.6]}}}
    code, _, err = nnopt("run", write_recipe(_stages(prune)), "-O", tmp_path / "auto")
    assert code == 0, err
    metrics = read_metrics(tmp_path / "auto" / "tiny", "03-prune")
    allocation = metrics["allocation"]
    sizes = {"fc1.weight": 32 * 64, "fc2.weight": 64 * 32, "fc3.weight": 32 * 10}
    assert sum(allocation["pruned"].values()) == round(0.9 * sum(sizes.values()))
    assert allocation["sparsity"]["fc3.weight"] <= 0.6 and allocation["sensitivity"] == "scan"
    assert metrics["layer_sparsity_after"] == {n: round(s, 6) for n, s in allocation["sparsity"].items()}
    # the drop the per-layer curves predicted, and the one measured with all layers pruned at once
    from runner.data.synthetic import synthetic
    from runner.modelio import load_model

    images, labels = synthetic(**_stages({})["data"]["args"]).val
    with torch.inference_mode():
        pruned_acc = float((load_model(tmp_path / "auto" / "tiny" / "03-prune")(images).argmax(1) == labels).float().mean())
    assert allocation["examples"] == 128 and allocation["scan_baseline_acc"] == read_metrics(tmp_path / "auto" / "tiny", "02-scan")["val_acc"]
    assert allocation["measured_total_drop"] == pytest.approx(allocation["scan_baseline_acc"] - pruned_acc, abs=1e-6)
    report = (tmp_path / "auto" / "tiny" / "report.md").read_text()
    assert "## Chosen automatically" in report and allocation["reproduce"] in report

    # `reproduce` is the plain recipe's fields: the same masks, without any scan
    import yaml

    plain = yaml.safe_load("{" + allocation["reproduce"] + "}")
    code, _, err = nnopt("run", write_recipe(_stages(plain), "plain.yaml"), "-O", tmp_path / "plain")
    assert code == 0, err
    auto_masks, plain_masks = _masks(tmp_path / "auto" / "tiny" / "03-prune"), _masks(tmp_path / "plain" / "tiny" / "03-prune")
    assert auto_masks.keys() == plain_masks.keys() and all(torch.equal(auto_masks[k], plain_masks[k]) for k in auto_masks)


def test_auto_prune_keeps_a_bytes_budget_to_the_weight(nnopt, write_recipe, tmp_path):
    budget = 4 * 700 + 2  # the fp32 values of 700 weights, and 2 bytes that hold no further one
    prune = {"scope": "auto", "allocation": {"sensitivity": "scan", "keep_bytes": budget, "bounds": {"fc3": [0, 0.5]}}}
    code, _, err = nnopt("run", write_recipe(_stages(prune)), "-O", tmp_path)
    assert code == 0, err
    allocation = read_metrics(tmp_path / "tiny", "03-prune")["allocation"]
    masks = _masks(tmp_path / "tiny" / "03-prune")
    assert sum(int(mask.sum()) for mask in masks.values()) == allocation["kept_params"] == 700
    assert allocation["kept_bytes"] == 2800 and int(masks["fc3.parametrizations.weight.0.mask"].sum()) >= 160


@pytest.mark.slow
def test_auto_prune_scans_in_place_without_a_sensitivity_stage(nnopt, write_recipe, tmp_path):
    recipe = _stages({"scope": "auto", "sparsity": 0.8})
    del recipe["stages"][1]
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 0, err
    allocation = read_metrics(tmp_path / "tiny", "02-prune")["allocation"]
    assert allocation["sensitivity"] == "scanned here"
    assert sum(allocation["pruned"].values()) == round(0.8 * (32 * 64 + 64 * 32 + 32 * 10))


@pytest.mark.parametrize("prune, message", [
    ({"scope": "auto", "sparsity": 0.9, "allocation": {"sensitivity": "scna"}},
     "stages[2].allocation.sensitivity: the recipe has no stage `scna`"),
    ({"scope": "auto", "sparsity": 0.9, "allocation": {"sensitivity": "train"}},
     "stage `train` is a train stage, not a sensitivity stage"),
    ({"scope": "layer", "sparsity": 0.9, "allocation": {"sensitivity": "scan"}}, "set `scope: auto`"),
    ({"scope": "auto", "sparsity": {"fc1": 0.9}}, "need `scope: layer`"),
    ({"scope": "auto", "sparsity": 0.9, "allocation": {"bounds": {"fc1": [0.9, 0.5]}}}, "above the maximum"),
    ({"scope": "auto", "sparsity": 0.9, "allocation": {"keep_params": 100}}, "give one target: `sparsity`, or"),
    ({"scope": "auto", "allocation": {"keep_params": 100, "keep_bytes": 400}}, "give one budget"),
    ({"scope": "auto"}, "give `sparsity` (or, with `scope: auto`, `allocation.keep_params` or `keep_bytes`)"),
    ({"scope": "layer"}, "give `sparsity`"),
])
def test_allocation_mistakes_are_located_validate_errors(nnopt, write_recipe, prune, message):
    code, _, err = nnopt("validate", write_recipe(_stages(prune)))
    assert code == 2
    assert message in " ".join(err.split()) and "recipe.yaml:" in err


def test_a_sensitivity_stage_named_before_it_runs_is_an_error(nnopt, write_recipe):
    recipe = _stages({"scope": "auto", "sparsity": 0.9, "allocation": {"sensitivity": "scan"}})
    recipe["stages"][1], recipe["stages"][2] = recipe["stages"][2], recipe["stages"][1]
    code, _, err = nnopt("validate", write_recipe(recipe))
    assert code == 2 and "stage `scan` runs after this one" in " ".join(err.split())


@pytest.mark.slow
def test_weight_sharing_bits_from_a_bytes_budget_and_from_a_drop_budget(nnopt, write_recipe, tmp_path):
    recipe = _stages({"sparsity": 0.5})
    share = {"name": "share", "kind": "quantize", "method": "weight_sharing", "kmeans_iterations": 10}
    values = (32 * 64 + 64 * 32 + 32 * 10) // 2  # nonzero weights after pruning half
    recipe["stages"].append({**share, "allocation": {"sensitivity": "scan", "max_bytes": values // 4}})
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "bytes")
    assert code == 0, err
    metrics = read_metrics(tmp_path / "bytes" / "tiny", "04-share")
    allocation = metrics["allocation"]
    assert allocation["sensitivity"] == "scan" and metrics["layer_bits"] == allocation["bits"]
    assert sum(n * b / 8 + 4 * 2**b for n, b in zip([1024, 1024, 160], allocation["bits"].values())) <= values // 4 + 3

    recipe["stages"][-1] = {**share, "allocation": {"max_drop": 0.0, "bits": [1, 2], "examples": 128}}  # scanned in place
    code, _, err = nnopt("run", write_recipe(recipe, "drop.yaml"), "-O", tmp_path / "drop")
    assert code == 0, err
    allocation = read_metrics(tmp_path / "drop" / "tiny", "04-share")["allocation"]
    assert allocation["sensitivity"] == "scanned here" and allocation["measured_drop"] <= 0.0
    assert allocation["reproduce"] == "bits: {" + ", ".join(
        f"{n}: {b}" for n, b in allocation["bits"].items() if b is not None) + "}"
