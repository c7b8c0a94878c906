"""`nnopt sweep`: run a recipe over a grid of overrides and draw the accuracy trade-off curve."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from runner import plots
from runner.errors import Issue, RecipeError
from runner.experiment import Result, run_experiment
from runner.files import write_json, write_text
from runner.recipe import validate_source
from runner.recipe.inherit import read_recipe
from runner.recipe.overrides import apply_overrides
from runner.store import claim, store_of
from runner.verdicts import format_value

# What a point reports in the summary (run-level metrics of runner.recipe.expect.RUN_METRICS), in this order.
SUMMARY = ["test_acc", "test_error", "weights_kept", "compression_ratio", "bytes", "wall_seconds"]


@dataclass
class Point:
    label: str  # e.g. `sparsity=0.9`
    overrides: list[str]  # `key=value` texts, as `-o` takes them
    recipe: object
    folder: Path
    result: Result | None = None


def split_values(text: str) -> list[str]:
    """`0.5,0.8,[1,2]` -> ['0.5', '0.8', '[1,2]']: commas inside brackets, braces or quotes stay."""
    values, depth, quote, current = [], 0, None, ""
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    return values + [current]


def parse_axes(file: str, axes: list[str]) -> list[tuple[str, list[str]]]:
    parsed = []
    for text in axes:
        key, sep, raw = text.partition("=")
        values = [v.strip() for v in split_values(raw)] if sep else []
        if not key.strip() or not values or any(not v for v in values):
            raise RecipeError([Issue(file, None, None, "", f"sweep axis `{text}` is not `key.path=v1,v2,...`",
                                     "example: -s stages.prune.sparsity=0.5,0.8,0.9")])
        parsed.append((key.strip(), values))
    keys = [key for key, _ in parsed]
    if len(set(keys)) != len(keys):
        raise RecipeError([Issue(file, None, None, "", "a sweep axis is given twice", "give each key once with all its values")])
    return parsed


def _folder_name(index: int, label: str) -> str:
    return f"{index + 1:02d}_" + re.sub(r"[^A-Za-z0-9._=,-]", "_", label)[:80]


def plan_points(path: str, overrides: list[str], axes: list[str], output_root: Path) -> tuple[Path, list[Point]]:
    """The sweep folder and every grid point, validated before anything runs; errors name the override
    that caused them. Points live under the recipe's own name, whatever the axes change, and that folder
    must belong to this recipe file (runner.store.claim)."""
    grid = parse_axes(str(path), axes)
    base = validate_source(apply_overrides(read_recipe(path), overrides))
    sweep_dir = Path(output_root) / base.name / "sweep"
    points = []
    for index, combo in enumerate(itertools.product(*(values for _, values in grid))):
        point_overrides = [f"{key}={value}" for (key, _), value in zip(grid, combo)]
        recipe = validate_source(apply_overrides(read_recipe(path), overrides + point_overrides))
        label = ",".join(f"{key.rsplit('.', 1)[-1]}={value}" for (key, _), value in zip(grid, combo))
        points.append(Point(label, point_overrides, recipe, sweep_dir / _folder_name(index, label)))
    claim(sweep_dir.parent, Path(path))  # once every point is valid: a refused sweep writes nothing
    return sweep_dir, points


def _point_values(point: Point) -> dict:
    values, spread = point.result.values, point.result.spread or {}
    row = {"label": point.label, "overrides": point.overrides, "folder": point.folder.name}
    for key in SUMMARY:
        row[key] = values.get(key)
        if spread.get(key) is not None:
            row[f"{key}_std"] = spread[key]
    if point.result.verdicts:
        row["expect"] = f"{sum(v.passed for v in point.result.verdicts)}/{len(point.result.verdicts)} PASS"
    return row


def run_sweep(sweep_dir: Path, points: list[Point], console: Console) -> list[dict]:
    """Run every point into its folder. The points share the recipe's stage store, so a stage config that
    one point (or a plain run of the recipe) finished is reused by the others: a shared baseline trains once."""
    store = store_of(sweep_dir.parent)
    for point in points:
        console.rule(f"sweep point {point.label}")
        point.result = run_experiment(point.recipe, point.folder, console, store=store)
    rows = [_point_values(p) for p in points]
    write_summary(sweep_dir, points[0].recipe, rows, console)
    return rows


def _md_escape(text: str) -> str:
    return re.sub(r"([\\\[\]|])", r"\\\1", text)


def write_summary(sweep_dir: Path, recipe, rows: list[dict], console: Console) -> None:
    columns = ["point"] + [k for k in SUMMARY if any(r.get(k) is not None for r in rows)]
    columns += ["expect"] if any("expect" in r for r in rows) else []
    notice = plots.missing_notice()
    drawn = None
    if notice is None:
        drawn = plots.tradeoff(rows, ["weights_kept", "bytes"], "test_acc", sweep_dir / "tradeoff.png",
                               f"{recipe.name}: test accuracy trade-off")
        notice = None if drawn is not None else "no trade-off plot: the points do not all report test_acc and weights_kept or bytes"
    write_json(sweep_dir / "sweep.json", {"recipe": recipe.name, "points": rows,
                                                    "plot": drawn.name if drawn else None, "plot_notice": notice})

    def cell(row, key):
        if key == "point":
            return row["label"]
        if key == "expect":
            return row.get("expect", "")
        return format_value(row.get(key), row.get(f"{key}_std")) if row.get(key) is not None else ""

    lines = [f"# Sweep of {recipe.name}", "", "Each point's own report is in its folder.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join([f"[{_md_escape(row['label'])}]({row['folder']}/report.md)"] + [cell(row, k) for k in columns[1:]])
              + " |" for row in rows]
    lines += ["", f"![trade-off]({drawn.name})" if drawn else notice, ""]
    write_text(sweep_dir / "sweep.md", "\n".join(lines))

    table = Table(title=f"nnopt sweep: {recipe.name}")
    for column in columns:
        table.add_column(column, justify="left" if column in ("point", "expect") else "right")
    for row in rows:
        table.add_row(*(cell(row, k) for k in columns))
    console.print(table)
    if notice:
        console.print(f"[yellow]{notice}[/]")
    console.print(f"sweep summary: {sweep_dir / 'sweep.md'}" + (f", plot: {drawn}" if drawn else ""))
