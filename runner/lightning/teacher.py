"""The teacher of a distilled fit: an earlier stage's model, or a model spec with its trained weights, giving soft
targets in eval mode, without gradients."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from runner.modelio import initial_model


class Teacher:
    """Not an nn.Module on purpose: its weights stay out of the student's optimizer, state dict and checkpoints
    (it is reloaded from its stage's finished artifact, so a resumed fit sees the same teacher)."""

    def __init__(self, label: str, model: nn.Module):
        self.label = label  # the stage's name, or the model spec's architecture and weights
        self.model = model.eval().requires_grad_(False)
        self.seconds = 0.0  # wall time of its forward passes in this fit (the resumed part only, after a resume)
        self.examples = 0  # examples it scored in this fit, on this process (likewise)

    @classmethod
    def of(cls, teacher, ctx) -> "Teacher":
        """The `distillation.teacher` of a spec: an earlier stage's finished model by name, or a model spec
        built and loaded with its `weights:` (checked against the data's classes, errors located in the recipe)."""
        if isinstance(teacher, str):
            return cls(teacher, ctx.load(teacher))
        source = teacher.name or teacher.import_ or teacher.torchvision or teacher.timm
        return cls(f"{source} ({teacher.weights})", initial_model(teacher, ctx.data)[0])

    def to(self, device: torch.device) -> None:
        self.model.to(device)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        logits = self.model(x)
        self.examples += len(x)
        if logits.is_cuda:  # kernels run asynchronously: wait for them, or the time measures nothing
            torch.cuda.synchronize(logits.device)
        self.seconds += time.perf_counter() - start
        return logits

    def cost(self, fit_seconds: float, world_size: int) -> dict:
        """The teacher's cost in the fit (this process's time), and what each process's teacher did: every rank
        of a multi-process fit loads its own, so each says it scored its share of the data in eval mode, frozen."""
        return {"teacher": self.label, "teacher_params": sum(p.numel() for p in self.model.parameters()),
                "teacher_seconds": round(self.seconds, 3),
                "teacher_share": round(self.seconds / fit_seconds, 4) if fit_seconds > 0 else None,
                "ranks": self._on_every_rank(world_size)}

    def _on_every_rank(self, world_size: int) -> list[dict]:
        mine = {"examples": self.examples, "eval_mode": not any(m.training for m in self.model.modules()),
                "frozen": not any(p.requires_grad for p in self.model.parameters())}
        # The fit's world, not the process group's: QAT fits on rank 0 alone inside a multi-process run.
        if world_size == 1:
            return [mine]
        ranks: list = [None] * world_size
        dist.all_gather_object(ranks, mine)  # every rank of the fit calls cost() at its end
        return ranks
