"""README table rows from run folders: each figure with the run conditions and the command that reproduces it."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

USAGE = """python -m bench.figures RUN_DIR [RUN_DIR ...] [--metric NAME ...]

RUN_DIR is a run folder as `nnopt run` leaves it (outputs/<recipe>, or its seeds' parent). For each, a row of
the reproduction table (the recipe's `expect` rules, what the run reached, the verdict, wall time, threads and
the command), and with --metric a row of the measured table per NAME: `STAGE.KEY` (a stage's metrics.json,
nested keys by dots: `prune.layer_sparsity_after.fc1.weight`) or a run-level metric (`test_error`). The command is
rebuilt from the recipe file that owns the folder and checked: loading that file with its overrides must give the
run's recipe exactly, with `trainer.threads` set to the count the run computed with (results depend on it). A
folder that fails the check, or has no finished run, gives no row: exit 1."""

RUN_LEVEL = ("test_error", "test_acc", "weights_kept", "compression_ratio", "bytes", "latency_ratio", "wall_seconds")
PERCENT_SUFFIXES = ("error", "acc", "acc_drop", "kept", "sparsity")  # fractions shown as percentages


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
        return _read_json(single / "run.json", f"{single} holds no run.json")

    def stage_metrics(self, single: Path, stage: str) -> dict:
        found = sorted(single.glob(f"[0-9][0-9]-{stage}/metrics.json"))
        if not found:
            raise FigureError(f"{single} has no finished stage named `{stage}`")
        return json.loads(found[0].read_text())

    def run_metrics(self, single: Path) -> dict:
        return _read_json(single / "report.json", f"{single} holds no report.json")["run_metrics"]


def _read_json(path: Path, missing: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FigureError(missing) from None


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
    ran = _with_threads(run)
    try:
        dumped = load_recipe(recipe_file).model_dump(mode="json", by_alias=True)
    except RecipeError as error:
        raise FigureError(f"{recipe_file} no longer loads: {error}") from None
    overrides = [".".join(map(str, path)) + "=" + _value_text(value)
                 for path, value in _differences(_without_seeds(dumped), _without_seeds(ran))]
    seeds = [] if run.seeds is None else [f"seeds=[{','.join(map(str, run.seeds))}]"]
    if run.seeds is None and ran["seed"] != dumped["seed"]:
        overrides.append(f"seed={ran['seed']}")
    try:
        rebuilt = load_recipe(recipe_file, overrides + seeds).model_dump(mode="json", by_alias=True)
    except RecipeError as error:
        raise FigureError(f"the overrides rebuilt for {run.folder} do not load: {error}") from None
    if _without_seeds(rebuilt) != _without_seeds(ran):
        where, now, then = _first_difference(_without_seeds(rebuilt), _without_seeds(ran))
        raise FigureError(f"no command rebuilds its recipe from {recipe_file}: at {where} the file gives {now!r}, the "
                          f"run had {then!r} (a run from another nnopt version, whose schema differed: rerun it)")
    words = ["nnopt", "run", _shown_path(recipe_file, cwd)]
    for text in overrides:
        words += ["-o", text]
    if run.seeds is not None and dumped.get("seeds") != run.seeds:
        words += ["--seeds", ",".join(map(str, run.seeds))]
    root = run.folder.resolve().parent
    if root != (cwd / "outputs").resolve():
        words += ["-O", _shown_path(root, cwd)]
    return shlex.join(words)


def _with_threads(run: Run) -> dict:
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


def _first_difference(now, then, path: str = "") -> tuple[str, object, object]:
    """Where two recipe dumps first differ: (dotted path, value now, value in the run; `<absent>` for a missing key)."""
    if isinstance(now, dict) and isinstance(then, dict):
        for key in list(now) + [key for key in then if key not in now]:
            a, b = now.get(key, "<absent>"), then.get(key, "<absent>")
            if a != b:
                return _first_difference(a, b, f"{path}.{key}".strip("."))
    if isinstance(now, list) and isinstance(then, list) and len(now) == len(then):
        for index, (a, b) in enumerate(zip(now, then)):
            if a != b:
                return _first_difference(a, b, f"{path}[{index}]")
    return path, now, then


def _without_seeds(recipe: dict) -> dict:
    return {key: value for key, value in recipe.items() if key not in ("seed", "seeds")}


def _shown_path(path: Path, cwd: Path) -> str:
    path = path.resolve()
    return os.path.relpath(path, cwd.resolve()) if path.is_relative_to(cwd.resolve()) else str(path)


# ---- figures ------------------------------------------------------------------------------------------


def _number(name: str, value: float) -> str:
    if isinstance(value, float) and name.rsplit(".", 1)[-1].endswith(PERCENT_SUFFIXES) and 0 <= value <= 1:
        return f"{100 * value:.2f}%"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _figure(name: str, values: list) -> str:
    """One value, or mean ± sample std and the values per seed."""
    if len(values) == 1:
        return _number(name, values[0])
    mean, std = statistics.fmean(values), statistics.stdev(values)
    shown = [_number(name, v) for v in (mean, std)]
    if shown[0].endswith("%"):
        shown[1] = shown[1].rstrip("%") + " points"
    return f"{shown[0]} ± {shown[1]} ({', '.join(_number(name, v) for v in values)})"


def metric_values(run: Run, name: str) -> list:
    values = []
    for single in run.singles:
        if "." in name:
            stage, _, key = name.partition(".")
            found = run.stage_metrics(single, stage)
            for part in key.split("."):
                if not isinstance(found, dict) or part not in found:
                    raise FigureError(f"{single}: stage `{stage}` wrote no `{key}`")
                found = found[part]
        elif name in RUN_LEVEL:
            found = run.run_metrics(single).get(name)
        else:
            raise FigureError(f"`{name}` is neither STAGE.KEY nor a run-level metric ({', '.join(RUN_LEVEL)})")
        if not isinstance(found, (int, float)) or isinstance(found, bool):
            raise FigureError(f"{single}: `{name}` is {found!r}, not a number")
        values.append(found)
    return values


def conditions(run: Run) -> str:
    """Wall time of the stages the runs computed (a reused stage was timed in the run that built it, which its
    run.json no longer holds), threads, torch and the date."""
    seconds, ran, total, threads, torch_versions, finished = 0.0, 0, 0, set(), set(), []
    for single in run.singles:
        record = run.run_json(single)
        for stage in record["stages"]:
            total += 1
            if stage["status"] == "ran":
                ran += 1
                seconds += stage["seconds"] or 0
        threads.add(record["threads"])
        torch_versions.add(record["versions"]["torch"])
        finished.append(record["finished"][:10])
    wall = f"{seconds:.0f} s" if ran else "-"
    if run.seeds is not None:
        wall += f" for {len(run.singles)} seeds"
    if ran < total:
        wall += f" ({total - ran} of {total} stages reused, timed when built)"
    return (f"{wall}; {'/'.join(map(str, sorted(threads)))} thread(s), torch {'/'.join(sorted(torch_versions))}, "
            f"{max(finished)}")


def reproduction_row(run: Run, cwd: Path) -> str:
    expect = run.report.get("expect")
    name = run.run_json(run.singles[0])["recipe"]["name"]
    if expect is None:
        rules, reached, result = "no `expect` block", "", "-"
    else:
        verdicts = expect["verdicts"]
        rules = f"{expect['source']}: " + "; ".join(f"{v['metric']} {v['rule']}" for v in verdicts)
        reached = "; ".join(f"{v['metric']} " + (_figure(v["metric"], _verdict_values(run, v["metric"]))
                                                  if v["value"] is not None else "not produced") for v in verdicts)
        passed = sum(v["passed"] for v in verdicts)
        result = f"{'PASS' if expect['passed'] else 'FAIL'} ({passed}/{len(verdicts)})"
    cells = [f"`{name}`", rules, reached, result, conditions(run), f"`{command(run, cwd)}`"]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _verdict_values(run: Run, metric: str) -> list:
    if "." in metric or metric in RUN_LEVEL:
        return metric_values(run, metric)
    raise FigureError(f"expect metric `{metric}` is neither STAGE.KEY nor run-level")


def measured_row(run: Run, name: str, cwd: Path) -> str:
    recipe = run.run_json(run.singles[0])["recipe"]["name"]
    source = f"{name.split('.', 1)[0]}'s metrics.json" if "." in name else "report.json run_metrics"
    cells = [f"`{recipe}` {name}", _figure(name, metric_values(run, name)), conditions(run),
             f"`{command(run, cwd)}` ({source})"]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def tables(folders: list[Path], metrics: list[str], cwd: Path) -> tuple[str, list[str]]:
    """The markdown of both tables, and one error line per folder (or figure) left out."""
    errors: list[str] = []
    reproductions, measured = [], []
    for folder in folders:
        try:
            run = Run.read(folder)
            reproductions.append(reproduction_row(run, cwd))
        except FigureError as error:
            errors.append(f"{folder}: {error}")
            continue
        for name in metrics:
            try:
                measured.append(measured_row(run, name, cwd))
            except FigureError as error:
                errors.append(f"{folder} {name}: {error}")
    lines = []
    if reproductions:
        lines += ["| recipe | expect | ours | result | wall; conditions | command |", "|---|---|---|---|---|---|",
                  *reproductions, ""]
    if measured:
        lines += ["| what | figure | wall; conditions | command |", "|---|---|---|---|", *measured, ""]
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
