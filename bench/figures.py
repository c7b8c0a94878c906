"""README table rows from run folders: each figure with the run conditions and the command that reproduces it."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from runner.outcome import StageOutcome
from runner.recipe.expect import RUN_METRICS
from runner.verdicts import flat_metrics

USAGE = """python -m bench.figures RUN_DIR [RUN_DIR ...] [--metric NAME ...]

RUN_DIR is a run folder as `nnopt run` leaves it (outputs/<recipe>, or its seeds' parent). For each, a row of
the reproduction table (the recipe's `expect` rules, what the run reached, the verdict, seeds, wall time, threads,
load and the command), and with --metric a row of the measured table per NAME, named as `expect` names metrics:
`STAGE.KEY` with nested keys and list indices by dots (`prune.layer_sparsity_after.fc1.weight`,
`lth.rounds.2.val_acc`) or a run-level metric (`test_error`). The command is
rebuilt from the recipe file that owns the folder and checked: loading that file with its overrides must give the
run's recipe exactly, with `trainer.threads` set to the count the run computed with (results depend on it). A
folder that fails the check, or has no finished run, gives no row: exit 1."""

PERCENT_SUFFIXES = ("error", "acc", "acc_drop", "kept", "sparsity")  # fractions shown as percentages
# How a figure is written: `auto` by its name (fractions of a *_error, *_acc... metric as percentages), or as told
FORMATS = ("auto", "percent", "count", "number", "ratio", "ms", "seconds")
UNITS = {"number": "", "ratio": "x", "ms": " ms", "seconds": " s"}


RUN_RECORD = ("recipe", "seed", "versions", "threads", "finished", "stages")  # what a row reads of run.json


class FigureError(Exception):
    """A run folder no row can be written for, and why."""


@dataclass
class Run:
    """A run folder: one run, or one per seed (`seed-<k>/` beside a summary report.json)."""

    folder: Path
    singles: list[Path]  # the folders holding run.json: the folder itself, or one per seed
    seeds: list[int] | None
    report: dict  # report.json of the folder (the summary over seeds, or the single run's)

    @classmethod
    def read(cls, folder: Path) -> "Run":
        report = _read_json(folder / "report.json", f"{folder} holds no report.json: no finished run there")
        if "runs" in report:
            return cls(folder, [folder / name for name in report["runs"]], report["seeds"], report)
        return cls(folder, [folder], None, report)

    def run_json(self, single: Path) -> dict:
        record = _read_json(single / "run.json", f"{single} holds no run.json")
        lacking = [key for key in RUN_RECORD if key not in record]
        if lacking:
            raise FigureError(f"{single}/run.json has no {', '.join(lacking)}: a run by an older nnopt; rerun it")
        return record

    def metrics(self, single: Path) -> dict[str, float]:
        """Every number the run measured, named as `expect` names them (`prune.layer_sparsity_after.fc1.weight`,
        `lth.rounds.2.val_acc`, `test_error`): runner.verdicts derives them from the stages run.json records."""
        return flat_metrics([StageOutcome(**stage) for stage in self.run_json(single)["stages"]])


def _read_json(path: Path, missing: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FigureError(missing) from None
    except ValueError as error:
        raise FigureError(f"{path} is not JSON ({error}): rerun") from None


# ---- the command ------------------------------------------------------------------------------------


def _value_text(value) -> str:
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]  # a list drops YAML's "..."


def _differences(before, after, path: tuple = ()) -> list[tuple[tuple, object]]:
    """The (path, value) overrides that turn the recipe dump `before` into `after`; stages are addressed by name."""
    if before == after:
        return []
    if isinstance(before, dict) and isinstance(after, dict) and before.keys() == after.keys() \
            and not any("." in key for key in before):
        return [found for key in before for found in _differences(before[key], after[key], path + (key,))]
    if path == ("stages",):
        names = [stage["name"] for stage in before], [stage["name"] for stage in after]
        if names[0] != names[1]:
            raise FigureError(f"the recipe file's stages ({', '.join(names[0])}) are not the run's "
                              f"({', '.join(names[1])}): rerun from the file, or restore it")
        return [found for old, new in zip(before, after) for found in _differences(old, new, path + (old["name"],))]
    return [(path, after)]


def command(run: Run, cwd: Path) -> str:
    """`nnopt run FILE [-o ...] [--seeds ...] [-O ...]` that gives this run's recipe, checked by loading it."""
    from runner.errors import RecipeError
    from runner.recipe import load_recipe

    owner = run.folder / ".owner"
    if not owner.is_file():
        raise FigureError(f"{run.folder} names no recipe file (.owner): it was not made by `nnopt run`")
    recipe_file = Path(owner.read_text().strip())
    if not recipe_file.is_file():
        raise FigureError(f"the recipe file that made {run.folder}, {recipe_file}, is gone")
    ran = recipe_of(run)
    try:
        dumped = load_recipe(recipe_file).model_dump(mode="json", by_alias=True)
    except RecipeError as error:
        raise FigureError(f"{recipe_file} no longer loads: {error}") from None
    overrides = [".".join(map(str, path)) + "=" + _value_text(value)
                 for path, value in _differences(without_seeds(dumped), without_seeds(ran))]
    seeds = [] if run.seeds is None else [f"seeds=[{','.join(map(str, run.seeds))}]"]
    if run.seeds is None and ran["seed"] != dumped["seed"]:
        overrides.append(f"seed={ran['seed']}")
    try:
        rebuilt = load_recipe(recipe_file, overrides + seeds).model_dump(mode="json", by_alias=True)
    except RecipeError as error:
        raise FigureError(f"the overrides rebuilt for {run.folder} do not load: {error}") from None
    if without_seeds(rebuilt) != without_seeds(ran):
        where, now, then = first_difference(without_seeds(rebuilt), without_seeds(ran))
        raise FigureError(f"no command rebuilds its recipe from {recipe_file}: at {where} the file gives {now!r}, the "
                          f"run had {then!r} (a run from another nnopt version, whose schema differed: rerun it)")
    words = ["nnopt", "run", shown_path(recipe_file, cwd)]
    for text in overrides:
        words += ["-o", text]
    if run.seeds is not None and dumped.get("seeds") != run.seeds:
        words += ["--seeds", ",".join(map(str, run.seeds))]
    root = run.folder.resolve().parent
    if root != (cwd / "outputs").resolve():
        words += ["-O", shown_path(root, cwd)]
    return shlex.join(words)


def recipe_of(run: Run) -> dict:
    """The run's recipe with the thread count it computed with: a run that left `trainer.threads` unset is
    reproduced (and its artifacts reused: the fingerprint holds the count) by the command that sets it."""
    records = [run.run_json(single) for single in run.singles]
    counts = sorted({record["threads"] for record in records})
    if len(counts) > 1:
        raise FigureError(f"its seeds ran with different thread counts ({', '.join(map(str, counts))}): their "
                          "results do not come from one command")
    recipe = records[0]["recipe"]
    if recipe["trainer"].get("threads") is None:
        recipe["trainer"]["threads"] = counts[0]
    return recipe


def first_difference(now, then, path: str = "") -> tuple[str, object, object]:
    """Where two recipe dumps first differ: (dotted path, value now, value in the run; `<absent>` for a missing key)."""
    if isinstance(now, dict) and isinstance(then, dict):
        for key in list(now) + [key for key in then if key not in now]:
            a, b = now.get(key, "<absent>"), then.get(key, "<absent>")
            if a != b:
                return first_difference(a, b, f"{path}.{key}".strip("."))
    if isinstance(now, list) and isinstance(then, list) and len(now) == len(then):
        for index, (a, b) in enumerate(zip(now, then)):
            if a != b:
                return first_difference(a, b, f"{path}[{index}]")
    return path, now, then


def without_seeds(recipe: dict) -> dict:
    return {key: value for key, value in recipe.items() if key not in ("seed", "seeds")}


def shown_path(path: Path, cwd: Path) -> str:
    path = path.resolve()
    return os.path.relpath(path, cwd.resolve()) if path.is_relative_to(cwd.resolve()) else str(path)


# ---- figures ------------------------------------------------------------------------------------------


def _number(name: str, value: float, how: str = "auto") -> str:
    if how == "auto":
        named = any(part.endswith(PERCENT_SUFFIXES) for part in name.split("."))  # `evaluate.layer_sparsity.fc1.weight`
        percent = isinstance(value, float) and named and 0 <= value <= 1
        how = "percent" if percent else "count" if isinstance(value, int) else "number"
    if how == "percent":
        return f"{100 * value:.2f}%"
    if how == "count":
        return f"{round(value):,}"
    return f"{value:.4g}" + UNITS[how]


def figure(name: str, values: list, how: str = "auto") -> str:
    """One value, or mean ± sample std and the values per seed."""
    each = [_number(name, value, how) for value in values]
    if len(values) == 1:
        return each[0]
    mean, std = statistics.fmean(values), statistics.stdev(values)
    if how == "count" or (how == "auto" and all(isinstance(value, int) for value in values)):
        # Counts (parameters, bytes) in whole units, as each seed's are: a tenth of a parameter says nothing.
        # A spread under one unit keeps a decimal, so that 2 and 3 parameters over seeds do not read `2 ± 1`.
        digits = 0 if std == 0 or std >= 1 else 1
        shown = [f"{mean:,.{digits}f}", f"{std:,.{digits}f}"]
    elif (text := _number(name, float(mean), how)).endswith("%"):
        shown = [text, f"{100 * std:.2f} points"]
    else:
        shown = [text, f"{std:.2g}{UNITS.get(how, '')}"]  # two digits of spread are all it holds
    return f"{shown[0]} ± {shown[1]} ({', '.join(each)})"


def metric_values(run: Run, name: str) -> list:
    """`name`'s value in each of the run's seeds."""
    values = []
    for single in run.singles:
        found = run.metrics(single)
        if name not in found:
            near = difflib.get_close_matches(name, list(found), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(f'`{n}`' for n in near)}?" if near else (
                f" (a stage's STAGE.KEY, nested keys by dots, or a run-level metric: {', '.join(RUN_METRICS)})")
            raise FigureError(f"{single} measured no number named `{name}`{hint}")
        values.append(found[name])
    return values


def conditions(run: Run) -> str:
    """Seeds, wall time of the stages the runs computed (a reused stage was timed in the run that built it, which
    its run.json no longer holds), threads, torch, the load average as each run ended (where run.json has it) and
    the date."""
    seconds, ran, total, threads, torch_versions, loads, finished = 0.0, 0, 0, set(), set(), [], []
    for single in run.singles:
        record = run.run_json(single)
        for stage in record["stages"]:
            total += 1
            if stage["status"] == "ran":
                ran += 1
                seconds += stage["seconds"] or 0
        threads.add(record["threads"])
        torch_versions.add(record["versions"]["torch"])
        if "load_average" in record:
            loads.append(record["load_average"][1])  # the 5-minute average: most of a run's stages
        finished.append(record["finished"][:10])
    seeds = f"seed {run.run_json(run.singles[0])['seed']}" if run.seeds is None else \
        f"seeds {', '.join(map(str, run.seeds))}"
    wall = f"{seconds:.0f} s" if ran else "-"
    if run.seeds is not None:
        wall += f" for {len(run.singles)} seeds"
    if ran < total:
        wall += f" ({total - ran} of {total} stages reused, timed when built)"
    load = ""
    if loads:
        low, high = f"{min(loads):.1f}", f"{max(loads):.1f}"
        load = f", load {low}" + (f"-{high}" if high != low else "")
    return (f"{seeds}; {wall}; {'/'.join(map(str, sorted(threads)))} thread(s), torch "
            f"{'/'.join(sorted(torch_versions))}{load}, {max(finished)}")


def rules_text(source: str, rules: list[tuple[str, str]]) -> str:
    """An `expect` block as one cell: its source, then each metric's rule."""
    return f"{source}: " + "; ".join(f"{metric} {rule}" for metric, rule in rules)


def reproduction_cells(run: Run, cwd: Path, label: str | None = None, extra: list[tuple[str, str, str]] = (),
                       check: bool = False) -> list[str]:
    """recipe, expect rules, what the run reached (the verdicts' metrics, then `extra`: (metric, label, format)),
    verdict, conditions, command (with `--check` when `check` and the recipe has an `expect` block)."""
    expect = run.report.get("expect")
    label = label or f"`{run.run_json(run.singles[0])['recipe']['name']}`"
    reached = [_labelled(label, figure(name, metric_values(run, name), how)) for name, label, how in extra]
    if expect is None:
        rules, result = "no `expect` block", "-"
    else:
        verdicts = expect["verdicts"]
        rules = rules_text(expect["source"], [(v["metric"], v["rule"]) for v in verdicts])
        reached[:0] = [f"{v['metric']} " + (figure(v["metric"], metric_values(run, v["metric"]))
                                            if v["value"] is not None else "not produced") for v in verdicts]
        passed = sum(v["passed"] for v in verdicts)
        result = f"{'PASS' if expect['passed'] else 'FAIL'} ({passed}/{len(verdicts)})"
    shown = command(run, cwd) + (" --check" if check and expect is not None else "")
    return [label, rules, "; ".join(reached), result, conditions(run), f"`{shown}`"]


def measured_cells(run: Run, metrics: list[tuple[str, str, str]], cwd: Path, what: str | None = None) -> list[str]:
    """what, the figures of `metrics` ((metric, label, format) each), conditions, command."""
    what = what or f"`{run.run_json(run.singles[0])['recipe']['name']}` " + ", ".join(name for name, _, _ in metrics)
    figures = "; ".join(_labelled(label, figure(name, metric_values(run, name), how)) for name, label, how in metrics)
    return [what, figures, conditions(run), f"`{command(run, cwd)}`"]


def _labelled(label: str, text: str) -> str:
    return f"{label} {text}" if label else text


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


REPRODUCTION_HEADER = ["| recipe | expect | ours | result | seeds; wall; conditions | command |",
                       "|---|---|---|---|---|---|"]
MEASURED_HEADER = ["| what | figure | seeds; wall; conditions | command |", "|---|---|---|---|"]


def tables(folders: list[Path], metrics: list[str], cwd: Path) -> tuple[str, list[str]]:
    """The markdown of both tables, and one error line per folder (or figure) left out."""
    errors: list[str] = []
    reproductions, measured = [], []
    for folder in folders:
        try:
            run = Run.read(folder)
            reproductions.append(table_row(reproduction_cells(run, cwd)))
        except FigureError as error:
            errors.append(f"{folder}: {error}")
            continue
        for name in metrics:
            try:
                measured.append(table_row(measured_cells(run, [(name, "", "auto")], cwd)))
            except FigureError as error:
                errors.append(f"{folder} {name}: {error}")
    lines = []
    if reproductions:
        lines += [*REPRODUCTION_HEADER, *reproductions, ""]
    if measured:
        lines += [*MEASURED_HEADER, *measured, ""]
    return "\n".join(lines), errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.figures", usage=USAGE)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--metric", action="append", default=[])
    args = parser.parse_args(argv)
    text, errors = tables(args.folders, args.metric, Path.cwd())
    sys.stdout.write(text)
    for error in errors:
        print(f"bench.figures: left out {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
