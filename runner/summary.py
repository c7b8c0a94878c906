"""The terminal summary of a run: one row per stage, the metric columns its stages measured, within 100 columns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rich import box
from rich.console import Console
from rich.table import Table

from runner.outcome import StageOutcome

WIDTH = 100  # what the summary must fit: a default terminal, a CI log, a pasted issue


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def count(value: float) -> str:
    """266610 -> 266.6k: counts read at a glance; exact figures are in metrics.json."""
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}"


def size(value: float) -> str:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} B"


def milliseconds(value: float) -> str:
    return f"{value:.3g} ms"


def seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 600 else f"{value / 60:.1f} min"


@dataclass(frozen=True)
class Column:
    metric: str
    header: str
    show: Callable[[float], str]


# In order of what a reader looks for first; a column appears when a stage measured it and it still fits.
COLUMNS = [Column("test_error", "test err", percent), Column("val_acc", "val acc", percent),
           Column("sparsity", "sparsity", percent), Column("params_nonzero", "params", count),
           Column("packed_bytes", "packed", size), Column("model_bytes", "model.pt", size),
           Column("latency_ms_b1", "latency b1", milliseconds), Column("latency_ms_b256", "b256", milliseconds),
           Column("samples_per_second", "samples/s", count)]
TEST_ACC = Column("test_acc", "test acc", percent)
# The metrics that make a stage's headline: the terminal's columns, the report's, the seeds table's rows.
HEADLINE = [TEST_ACC.metric] + [column.metric for column in COLUMNS]


def _cell(outcome: StageOutcome, column: Column) -> str:
    value = outcome.metrics.get(column.metric)
    return column.show(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else ""


def _test_column(outcomes: list[StageOutcome]) -> list[Column]:
    """test_error when a stage measured it; test_acc alone only when no stage did (never both: one number)."""
    if any("test_error" in o.metrics for o in outcomes) or not any("test_acc" in o.metrics for o in outcomes):
        return []
    return [TEST_ACC]


def _table(recipe_name: str, outcomes: list[StageOutcome], columns: list[Column]) -> Table:
    stages = len(outcomes)
    table = Table(title=f"nnopt run: {recipe_name} ({stages} stage{'s' if stages != 1 else ''})", box=box.SIMPLE_HEAD,
                  title_justify="left", pad_edge=False)
    fixed = ["stage", "kind", "status", "time"]
    rows = [stage_cells(o, columns) for o in outcomes]
    if all(o.name == o.kind for o in outcomes):  # stages named after their kind: the column would repeat the names
        fixed.remove("kind")
        rows = [row[:1] + row[2:] for row in rows]
    for header in fixed:
        table.add_column(header, no_wrap=True, justify="right" if header == "time" else "left")
    for column in columns:
        table.add_column(column.header, no_wrap=True, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


def _width(table: Table) -> int:
    return Console(width=10_000).measure(table).maximum


def measured_columns(outcomes: list[StageOutcome]) -> list[Column]:
    """Every headline column some stage measured, in COLUMNS order, however wide (report.md's stage table)."""
    return [column for column in _test_column(outcomes) + COLUMNS if any(_cell(o, column) for o in outcomes)]


def stage_cells(outcome: StageOutcome, columns: list[Column]) -> list[str]:
    """One stage's row: name, kind, status, time (blank when reused: no time spent), then the columns."""
    time = seconds(outcome.seconds) if outcome.status == "ran" else ""
    return [outcome.name, outcome.kind, outcome.status, time] + [_cell(outcome, column) for column in columns]


def summary_table(recipe_name: str, outcomes: list[StageOutcome]) -> Table:
    """The stage rows with the measured columns, in COLUMNS order, that fit in WIDTH."""
    columns: list[Column] = []
    for column in _test_column(outcomes) + COLUMNS:
        if any(_cell(o, column) for o in outcomes) and _width(_table(recipe_name, outcomes, columns + [column])) <= WIDTH:
            columns.append(column)
    return _table(recipe_name, outcomes, columns)
