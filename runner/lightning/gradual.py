"""GradualPruning: Zhu & Gupta 2017 automated gradual pruning as a Lightning callback."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from typing_extensions import override

from runner import pruning
from runner.errors import StageError
from runner.lightning.units import stage_length, to_steps

# Zhu & Gupta ask for the final sparsity; we allow 0.1 point of slack and fail loudly beyond it
# (SparseML issue #1117: a schedule cut short silently left the model under-pruned).
FINAL_TOLERANCE = 0.001


def agp_sparsity(step: int, start: int, end: int, initial: float, final: float) -> float:
    """Zhu & Gupta 2017 eq. 1: s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3, with n dt = end - t0."""
    progress = min(1.0, max(0.0, (step - start) / (end - start)))
    return final + (initial - final) * (1 - progress) ** 3


class GradualPruning(Callback):
    """Prunes the module's model at steps start, start+every, ..., end (end always included), each time to
    the cubic schedule's sparsity; `check_finished` says whether the final target was reached. The fit calls it
    after every fit, including one resumed from the checkpoint of a fit that was already over, where Lightning
    runs no training hooks at all.

    The masks are parametrizations inside the model, so Lightning checkpoints hold them; this
    callback's own state is which steps it has pruned at and its random generator.
    """

    def __init__(self, spec, stage: str, seed: int):
        self.spec = spec
        self.stage = stage
        self.generator = torch.Generator().manual_seed(seed)
        self.finals: dict[str, float] = {}
        self.events: list[int] = []
        self.pruned_at: dict[int, float] = {}  # step -> overall sparsity reached there

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Masks must exist before the optimizer is built: it then holds the parametrized originals.
        self.finals = pruning.resolve_targets(self.stage, pl_module.model, self.spec.sparsity, self.spec.params)
        pruning.add_masks(pl_module.model, list(self.finals))
        self.events = self._events(trainer)

    def _events(self, trainer: pl.Trainer) -> list[int]:
        steps_per_epoch, total = stage_length(trainer)
        start, end, every = (to_steps(m, steps_per_epoch, total)
                             for m in (self.spec.start, self.spec.end, self.spec.every))
        if not 0 <= start < end < total:
            raise StageError(self.stage, f"the gradual pruning window (steps {start} to {end}) must lie inside the "
                                         f"stage's {total} steps ({steps_per_epoch} per epoch) with start before end",
                             "move `gradual_pruning.start`/`end` (the last prune happens at `end`)")
        if every < 1:
            raise StageError(self.stage, "`gradual_pruning.every` is shorter than one optimizer step")
        return sorted(set(range(start, end, every)) | {end})

    def targets_at(self, step: int) -> dict[str, float]:
        start, end = self.events[0], self.events[-1]
        initial = self.spec.initial_sparsity
        return {name: agp_sparsity(step, start, end, initial, final) for name, final in self.finals.items()}

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step in self.events and step not in self.pruned_at:
            pruning.prune_weights(self.stage, pl_module.model, self.targets_at(step), self.spec.scope,
                                  self.spec.method, self.generator, strict=False)
            self.pruned_at[step] = pruning.sparsity_of(pl_module.model, list(self.finals))[0]

    def check_finished(self, step: int, model: torch.nn.Module) -> None:
        """The stage's promise: the last prune happened and left the final sparsity (and no layer empty, unless
        the recipe allows it)."""
        if self.events[-1] not in self.pruned_at:
            raise StageError(self.stage, f"training stopped at step {step}, before gradual pruning "
                                         f"reached its final sparsity at step {self.events[-1]}",
                             "end the schedule earlier or remove early stopping")
        pruning.check_reached(self.stage, model, self.finals, self.spec.scope, FINAL_TOLERANCE)
        if not self.spec.allow_empty_layers:
            pruning.check_not_emptied(self.stage, model, list(self.finals))

    def summary(self, model) -> dict:
        overall, layers = pruning.sparsity_of(model, list(self.finals))
        return {"sparsity": overall, "layer_sparsity": layers,
                "pruned_at_steps": {str(step): value for step, value in sorted(self.pruned_at.items())}}

    @override
    def state_dict(self) -> dict:
        return {"pruned_at": dict(self.pruned_at), "generator": self.generator.get_state()}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        self.pruned_at = {int(k): v for k, v in state_dict["pruned_at"].items()}
        self.generator.set_state(state_dict["generator"])
