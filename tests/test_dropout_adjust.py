"""Retraining with Han et al. 2015 §3.2's dropout adjustment (`dropout: {adjust: sqrt_kept}`): each dropout trains at
D_o * sqrt(kept) of the layer it feeds, in finetune and in each iterative_prune round; refused at validate where it
cannot apply; an interrupted finetune resumes to the same result."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import read_metrics, run_straight_and_resumed, untimed_metrics
from tests.test_resume import resumable_recipe

ADJUST = {"adjust": "sqrt_kept"}
SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9}

# A user callback (trainer.callbacks) that watches the dropout modules themselves during every training step: the
# ratio each has, and the share of its nonzero inputs it zeroes (what the ratio does, measured).
CALLBACKS = '''
import json
import pytorch_lightning as pl
import torch


class WatchDropout(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        self.ratios, self.counts, self.hooks = set(), {}, []
        for name, module in pl_module.model.named_modules():
            if isinstance(module, torch.nn.Dropout):
                self.counts[name] = [0, 0]
                self.hooks.append(module.register_forward_hook(self._count(name)))

    def _count(self, name):
        def hook(module, inputs, output):
            if module.training:
                alive = inputs[0] != 0
                self.counts[name][0] += int((output[alive] == 0).sum())
                self.counts[name][1] += int(alive.sum())
        return hook

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.ratios.add(tuple(sorted((name, module.p) for name, module in pl_module.model.named_modules()
                                     if isinstance(module, torch.nn.Dropout))))

    def on_train_end(self, trainer, pl_module):
        for hook in self.hooks:
            hook.remove()
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"ratios": [dict(r) for r in sorted(self.ratios)],
                                     "dropped": {n: zeroed / alive for n, (zeroed, alive) in self.counts.items()}}) + "\\n")
'''


def lenet_recipe(tmp_path, stages: list[dict]) -> dict:
    """LeNet-300-100 with dropout 0.2 after each hidden layer, on 32 synthetic features: fc1 32x300, fc2 300x100,
    fc3 100x10 (so 9% and 26% of fc2 and fc3 are whole weights)."""
    (tmp_path / "watch.py").write_text(CALLBACKS)
    return {"name": "tiny", "seed": 0, "model": {"name": "lenet_300_100", "args": {"in_features": 32, "dropout": 0.2}},
            "data": {"name": "synthetic", "batch_size": 32,
                     "args": {"shape": [32], "num_train": 512, "num_val": 128, "num_test": 128, "noise": 2.0}},
            "trainer": {"progress_bar": False,
                        "callbacks": [{"import": "watch:WatchDropout", "args": {"path": str(tmp_path / "seen.jsonl")}}]},
            "stages": stages}


def test_each_retraining_trains_at_the_adjusted_ratios(nnopt, write_recipe, tmp_path):
    """train -> prune to 8/9/26% -> finetune -> two iterative rounds halving what remains: drop1 feeds fc2 and drop2
    fc3, so finetune trains at 0.2*sqrt(0.09) = 0.06 and 0.2*sqrt(0.26), the rounds at 0.2*sqrt of 0.045/0.13 and
    0.0225/0.065, each from the original 0.2; the dropout modules hold those ratios in every step and zero that share
    of their inputs."""
    recipe = lenet_recipe(tmp_path, [
        {"name": "train", "kind": "train", "epochs": 1, "optimizer": SGD},
        {"name": "prune", "kind": "prune", "sparsity": {"fc1": 0.92, "fc2": 0.91, "fc3": 0.74}},
        {"name": "finetune", "kind": "finetune", "epochs": 1, "optimizer": SGD, "dropout": ADJUST},
        {"name": "rounds", "kind": "iterative_prune", "rounds": 2, "fraction": 0.5,
         "retrain": {"epochs": 1, "optimizer": SGD, "dropout": ADJUST}},
    ])
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path / "out")
    assert code == 0, err
    run_dir = tmp_path / "out" / "tiny"
    kept = {"finetune": (0.09, 0.26), "round 1": (0.045, 0.13), "round 2": (0.0225, 0.065)}
    adjusted = {fit: {"drop1": {"before": 0.2, "after": pytest.approx(0.2 * math.sqrt(fc2)), "layer": "fc2", "kept": fc2},
                      "drop2": {"before": 0.2, "after": pytest.approx(0.2 * math.sqrt(fc3)), "layer": "fc3", "kept": fc3}}
                for fit, (fc2, fc3) in kept.items()}
    finetune, rounds = read_metrics(run_dir, "03-finetune"), read_metrics(run_dir, "04-rounds")["rounds"]
    reported = {"finetune": finetune["dropout"], "round 1": rounds[0]["dropout"], "round 2": rounds[1]["dropout"]}
    assert reported == adjusted
    # kept is the layer's share of nonzero weights that the stages themselves report
    assert [1 - r["layer_sparsity"]["fc2.weight"] for r in rounds] == pytest.approx([0.045, 0.0225], abs=1e-9)

    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert len(seen) == 4  # train, finetune, two rounds
    assert seen[0]["ratios"] == [{"drop1": 0.2, "drop2": 0.2}]  # the dense training: the model's own ratios
    for watched, fit in zip(seen[1:], kept):
        ratios = {name: reported[fit][name]["after"] for name in ("drop1", "drop2")}
        assert watched["ratios"] == [ratios], fit  # the same in every step of the fit
        for name, share in watched["dropped"].items():
            assert share == pytest.approx(ratios[name], abs=0.015), (fit, name)  # tens of thousands of draws
    assert seen[0]["dropped"]["drop1"] == pytest.approx(0.2, abs=0.015)


@pytest.mark.parametrize("where", ["finetune", "retrain"])
def test_a_model_without_dropout_is_refused_at_the_field(nnopt, write_recipe, tmp_path, where):
    stage = ({"name": "finetune", "kind": "finetune", "epochs": 1, "optimizer": SGD, "dropout": ADJUST}
             if where == "finetune" else
             {"name": "rounds", "kind": "iterative_prune", "rounds": 1, "fraction": 0.5,
              "retrain": {"epochs": 1, "optimizer": SGD, "dropout": ADJUST}})
    recipe = lenet_recipe(tmp_path, [{"name": "prune", "kind": "prune", "sparsity": 0.5}, stage])
    del recipe["model"]["args"]["dropout"]
    path = write_recipe(recipe)
    code, out, err = nnopt("validate", path)
    err = " ".join(err.split())
    field = "stages[1].dropout" if where == "finetune" else "stages[1].retrain.dropout"
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if text.strip() == "dropout:")
    assert code == 2 and f"{path}:{line}:" in err and f"{field}: the dropout adjustment cannot apply: the model has " \
        "no dropout module" in err and "`model.args.dropout`" in err, out + err


USER_MODELS = '''
import torch
from torch import nn


class Head(nn.Module):
    """Dropout on the logits: it feeds no layer."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = nn.Linear(32, num_classes)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return self.drop(self.fc(x))


class Branchy(nn.Module):
    """Control flow on the data: torch.fx cannot trace it."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.fc(self.drop(x))


class Residual(nn.Module):
    """The dropout's output is summed with a layer's output, then classified: it feeds no one layer."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.fc2(self.drop(x) + self.fc1(x))
'''


@pytest.mark.parametrize("model, problem", [
    ("Head", "`drop` reaches the model's output without passing a Linear or Conv layer"),
    ("Branchy", "torch.fx cannot trace the model (TraceError: symbolically traced variables cannot be used as inputs "
                "to control flow)"),
    ("Residual", "`drop` is combined with `fc1` in `add` before it reaches a Linear or Conv layer"),
])
def test_dropout_the_adjustment_cannot_follow_is_refused(nnopt, write_recipe, tmp_path, model, problem):
    (tmp_path / "user_models.py").write_text(USER_MODELS)
    recipe = lenet_recipe(tmp_path, [{"name": "prune", "kind": "prune", "sparsity": 0.5},
                                     {"name": "finetune", "kind": "finetune", "epochs": 1, "optimizer": SGD,
                                      "dropout": ADJUST}])
    recipe["model"] = {"import": f"user_models:{model}"}
    path = write_recipe(recipe)
    assert nnopt("validate", path)[0] == 0  # user code runs only when asked
    for command in (("validate", path, "--build-model"), ("run", path, "-O", tmp_path / "out")):
        code, out, err = nnopt(*command)
        err = " ".join(err.split())
        assert code == 2 and f"stages[1].dropout: the dropout adjustment cannot apply: {problem}" in err, out + err
        assert f"{path}:" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "tiny").exists()  # refused before any stage ran


def test_interrupted_adjusted_finetune_resumes_to_the_same_result(nnopt, write_recipe, tmp_path, monkeypatch):
    """The ratios are computed again from the pruned model a resumed run reloads: it ends as the straight run."""
    recipe = resumable_recipe()  # an MLP with dropout 0.3, checkpoints every 8 steps (16 per epoch)
    recipe["stages"] = [{**recipe["stages"][0], "epochs": 1},  # 4 checkpoints: 8, 16, end of epoch 0 and of the fit
                        {"name": "prune", "kind": "prune", "sparsity": 0.8, "scope": "global"},
                        {"name": "finetune", "kind": "finetune", "epochs": 2, "dropout": ADJUST,
                         "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9}}]
    run = run_straight_and_resumed(nnopt, monkeypatch, write_recipe(recipe), tmp_path,
                                   checkpoints=4 + 4)  # finetune's step 24, mid-epoch 1
    assert "finetune (finetune): unfinished: resumes from its last checkpoint at step 24" in run.out
    straight, resumed = run.straight, run.resumed
    expected = untimed_metrics(straight, "03-finetune")
    assert untimed_metrics(resumed, "03-finetune") == expected
    assert expected["dropout"]["drop1"]["after"] < 0.3  # it did adjust
    weights = torch.load(resumed / "03-finetune" / "model.pt", weights_only=True)
    straight_weights = torch.load(straight / "03-finetune" / "model.pt", weights_only=True)
    assert all(torch.equal(weights[k], straight_weights[k]) for k in straight_weights)


def test_the_adjustment_is_part_of_the_fingerprint(tmp_path):
    from runner.plan import fingerprints
    from runner.recipe import load_recipe
    import yaml

    recipe = lenet_recipe(tmp_path, [{"name": "prune", "kind": "prune", "sparsity": 0.5},
                                     {"name": "finetune", "kind": "finetune", "epochs": 1, "optimizer": SGD}])
    prints = []
    for adjust in (None, ADJUST):
        if adjust is not None:
            recipe["stages"][1]["dropout"] = adjust
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        prints.append(fingerprints(load_recipe(tmp_path / "recipe.yaml"), inputs={}))
    assert prints[0][0] == prints[1][0] and prints[0][1] != prints[1][1]
