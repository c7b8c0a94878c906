"""The processes of a multi-process run: starting them, which rank runs what, models sent from rank 0."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from runner.errors import StageError
from runner.transforms import transforms_of
from runner.recipe.devices import world_size


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run; a one-process run is Ranks(0, 1)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def from_zero(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (pickled between this run's own processes only)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def launch(settings) -> Ranks:
    """Start every process of a multi-process run now, so each rank runs the pipeline from its first stage.

    Lightning's launcher re-executes this command once per extra local process (ddp, fsdp,
    deepspeed); under torchrun or SLURM the processes exist already and this only joins them into
    one process group, which every later Trainer reuses.
    """
    if world_size(settings) == 1:
        return Ranks()
    from lightning_fabric import Fabric

    fabric = Fabric(accelerator=settings.accelerator, devices=settings.devices, num_nodes=settings.num_nodes,
                    strategy=settings.strategy)
    fabric.launch()
    return Ranks(fabric.global_rank, fabric.world_size)


def state_digest(model: nn.Module) -> str:
    """A short hash of everything in the state dict (weights, masks, buffers, int8 packed weights), in name order."""
    digest = hashlib.sha256()

    def add(value) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu()
            if tensor.is_quantized:
                add(tensor.int_repr())
                tensor = tensor.dequantize()  # carries the scales and zero points
            digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, (tuple, list)):
            for item in value:
                add(item)
        else:
            digest.update(repr(value).encode())

    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        add(value)
    return digest.hexdigest()[:16]


def run_on_zero(ranks: Ranks, stage: str, work: Callable[[], Any]) -> Any:
    """Rank 0 runs `work` and returns its result; the others wait (at a broadcast, which is a barrier)
    and return None, or fail too when rank 0 failed, so no rank waits forever."""
    if ranks.world_size == 1:
        return work()
    if not ranks.is_zero:
        if ranks.from_zero(None):
            raise StageError(stage, f"rank 0 failed it; this is rank {ranks.rank}, stopping too")
        return None
    try:
        result = work()
    except BaseException:
        ranks.from_zero(True)
        raise
    ranks.from_zero(False)
    return result


def buffers_from_zero(ranks: Ranks, model: nn.Module) -> None:
    """Every rank takes rank 0's buffers (BatchNorm statistics): DDP's own rule before each forward
    pass, applied once more after the last one, which each rank ran on its own share of the batch."""
    if ranks.world_size == 1:
        return
    buffers = ranks.from_zero(dict(model.named_buffers()) if ranks.is_zero else None)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])


def model_from_zero(ranks: Ranks, model_spec, model: nn.Module | None) -> nn.Module:
    """Rank 0's model on every rank: its spec, recorded transforms and weights travel, never its code."""
    if ranks.world_size == 1:
        return model
    payload = ranks.from_zero((transforms_of(model), model.state_dict()) if ranks.is_zero else None)
    if ranks.is_zero:
        return model
    from runner.modelio import rebuild

    return rebuild(model_spec, *payload)
