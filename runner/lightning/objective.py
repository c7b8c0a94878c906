"""Training objectives: each loss spec of the recipe maps to the function that computes it from logits and labels."""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from runner.recipe.training import MSE, CrossEntropy, Distillation

Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> scalar loss


def _cross_entropy(spec: CrossEntropy, num_classes: int, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, label_smoothing=spec.label_smoothing)


def _mse(spec: MSE, num_classes: int, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared error between the softmax output and one-hot targets."""
    return F.mse_loss(logits.softmax(dim=1), F.one_hot(y, num_classes).to(logits.dtype))


# One implementation per spec class of the Loss union (tests/test_architecture.py checks it is complete).
OBJECTIVES = {CrossEntropy: _cross_entropy, MSE: _mse}


def build_objective(spec, num_classes: int) -> Objective:
    return functools.partial(OBJECTIVES[type(spec)], spec, num_classes)


def distillation_loss(spec: Distillation, hard: Objective, logits: torch.Tensor, teacher_logits: torch.Tensor,
                      y: torch.Tensor) -> torch.Tensor:
    """Hinton et al. 2015 §2: alpha * T^2 * KL(teacher's softened distribution || the student's) + (1 - alpha) *
    the labels' loss. KL differs from the soft cross-entropy only by the teacher's entropy, a constant."""
    temperature = spec.temperature
    soft = F.kl_div(F.log_softmax(logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean", log_target=True)
    return spec.alpha * temperature**2 * soft + (1 - spec.alpha) * hard(logits, y)
