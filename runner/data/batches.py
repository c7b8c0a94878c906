"""In-memory batches for Lightning without DataLoader workers, collate, or per-sample indexing."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from runner.data import Splits


class TensorBatches:
    """Iterates (x, y) batches of tensors already in memory.

    Each epoch draws one permutation (seeded by seed and epoch, so every rank and every resumed
    run sees the same order), gathers the data once, and yields contiguous slices. Under a
    multi-process strategy each rank takes every world_size-th example of that permutation.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0):
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0

    # Lightning calls `loader.sampler.set_epoch(epoch)` at the start of every training epoch and
    # looks for a batch sampler; these two attributes let it treat us like a DataLoader.
    batch_sampler = None

    @property
    def sampler(self):
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @staticmethod
    def _rank_world() -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _rank_size(self) -> int:
        _, world = self._rank_world()
        return len(self.x) // world if world > 1 else len(self.x)

    def __len__(self) -> int:
        return -(-self._rank_size() // self.batch_size)

    def __iter__(self):
        rank, world = self._rank_world()
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(len(self.x), generator=generator)
        else:
            order = torch.arange(len(self.x))
        if world > 1:
            order = order[: self._rank_size() * world][rank::world]
        x, y = (self.x[order], self.y[order]) if self.shuffle or world > 1 else (self.x, self.y)
        for start in range(0, len(x), self.batch_size):
            yield x[start:start + self.batch_size], y[start:start + self.batch_size]


def _limit(split: tuple[torch.Tensor, torch.Tensor], limit: int | None, seed: int):
    """The first `limit` examples after a fixed shuffle, so a subset keeps every class."""
    x, y = split
    if limit is None or limit >= len(x):
        return x, y
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit]
    return x[keep], y[keep]


class InMemoryData(pl.LightningDataModule):
    """A LightningDataModule over Splits; `batch_size` is public so Lightning's tuner can scale it."""

    def __init__(self, splits: Splits, batch_size: int, eval_batch_size: int, limit, seed: int):
        super().__init__()
        self.num_classes = splits.num_classes
        self.train = _limit(splits.train, limit.train, seed)
        self.val = _limit(splits.val, limit.val, seed)
        self.test = _limit(splits.test, limit.test, seed)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train[0].shape[1:])

    def train_dataloader(self):
        return TensorBatches(*self.train, self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self):
        return TensorBatches(*self.val, self.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return TensorBatches(*self.test, self.eval_batch_size, shuffle=False)


def build_data(spec, seed: int) -> InMemoryData:
    """Build the recipe's `data:` block (a DataSpec) into a data module."""
    from runner.data import DATASETS

    splits = DATASETS.get(spec.name)(**spec.args)
    return InMemoryData(splits, spec.batch_size, spec.eval_batch_size, spec.limit, seed)
