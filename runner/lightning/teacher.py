"""The teacher of a distilled fit: an earlier stage's model giving soft targets, in eval mode, without gradients."""

from __future__ import annotations

import time

import torch
from torch import nn


class Teacher:
    """Not an nn.Module on purpose: its weights stay out of the student's optimizer, state dict and checkpoints
    (it is reloaded from its stage's finished artifact, so a resumed fit sees the same teacher)."""

    def __init__(self, stage: str, model: nn.Module):
        self.stage = stage
        self.model = model.eval().requires_grad_(False)
        self.seconds = 0.0  # wall time of its forward passes in this fit (the resumed part only, after a resume)

    def to(self, device: torch.device) -> None:
        self.model.to(device)

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        logits = self.model(x)
        if logits.is_cuda:  # kernels run asynchronously: wait for them, or the time measures nothing
            torch.cuda.synchronize(logits.device)
        self.seconds += time.perf_counter() - start
        return logits

    def cost(self, fit_seconds: float) -> dict:
        return {"teacher": self.stage, "teacher_params": sum(p.numel() for p in self.model.parameters()),
                "teacher_seconds": round(self.seconds, 3),
                "teacher_share": round(self.seconds / fit_seconds, 4) if fit_seconds > 0 else None}
