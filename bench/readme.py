"""README's Reproductions and Measured tables rewritten from run folders as bench/readme_rows.yaml lists the rows."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bench.figures import (FORMATS, MEASURED_HEADER, REPRODUCTION_HEADER, FigureError, Run, first_difference,
                           measured_cells, recipe_of, reproduction_cells, rules_text, shown_path, table_row,
                           without_seeds)
from runner.errors import RecipeError
from runner.files import write_atomic

if TYPE_CHECKING:
    from runner.recipe import Recipe

MANIFEST = Path(__file__).with_name("readme_rows.yaml")
TABLES = ("reproductions", "measured")
END_MARKER = "<!-- /bench.readme -->"

USAGE = """python -m bench.readme [--check] [--readme README.md] [--manifest bench/readme_rows.yaml] [--outputs DIR]

Rewrites the tables of README between `<!-- bench.readme: reproductions -->` (and `: measured -->`) and
`<!-- /bench.readme -->`, one row per manifest entry, from the run that entry's command leaves in
outputs/<recipe name> (seeds in its seed-<k>/). Each row: the figures (mean ± std and each seed's value), seeds,
wall time, threads, load, date, and the command, rebuilt from the run and checked against the entry's. A row whose
run is missing, or is another command's, reads `not measured`; those rows are listed on stderr. Recipe paths,
README's and outputs/ are taken from the folder README is in. Everything outside the markers is kept byte for
byte; README is replaced whole (temp file, rename).
--check writes nothing and exits 1 when a row lacks its run or README's tables differ from what the runs give.
Exit 2: the manifest or README's markers are wrong (where, and why, on stderr)."""


def _marker(table: str) -> str:
    return f"<!-- bench.readme: {table} -->"


# ---- the manifest ----------------------------------------------------------------------------------------


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Shown(_Entry):
    """A figure of the row: a metric as `expect` names it, with its label and format."""

    metric: str = Field(min_length=1)
    label: str | None = None  # written before the figure; by default the metric's name
    how: Literal[FORMATS] = Field("auto", alias="as")

    def triple(self) -> tuple[str, str, str]:
        return self.metric, self.label if self.label is not None else self.metric, self.how


class Row(_Entry):
    """One README row: the command whose run it shows, and what of that run."""

    recipe: str = Field(min_length=1)  # path from the repository root, as README's commands give it
    overrides: list[str] = []  # `-o` texts, in the command's order
    seeds: list[int] | None = Field(None, min_length=1)
    label: str | None = None  # the first cell; by default the recipe's name
    metrics: list[str | Shown] = []  # measured: the figures; reproductions: shown after the `expect` metrics

    def shown(self) -> list[tuple[str, str, str]]:
        return [(Shown(metric=item) if isinstance(item, str) else item).triple() for item in self.metrics]

    def arguments(self) -> list[str]:
        """The command's words after `nnopt run`, as the manifest gives them."""
        words = [self.recipe]
        for override in self.overrides:
            words += ["-o", override]
        return words + (["--seeds", ",".join(map(str, self.seeds))] if self.seeds else [])


class Manifest(_Entry):
    reproductions: list[Row]
    measured: list[Row]

    @model_validator(mode="after")
    def _measured_rows_show_figures(self):
        empty = [index for index, row in enumerate(self.measured) if not row.metrics]
        if empty:
            raise ValueError(f"measured rows {', '.join(map(str, empty))} name no `metrics`: a measured row shows "
                             "at least one figure")
        return self


class InputError(Exception):
    """The manifest or README cannot be used as written; nothing was written. Exit code 2."""


@dataclass
class Planned:
    """A manifest row with the recipe its command gives, and the folder `nnopt run` puts that run in."""

    table: str
    index: int
    row: Row
    recipe: Recipe
    folder: Path

    @property
    def name(self) -> str:
        return f"{self.table} row {self.index} (`{self.recipe.name}`)"


def read_manifest(path: Path, root: Path, outputs: Path) -> list[Planned]:
    """Every row, its command loaded as `nnopt run` would load it; a bad row is a located InputError."""
    from runner.recipe import load_recipe
    from runner.recipe.locate import issues_from_validation, located_issue
    from runner.recipe.source import read_source

    if path.is_file() and not path.read_text().strip():
        raise InputError(f"{path}: the manifest is empty; it lists `reproductions:` and `measured:` rows")
    try:
        source = read_source(path)
        manifest = Manifest.model_validate(source.data)
    except RecipeError as error:
        raise InputError(str(error)) from None
    except ValidationError as error:
        raise InputError("\n".join(map(str, issues_from_validation(error, source, Manifest)))) from None
    planned, problems = [], []
    for table in TABLES:
        for index, row in enumerate(getattr(manifest, table)):
            seeds = [f"seeds=[{','.join(map(str, row.seeds))}]"] if row.seeds else []
            try:
                recipe = load_recipe(root / row.recipe, row.overrides + seeds)
            except RecipeError as error:
                problems.append(located_issue(source, (table, index, "recipe"),
                                              f"the row's command does not load:\n    {error}"))
                continue
            planned.append(Planned(table, index, row, recipe, outputs / recipe.name))
    if problems:
        raise InputError("\n".join(map(str, problems)))
    return planned


# ---- rows -------------------------------------------------------------------------------------------------


def check_run(run: Run, planned: Planned, root: Path) -> None:
    """Refuse a run that the row's command would not give: another recipe file, other overrides or seeds."""
    owner = (run.folder / ".owner").read_text().strip() if (run.folder / ".owner").is_file() else None
    if owner is None or Path(owner).resolve() != (root / planned.row.recipe).resolve():
        raise FigureError(f"it was made from {owner or 'no recorded recipe file'}, not {planned.row.recipe}")
    expected = planned.recipe.model_dump(mode="json", by_alias=True)
    ran = recipe_of(run)
    if expected["trainer"].get("threads") is None:  # the row leaves it open; the command shown pins the run's count
        expected["trainer"]["threads"] = ran["trainer"]["threads"]
    if run.seeds != expected.get("seeds"):
        raise FigureError(f"the run is of seeds {run.seeds or [ran['seed']]}, the row's command of "
                          f"{expected.get('seeds') or [expected['seed']]}")
    if run.seeds is None and ran["seed"] != expected["seed"]:
        raise FigureError(f"the run is of seed {ran['seed']}, the row's command of seed {expected['seed']}")
    if without_seeds(expected) != without_seeds(ran):
        where, now, then = first_difference(without_seeds(expected), without_seeds(ran))
        # A schema change since the run: its stages' fingerprints differ from the command's, so nothing is reused
        if then == "<absent>":
            raise FigureError(f"an older nnopt's run: `{where}` (now {now!r}) did not exist when it ran; rerun it")
        if now == "<absent>":
            raise FigureError(f"an older nnopt's run: it has `{where}` ({then!r}), which nnopt no longer has; rerun it")
        raise FigureError(f"at {where} the row's command gives {now!r}, the run had {then!r}")


def _unmeasured_cells(planned: Planned, why: str, root: Path, outputs: Path) -> list[str]:
    words = ["nnopt", "run", *planned.row.arguments()]
    if outputs.resolve() != (root / "outputs").resolve():
        words += ["-O", shown_path(outputs, root)]
    expect = planned.recipe.expect
    if planned.table == "measured":
        return [planned.row.label or f"`{planned.recipe.name}`", why, "-", f"`{shlex.join(words)}`"]
    rules = "no `expect` block" if expect is None else \
        rules_text(expect.source, [(metric, rule.describe()) for metric, rule in expect.metrics.items()])
    if expect is not None:
        words.append("--check")
    return [planned.row.label or f"`{planned.recipe.name}`", rules, why, "-", "-", f"`{shlex.join(words)}`"]


def row_cells(planned: Planned, root: Path, outputs: Path) -> tuple[list[str], str | None]:
    """The row's cells, and why it is not measured (None when it is)."""
    shown = shown_path(planned.folder, root)
    if not (planned.folder / "report.json").is_file():
        why = f"no run at {shown}"
        return _unmeasured_cells(planned, f"not measured ({why})", root, outputs), why
    try:
        run = Run.read(planned.folder)
        check_run(run, planned, root)
    except FigureError as error:
        return (_unmeasured_cells(planned, f"not measured (the run at {shown} does not match this command)", root, outputs),
                f"the run at {shown} is not this row's: {error}")
    try:
        if planned.table == "measured":
            return measured_cells(run, planned.row.shown(), root, planned.row.label), None
        return reproduction_cells(run, root, planned.row.label, planned.row.shown(), check=True), None
    except FigureError as error:  # a metric the run has not (a name mistyped, or a run older than the metric)
        return (_unmeasured_cells(planned, f"not measured (the run at {shown} lacks this row's figures)", root,
                                  outputs), f"the run at {shown} lacks a figure: {error}")


def tables(planned: list[Planned], root: Path, outputs: Path) -> tuple[dict[str, list[str]], list[str]]:
    """Each table's lines, and one line per row that is not measured."""
    lines = {"reproductions": list(REPRODUCTION_HEADER), "measured": list(MEASURED_HEADER)}
    missing = []
    for entry in planned:
        cells, why = row_cells(entry, root, outputs)
        lines[entry.table].append(table_row(cells))
        if why:
            missing.append(f"{entry.name}: {why}")
    return lines, missing


# ---- README -----------------------------------------------------------------------------------------------


def rewritten(text: str, lines: dict[str, list[str]], readme: Path) -> str:
    """`text` with each table's region between its markers replaced; everything else as it was."""
    for table, table_lines in lines.items():
        start_marker = _marker(table) + "\n"
        if text.count(start_marker) != 1:
            raise InputError(f"{readme}: needs exactly one line `{_marker(table)}` (found "
                                f"{text.count(start_marker)}) before the {table} table, and `{END_MARKER}` after it")
        start = text.index(start_marker) + len(start_marker)
        end = text.find(END_MARKER + "\n", start)
        if end < 0 or _marker(TABLES[0]) in text[start:end] or _marker(TABLES[1]) in text[start:end]:
            line = text[:start].count("\n")
            raise InputError(f"{readme}:{line}: `{_marker(table)}` has no `{END_MARKER}` line after it")
        text = text[:start] + "\n" + "\n".join(table_lines) + "\n\n" + text[end:]
    return text


def write_readme(readme: Path, text: str) -> None:
    """Replace README whole (temp file, rename), keeping its permissions."""
    mode = readme.stat().st_mode & 0o7777

    def write(handle) -> None:
        os.fchmod(handle.fileno(), mode)
        handle.write(text.encode("utf-8"))

    write_atomic(readme, write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.readme", usage=USAGE)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--outputs", type=Path, help="where the runs are (default: outputs/ beside README)")
    args = parser.parse_args(argv)
    root = args.readme.resolve().parent
    outputs = (args.outputs or root / "outputs").resolve()
    try:
        text = args.readme.read_text(encoding="utf-8")
        planned = read_manifest(args.manifest, root, outputs)
        lines, missing = tables(planned, root, outputs)
        new = rewritten(text, lines, args.readme)
    except (InputError, OSError) as error:
        print(f"bench.readme: {error}", file=sys.stderr)
        return 2
    for line in missing:
        print(f"bench.readme: not measured: {line}", file=sys.stderr)
    print(f"bench.readme: {len(planned) - len(missing)} of {len(planned)} rows measured", file=sys.stderr)
    if args.check:
        stale = new != text
        if stale:
            print(f"bench.readme: {args.readme}'s tables differ from what the runs give: run `python -m bench.readme`",
                  file=sys.stderr)
        return 1 if missing or stale else 0
    if new != text:
        write_readme(args.readme, new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
