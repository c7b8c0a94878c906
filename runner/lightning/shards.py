"""RankExamples: what each rank of a multi-process fit trained on, so disjoint shards can be checked."""

from __future__ import annotations

import hashlib

import pytorch_lightning as pl
import torch
import torch.distributed as dist


class RankExamples(pl.Callback):
    """Hashes every training example each rank sees, per epoch; at the end of the fit the ranks exchange
    their sets and `summary` says how many each trained on, how many two ranks shared and how many distinct
    examples the epoch covered. Content hashes, not indices: the check holds whatever the data source."""

    def __init__(self):
        self.seen: dict[int, set[bytes]] = {}
        self.counts: dict[int, int] = {}
        self.summary: list[dict] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.world_size == 1:
            return
        rows = batch[0].detach().cpu().flatten(1).contiguous()
        epoch = trainer.current_epoch
        self.seen.setdefault(epoch, set()).update(hashlib.blake2b(row.numpy().tobytes(), digest_size=8).digest()
                                                  for row in rows)
        self.counts[epoch] = self.counts.get(epoch, 0) + len(rows)

    def on_train_end(self, trainer, pl_module):
        if trainer.world_size == 1 or not dist.is_initialized():
            return
        ranks: list = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, (self.counts, self.seen))
        self.summary = []
        for epoch in sorted(ranks[0][0]):
            sets = [seen.get(epoch, set()) for _, seen in ranks]
            self.summary.append({
                "epoch": epoch, "per_rank": [counts.get(epoch, 0) for counts, _ in ranks],
                "shared": sum(len(a & b) for i, a in enumerate(sets) for b in sets[i + 1:]),
                "distinct": len(set().union(*sets)),
            })
