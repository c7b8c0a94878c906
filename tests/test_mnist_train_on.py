"""mnist `train_on`: the papers' 60k training images (train + val), and a located error for anything else."""

from __future__ import annotations

import torch

from runner.data import DATASETS
from tests.conftest import mnist_recipe


def test_train_on_train_plus_val_trains_on_all_60k_and_keeps_test_apart():
    classic = DATASETS.get("mnist")()
    papers = DATASETS.get("mnist")(train_on="train+val")
    assert [len(s[1]) for s in (papers.train, papers.val, papers.test)] == [60000, 10000, 10000]
    assert torch.equal(papers.train[0][:50000], classic.train[0]) and torch.equal(papers.train[1][50000:], classic.val[1])
    assert torch.equal(papers.val[0], classic.val[0])  # validation: images that are also trained on
    assert torch.equal(papers.test[0], classic.test[0])


def test_an_unknown_train_on_is_a_located_error(nnopt, write_recipe):
    recipe = mnist_recipe([{"name": "evaluate", "kind": "evaluate"}])
    recipe["data"]["args"] = {"train_on": "all"}
    code, _, err = nnopt("validate", write_recipe(recipe))
    assert code == 2
    assert "data.args.train_on" in err and "'train'" in err and "'train+val'" in err
