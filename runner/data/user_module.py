"""The data contract around a user's own LightningDataModule (`data: {import: ...}`): its loaders as they are."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from runner.data import DataUnavailable

# Recipe fields that shape nnopt's own loaders; a DataModule brings its own, so they would be ignored.
NOT_FOR_A_MODULE = ("batch_size", "eval_batch_size", "limit", "transforms", "loader")


class ModuleData(pl.LightningDataModule):
    """Delegates Lightning's hooks and the loaders to `module`; adds examples, split sizes and the input
    shape, read from its loaders. Its batch sizes are its own (per process under DDP, as Lightning's
    sampler injection makes them), and a mid-epoch resume is exact only if its train loader is stateful
    (has state_dict/load_state_dict, as torchdata's StatefulDataLoader does)."""

    def __init__(self, module: pl.LightningDataModule, spec):
        set_here = [field for field in NOT_FOR_A_MODULE if field in spec.model_fields_set]
        if set_here:
            raise DataUnavailable(f"`{spec.import_}` returned a LightningDataModule, which makes its own loaders: "
                                  f"data.{', data.'.join(set_here)} would be ignored",
                                  "drop them from the recipe and set them in the DataModule")
        if not isinstance(getattr(module, "num_classes", None), int):
            raise DataUnavailable(f"the LightningDataModule `{spec.import_}` returned has no integer `num_classes`",
                                  "set `self.num_classes` in its __init__")
        self.module = module
        self._set_up: set[str] = set()
        super().__init__()
        self.num_classes = module.num_classes
        self._batch_size: int | None = None

    # Lightning gives the data module its trainer; the user's module may read it (world size, device).
    @property
    def trainer(self):
        return self.module.trainer

    @trainer.setter
    def trainer(self, trainer) -> None:
        if hasattr(self, "module"):
            self.module.trainer = trainer

    @property
    def batch_size(self) -> int:
        """The module's `batch_size`, which Lightning's tuner scales, else the size of its first batch."""
        if hasattr(self.module, "batch_size"):
            return self.module.batch_size
        if self._batch_size is None:
            self._batch_size = len(next(iter(self._loader("train")))[0])
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self.module.batch_size = value

    @property
    def eval_batch_size(self) -> int:
        return getattr(self.module, "eval_batch_size", self.batch_size)

    def prepare_data(self) -> None:
        self.module.prepare_data()

    def setup(self, stage: str) -> None:
        self.module.setup(stage)
        self._set_up.add(stage)

    def teardown(self, stage: str) -> None:
        self.module.teardown(stage)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        return self.module.on_before_batch_transfer(batch, dataloader_idx)

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return self.module.transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.module.on_after_batch_transfer(batch, dataloader_idx)

    def train_dataloader(self):
        return self.module.train_dataloader()

    def val_dataloader(self):
        return self.module.val_dataloader()

    def test_dataloader(self):
        return self.module.test_dataloader()

    def _loader(self, split: str):
        """A split's loader outside a Lightning run: the module is prepared and set up first, once."""
        stage = "test" if split == "test" else "fit"
        if stage not in self._set_up:
            self.prepare_data()
            self.setup(stage)
        return getattr(self.module, f"{split}_dataloader")()

    def split_size(self, split: str) -> int:
        loader = self._loader(split)
        dataset = getattr(loader, "dataset", None)
        if dataset is not None and hasattr(dataset, "__len__"):
            return len(dataset)
        return sum(len(batch[0]) for batch in loader)

    def examples(self, split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `count` examples of `split` as the module's loader yields them."""
        images, labels, have = [], [], 0
        for x, y in self._loader(split):
            images.append(x[: count - have])
            labels.append(y[: count - have])
            have += len(images[-1])
            if have >= count:
                break
        return torch.cat(images), torch.cat(labels)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.examples("train", 1)[0].shape[1:])
