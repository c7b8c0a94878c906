"""Data: the offline MNIST copy, synthetic data, and in-memory batches (incl. rank sharding)."""

from __future__ import annotations

import torch

from runner.data import DATASETS
from runner.data.batches import TensorBatches


def test_mnist_is_the_classic_split():
    splits = DATASETS.get("mnist")()
    assert [len(s[0]) for s in (splits.train, splits.val, splits.test)] == [50000, 10000, 10000]
    assert splits.train[0].shape[1:] == (1, 28, 28) and splits.train[0].dtype == torch.float32
    assert 0 <= float(splits.train[0].min()) and float(splits.train[0].max()) <= 1
    assert torch.bincount(splits.test[1]).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_synthetic_is_deterministic():
    a, b = DATASETS.get("synthetic")(seed=3), DATASETS.get("synthetic")(seed=3)
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[1], b.test[1])


def test_batches_cover_the_data_once_per_epoch_in_a_new_order():
    x, y = torch.arange(100).float().unsqueeze(1), torch.arange(100)
    loader = TensorBatches(x, y, batch_size=32, shuffle=True, seed=0)
    assert len(loader) == 4
    first = torch.cat([b[1] for b in loader])
    loader.set_epoch(1)
    second = torch.cat([b[1] for b in loader])
    assert sorted(first.tolist()) == list(range(100)) == sorted(second.tolist())
    assert not torch.equal(first, second)
    loader.set_epoch(0)
    assert torch.equal(torch.cat([b[1] for b in loader]), first)  # a resumed epoch sees the same order


def test_ranks_batch_i_together_is_the_one_process_batch_i():
    x, y = torch.arange(12).float().unsqueeze(1), torch.arange(12)
    single = [b[1] for b in TensorBatches(x, y, batch_size=4, shuffle=True, seed=0)]
    ranks = [[b[1] for b in TensorBatches(x, y, batch_size=4, shuffle=True, seed=0, rank=r, world_size=2)]
             for r in (0, 1)]
    assert [len(batches) for batches in ranks] == [3, 3] and all(len(b) == 2 for b in ranks[0] + ranks[1])
    assert not set(torch.cat(ranks[0]).tolist()) & set(torch.cat(ranks[1]).tolist())
    for i, whole in enumerate(single):
        assert sorted(torch.cat([ranks[0][i], ranks[1][i]]).tolist()) == sorted(whole.tolist())
