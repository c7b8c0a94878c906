"""Data read example by example from torch Datasets through DataLoader workers: the same global
batch, rank sharding and exact mid-epoch resume as the in-memory batches."""

from __future__ import annotations

import os

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from runner.data import DatasetSplits, DataUnavailable
from runner.data.batches import epoch_order, rank_share

SPLITS = ("train", "val", "test")


def augmentation_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one example's random transforms: a function of what is drawn, never of which worker
    or rank draws it, or how many it drew before, so a resumed run and a run on more processes
    augment every example exactly as an uninterrupted one-process run does."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % 2**63


class EpochSampler(Sampler):
    """Yields (index, augmentation seed) keys for one rank in one epoch, from the `skip`-th on."""

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int, world_size: int):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0  # examples of this rank's epoch already trained on (a resumed run)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rank_size(self) -> int:
        return self.size // self.world_size if self.world_size > 1 else self.size

    def __len__(self) -> int:
        return self.rank_size() - self.skip

    def __iter__(self):
        order = epoch_order(self.size, self.seed, self.epoch, self.shuffle, self.rank, self.world_size)
        for index in order[self.skip:].tolist():
            yield index, augmentation_seed(self.seed, self.epoch, index)


class StreamingBatches:
    """Batches from a DataLoader over `dataset`, with the contract of TensorBatches: `batch_size` is the
    global batch (each of `world_size` ranks loads batch_size / world_size), and `state_dict` is the
    position in the epoch, which Lightning stores in checkpoints, so a resumed run skips exactly the
    batches already trained on without reading them. Lightning fetches no batch ahead from an
    iterable with a length, so a batch handed out is a batch trained on; the workers' read-ahead is
    not counted."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, **loader_options):
        if batch_size % world_size:
            raise ValueError(f"the global batch {batch_size} does not split over {world_size} processes")
        self.batch_size = batch_size // world_size  # per rank
        self._sampler = EpochSampler(len(dataset), shuffle, seed, rank, world_size)
        # Its own generator: creating an iterator draws the workers' base seed, which must not move the
        # global generator that dropout and the resumed RNG state depend on.
        self.loader = DataLoader(dataset, batch_size=self.batch_size, sampler=self._sampler,
                                 generator=torch.Generator().manual_seed(seed), **loader_options)
        self._served = 0
        self._resume_at: tuple[int, int] | None = None  # (epoch, batches to skip) from a checkpoint

    # Lightning calls `loader.sampler.set_epoch(epoch)` at the start of every training epoch.
    batch_sampler = None

    @property
    def sampler(self) -> EpochSampler:
        return self._sampler

    # Lightning shuts a loader's workers down through `_iterator` when a fit ends or is interrupted; a
    # forked worker left alive would hold the run folder's lock (an inherited flock) after the run.
    @property
    def _iterator(self):
        return self.loader._iterator

    @_iterator.setter
    def _iterator(self, value) -> None:
        self.loader._iterator = value

    def state_dict(self) -> dict:
        return {"epoch": self._sampler.epoch, "served": self._served}

    def load_state_dict(self, state: dict) -> None:
        self._sampler.epoch = state["epoch"]
        self._resume_at = (state["epoch"], state["served"])

    def __len__(self) -> int:
        return -(-self._sampler.rank_size() // self.batch_size)

    def __iter__(self):
        resume = self._resume_at
        skip = resume[1] if resume is not None and resume[0] == self._sampler.epoch else 0
        self._resume_at = None
        self._sampler.skip = skip * self.batch_size
        self._served = skip
        for batch in self.loader:
            self._served += 1
            yield batch


class Split(Dataset):
    """One split in its fixed order (`indices` into `base`), each example through `transform` with its
    random draws seeded by the key the sampler hands out."""

    def __init__(self, base: Dataset, indices: list[int], transform):
        self.base, self.indices, self.transform = base, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]):
        position, draw = key
        image, label = self.base[self.indices[position]]
        # fork_rng: with workers: 0 this runs in the training process, whose generator must not move.
        # torch.manual_seed would also queue a CUDA seeding with its stack trace: 5 ms an example.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(draw)
            image = self.transform(image)
        if isinstance(image, torch.Tensor):  # a plain tensor, not torchvision's Image subclass, reaches the model
            image = image.as_subclass(torch.Tensor)
        return image, int(label)


def fixed_order(size: int, limit: int | None, seed: int) -> list[int]:
    """A split's fixed order: shuffled once by `seed`, so its first examples (the probes, and a
    `limit` subset) hold every class even where the files are sorted by class."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return order if limit is None else order[:limit]


def resolve_workers(workers: int | str) -> int:
    """`auto`: a worker per core left over after the training process, at most 8."""
    if workers != "auto":
        return int(workers)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores - 1))


class StreamingData(pl.LightningDataModule):
    """The data contract over DatasetSplits; `batch_size` is public so Lightning's tuner can scale it."""

    def __init__(self, splits: DatasetSplits, batch_size: int, eval_batch_size: int, limit, seed: int,
                 transforms: tuple, loader):
        super().__init__()
        self.num_classes = splits.num_classes
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.loader = loader
        train_transform, eval_transform = transforms
        self._eval = {}
        for name in SPLITS:
            base = getattr(splits, name)
            if len(base) == 0:
                raise DataUnavailable(f"the {name} split is empty")
            self._eval[name] = Split(base, fixed_order(len(base), getattr(limit, name), seed), eval_transform)
        self._train = Split(splits.train, self._eval["train"].indices, train_transform)
        self._input_shape: tuple[int, ...] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self._input_shape is None:
            self._input_shape = tuple(self.examples("train", 1)[0].shape[1:])
        return self._input_shape

    def split_size(self, split: str) -> int:
        return len(self._eval[split])

    def examples(self, split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `count` examples of `split` (fewer if it is smaller) in its fixed order, after the
        eval transforms (the training split's too: probes are never augmented)."""
        dataset = self._eval[split]
        pairs = [dataset[(position, 0)] for position in range(min(count, len(dataset)))]
        images, labels = zip(*pairs)
        return _stack(images, split), torch.tensor(labels, dtype=torch.int64)

    def _loader_options(self) -> dict:
        workers = resolve_workers(self.loader.workers)
        pin = self.loader.pin_memory
        if pin == "auto":  # pinned host memory only pays off when batches go to a CUDA device
            pin = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        options = {"num_workers": workers, "pin_memory": pin}
        if workers > 0:
            options["persistent_workers"] = self.loader.persistent_workers
            if self.loader.prefetch_factor is not None:
                options["prefetch_factor"] = self.loader.prefetch_factor
        return options

    def _batches(self, dataset: Split, batch_size: int, shuffle: bool) -> StreamingBatches:
        return StreamingBatches(dataset, batch_size, shuffle, seed=self.seed, **rank_share(self.trainer),
                                **self._loader_options())

    def train_dataloader(self):
        return self._batches(self._train, self.batch_size, shuffle=True)

    def val_dataloader(self):
        return self._batches(self._eval["val"], self.eval_batch_size, shuffle=False)

    def test_dataloader(self):
        return self._batches(self._eval["test"], self.eval_batch_size, shuffle=False)


def _stack(images, split: str) -> torch.Tensor:
    if not all(isinstance(image, torch.Tensor) and image.is_floating_point() for image in images):
        kind = type(images[0]).__name__
        raise DataUnavailable(f"the {split} split's transforms give `{kind}` examples, not float tensors",
                              "end `data.transforms` with `ToImage` and `{ToDtype: {dtype: float32, scale: true}}`")
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) > 1:
        raise DataUnavailable(f"the {split} split's examples differ in shape ({', '.join(map(str, sorted(shapes)[:4]))})",
                              "add `{Resize: {size: [H, W]}}` (or CenterCrop) to `data.transforms` so every example "
                              "has one shape")
    return torch.stack(images)
