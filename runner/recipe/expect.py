"""The `expect:` block: a paper's figures as rules on run metrics, and the metric names they may use."""

from __future__ import annotations

import fnmatch
from typing import Annotated

from pydantic import Field, model_validator

from runner.recipe.base import NonNegativeFloat, Spec


# A bound is a number, or the name of another metric of the same run (`lth.dense.val_acc`): claims
# like "the ticket is at least as accurate as the dense network" compare two measurements.
MetricName = Annotated[str, Field(pattern=r"^[A-Za-z_][\w.-]*$")]
Bound = float | MetricName


class Within(Spec):
    value: Bound
    tolerance: NonNegativeFloat



class Rule(Spec):
    """Exactly one of `at_most`, `at_least`, `within`; `paper` is the paper's own figure, shown beside the run's."""

    at_most: Bound | None = None
    at_least: Bound | None = None
    within: Within | None = None
    paper: float | None = None  # default: the rule's bound when it is a number

    @model_validator(mode="after")
    def _one_rule(self):
        given = [name for name in ("at_most", "at_least", "within") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of `at_most`, `at_least` or `within: {value, tolerance}`"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self

    @property
    def kind(self) -> str:
        return next(name for name in ("at_most", "at_least", "within") if getattr(self, name) is not None)

    @property
    def bound(self) -> float | str:
        return self.within.value if self.within is not None else getattr(self, self.kind)

    def passes(self, value: float, bound: float) -> bool:
        """`bound` is the rule's bound with a metric name resolved to that metric's value."""
        if self.kind == "at_most":
            return value <= bound
        if self.kind == "at_least":
            return value >= bound
        return abs(value - bound) <= self.within.tolerance

    def describe(self) -> str:
        bound = self.bound if isinstance(self.bound, str) else f"{self.bound:g}"
        if self.kind == "within":
            return f"{bound} ± {self.within.tolerance:g}"
        return f"{'<=' if self.kind == 'at_most' else '>='} {bound}"

    def paper_figure(self) -> float | None:
        if self.paper is not None:
            return self.paper
        return None if isinstance(self.bound, str) else self.bound


class Expect(Spec):
    """What the run must reach, and where the figures come from."""

    source: Annotated[str, Field(min_length=1)]  # paper and table, e.g. "Han et al. 2015, Table 1"
    metrics: Annotated[dict[str, Rule], Field(min_length=1)]


# Run-level metrics, derived from the stages' metrics at run end (runner/verdicts.py computes them).
RUN_METRICS = {
    "test_error": "test error of the last stage that measured it",
    "test_acc": "test accuracy of the last stage that measured it",
    "weights_kept": "fraction of parameters that are nonzero (params_nonzero / params_total), last measured",
    "compression_ratio": "dense fp32 bytes / packed bytes of the model (evaluate's dense_fp32_bytes / packed_bytes), "
                         "last measured",
    "bytes": "size of the final model's packed artifact (evaluate's packed_bytes), last measured",
    "latency_ratio": "latency of the final model / latency at the first measurement (smallest common batch size)",
    "wall_seconds": "seconds spent running stages in this invocation",
}

def stage_metric_patterns(stage) -> list[str]:
    """The metric names `stage` writes, as its spec declares them (runner.recipe.metrics)."""
    return [metric.name for metric in stage.declared_metrics()]


def reports(patterns: list[str], metric: str) -> bool:
    return any(fnmatch.fnmatchcase(metric, pattern) for pattern in patterns)
