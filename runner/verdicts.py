"""Run-level metrics derived from the stages' metrics, and the expect block's PASS/FAIL verdicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rich.markup import escape
from rich.table import Table

from runner.outcome import StageOutcome
from runner.recipe.expect import RUN_METRICS, Expect
from runner.recipe.metrics import latency_batches, latency_key


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _last(outcomes: list[StageOutcome], *keys: str) -> dict | None:
    """The metrics of the last stage that reported every one of `keys`."""
    for outcome in reversed(outcomes):
        if all(_number(outcome.metrics.get(key)) for key in keys):
            return outcome.metrics
    return None


def _latency_ratio(outcomes: list[StageOutcome]) -> float | None:
    measured = [o.metrics for o in outcomes if latency_batches(o.metrics)]
    if len(measured) < 2:
        return None
    first, final = measured[0], measured[-1]
    common = sorted(set(latency_batches(first)) & set(latency_batches(final)))
    if not common or not first[latency_key(common[0])]:
        return None
    return final[latency_key(common[0])] / first[latency_key(common[0])]


def run_metrics(outcomes: list[StageOutcome]) -> dict[str, float]:
    """The run-level metrics of runner.recipe.expect.RUN_METRICS that this run's stages make computable."""
    derived: dict[str, float] = {}
    for key in ("test_error", "test_acc"):
        if (metrics := _last(outcomes, key)) is not None:
            derived[key] = metrics[key]
    if (metrics := _last(outcomes, "params_nonzero", "params_total")) is not None and metrics["params_total"]:
        derived["weights_kept"] = metrics["params_nonzero"] / metrics["params_total"]
    if (metrics := _last(outcomes, "packed_bytes")) is not None:
        derived["bytes"] = metrics["packed_bytes"]
    if (metrics := _last(outcomes, "dense_fp32_bytes", "packed_bytes")) is not None and metrics["packed_bytes"]:
        derived["compression_ratio"] = metrics["dense_fp32_bytes"] / metrics["packed_bytes"]
    if (ratio := _latency_ratio(outcomes)) is not None:
        derived["latency_ratio"] = ratio
    derived["wall_seconds"] = sum(o.seconds for o in outcomes)
    return derived


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}", inner, out)
    elif isinstance(value, list):  # e.g. iterative_prune's rounds: `lth.rounds.2.val_acc`
        for index, inner in enumerate(value):
            _flatten(f"{prefix}.{index}", inner, out)
    elif _number(value):
        out[prefix] = value


def flat_metrics(outcomes: list[StageOutcome]) -> dict[str, float]:
    """Every numeric metric as `stage.metric` (nested ones as `stage.metric.key` or `.index`, e.g.
    `evaluate.layer_sparsity.fc1.weight`), plus the run-level metrics: what expect rules name."""
    flat: dict[str, float] = {}
    for o in outcomes:
        _flatten(o.name, o.metrics, flat)
    flat.update(run_metrics(outcomes))
    return flat


@dataclass(frozen=True)
class Verdict:
    metric: str
    rule: str
    paper: float | None  # None: the rule compares with another metric and the paper gives no number
    value: float | None  # None: no stage produced the metric
    std: float | None
    passed: bool
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def _missing(metric: str) -> str:
    what = RUN_METRICS.get(metric, "")
    return f"no stage produced `{metric}`" + (f" ({what})" if what else "")


def judge(expect: Expect | None, values: dict[str, float], spread: dict[str, float] | None = None) -> list[Verdict]:
    """One verdict per expected metric; a metric no stage produced FAILs (never skipped).

    With several seeds `values` holds the means (and `spread` the standard deviations): rules
    are checked on the mean.
    """
    if expect is None:
        return []
    verdicts = []
    for metric, rule in expect.metrics.items():
        value = values.get(metric)
        bound = values.get(rule.bound) if isinstance(rule.bound, str) else rule.bound
        text, paper = rule.describe(), rule.paper_figure()
        if isinstance(rule.bound, str) and bound is not None:
            text += f" ({bound:.4g})"
        if value is None or bound is None:
            note = _missing(metric if value is None else rule.bound)
            verdicts.append(Verdict(metric, text, paper, value, None, False, note))
        else:
            verdicts.append(Verdict(metric, text, paper, value, (spread or {}).get(metric), rule.passes(value, bound)))
    return verdicts


def format_value(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "missing"
    return f"{value:.4g}" + (f" ± {std:.2g}" if std is not None else "")


def _paper(figure: float | None) -> str:
    return "-" if figure is None else f"{figure:.4g}"


def verdict_table(source: str, verdicts: list[Verdict], runs: int = 1) -> Table:
    table = Table(title=f"expect: {source}" + (f" (mean of {runs} seeds)" if runs > 1 else ""))
    for column in ("metric", "paper", "rule", "run", "result"):
        table.add_column(column, justify="left" if column in ("metric", "result") else "right")
    for v in verdicts:
        result = "[green]PASS[/]" if v.passed else "[bold red]FAIL[/]" + (f": {escape(v.note)}" if v.note else "")
        table.add_row(escape(v.metric), _paper(v.paper), escape(v.rule), format_value(v.value, v.std), result)
    return table


def verdict_lines(source: str, verdicts: list[Verdict]) -> list[str]:
    """The same table in markdown, for report.md."""
    lines = [f"## Expected ({source})", "", "| metric | paper | rule | run | result |", "|---|---|---|---|---|"]
    for v in verdicts:
        result = "PASS" if v.passed else "FAIL" + (f": {v.note}" if v.note else "")
        lines.append(f"| {v.metric} | {_paper(v.paper)} | {v.rule} | {format_value(v.value, v.std)} | {result} |")
    return lines + [""]
