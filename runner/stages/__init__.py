"""Stage registry: `kind` -> the function that runs it. One file per kind."""

from __future__ import annotations

from runner.registry import Registry
from runner.stages.base import StageContext, StageFn, StageResult

STAGES: Registry[StageFn] = Registry("stage kind")

from runner.stages import (evaluate, export, finetune, iterative_prune, prune, quantize, sensitivity,  # noqa: E402,F401
                           train)

__all__ = ["STAGES", "StageContext", "StageResult"]
