"""The `nnopt` command: run, validate, sweep, schema, list, docs, recipes, new, store. Errors are printed once here, never as tracebacks."""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex
import sys
import traceback
from pathlib import Path

from rich.console import Console
from rich.markup import escape as escape_markup

from runner import __version__
from runner.errors import RecipeError, RunError, StageError

EXIT_OK, EXIT_STAGE_FAILED, EXIT_BAD_INPUT, EXIT_EXPECT_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool whose reader closed the pipe

err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
# Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
out_console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def escape(text: str) -> str:
    """Text from a recipe, shown inert: no rich markup, and control characters (a terminal escape
    sequence in a field name could retitle or recolour the user's terminal) spelled out."""
    shown = "".join(ch if ch.isprintable() or ch == "\n" else ascii(ch)[1:-1] for ch in str(text))
    return escape_markup(shown)


def _print_recipe_error(error: RecipeError) -> None:
    count = len(error.issues)
    err_console.print(f"[bold red]error[/]: {count} problem{'s' if count != 1 else ''} in the recipe")
    for issue in error.issues:
        field = f"[bold]{escape(issue.field)}[/]: " if issue.field else ""
        err_console.print(f"  [cyan]{escape(issue.location())}[/]: {field}{escape(issue.message)}")
        if issue.hint:
            err_console.print(f"    [yellow]hint[/]: {escape(issue.hint)}")


def _overrides(args) -> list[str]:
    """`-o` texts, plus `--seeds 0,1,2` as the override `seeds=[0,1,2]` (validated like the file)."""
    seeds = getattr(args, "seeds", None)
    return args.override + ([f"seeds=[{seeds}]"] if seeds else [])


def _load(args, build_user_code: bool = False):
    from runner.recipe import load_recipe

    recipe = load_recipe(args.recipe, _overrides(args), build_user_code)
    for issue in recipe.warnings:  # legal but suspicious settings; run.json records them too
        field = f"[bold]{escape(issue.field)}[/]: " if issue.field else ""
        err_console.print(f"[yellow]warning[/]: [cyan]{escape(issue.location())}[/]: {field}{escape(issue.message)}")
        if issue.hint:
            err_console.print(f"    [yellow]hint[/]: {escape(issue.hint)}")
    return recipe


def cmd_validate(args) -> int:
    recipe = _load(args, build_user_code=args.build_model)
    kinds = ", ".join(f"{s.name} ({s.kind})" for s in recipe.stages)
    count = len(recipe.stages)
    built_on = f" (extends {escape(recipe.extends.file)})" if recipe.extends is not None else ""
    out_console.print(f"[green]ok[/]: {escape(args.recipe)}: recipe `{recipe.name}`{built_on}, "
                      f"{count} stage{'s' if count != 1 else ''}: {kinds}")
    return EXIT_OK


def cmd_run(args) -> int:
    recipe = _load(args, build_user_code=True)  # the run builds the model anyway: check it before any stage
    from runner.experiment import run_experiment

    result = run_experiment(recipe, Path(args.output_dir) / recipe.name, out_console, recipe_file=Path(args.recipe),
                            force=args.force, start=args.start, only=args.only)
    if args.check and not result.passed:
        failed = ", ".join(v.metric for v in result.verdicts if not v.passed)
        err_console.print(f"[bold red]check failed[/]: {escape(failed)} missed the expected figures")
        return EXIT_EXPECT_FAILED
    return EXIT_OK


def cmd_sweep(args) -> int:
    from runner.sweep import plan_points, run_sweep

    run_sweep(*plan_points(args.recipe, _overrides(args), args.set, Path(args.output_dir)), out_console)
    return EXIT_OK


def cmd_schema(args) -> int:
    from runner.recipe.schema import Recipe

    schema = Recipe.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "nnopt recipe"
    sys.stdout.write(json.dumps(schema, indent=2) + "\n")
    sys.stdout.flush()  # a closed pipe (`nnopt schema | head`) surfaces here, inside main's handler
    return EXIT_OK


def cmd_list(args) -> int:
    from rich.table import Table

    if args.args:
        from runner.fieldref import registry_rows

        table = Table(title="nnopt registries and their arguments (`nnopt docs NAME` explains each field)")
        for column in ("registry", "name", "arguments"):
            table.add_column(column, overflow="fold")
        for row in registry_rows():
            table.add_row(*(escape(cell) for cell in row))
        out_console.print(table)
        return EXIT_OK

    from runner.data import DATASETS
    from runner.models import MODELS
    from runner.recipe.stages import STAGE_KINDS  # the spec union's kinds: runner.stages would import Lightning
    from runner.recipe.training import OPTIMIZER_NAMES, SCHEDULE_NAMES

    table = Table(title="nnopt registries", show_lines=True)
    table.add_column("kind")
    table.add_column("names")
    for kind, names in [("stage kinds", sorted(STAGE_KINDS)), ("models", MODELS.names()),
                        ("data sets", DATASETS.names()), ("optimizers", OPTIMIZER_NAMES),
                        ("schedules", SCHEDULE_NAMES)]:
        table.add_row(kind, ", ".join(names))
    out_console.print(table)
    return EXIT_OK


def cmd_docs(args) -> int:
    from runner import fieldref

    if args.all:
        sys.stdout.write(fieldref.reference_page())
        sys.stdout.flush()
        return EXIT_OK
    if args.key is None:
        out_console.print("sections: " + ", ".join(section.key for section in fieldref.sections()), soft_wrap=True)
        out_console.print("`nnopt docs KEY` shows one; `nnopt docs --all` prints the whole reference as markdown")
        return EXIT_OK
    sections = fieldref.find(args.key)
    if not sections:
        from runner.registry import did_you_mean

        keys = [section.key for section in fieldref.sections()]
        raise RunError(f"no recipe section `{args.key}`", (did_you_mean(args.key, keys) or "") + " `nnopt docs` lists them")
    from rich.markdown import Markdown

    for section in sections:
        out_console.print(Markdown(fieldref.markdown(section)))
    return EXIT_OK


def cmd_recipes(args) -> int:
    from rich.table import Table

    from runner.templates import shipped

    table = Table(title="shipped recipes (`nnopt new NAME --from RECIPE` copies one here)")
    table.add_column("recipe", no_wrap=True)
    table.add_column("what it does", overflow="fold")
    for template in shipped():
        table.add_row(template.name, escape(template.description))
    out_console.print(table)
    return EXIT_OK


def cmd_new(args) -> int:
    from runner.templates import new_recipe

    path, parents = new_recipe(args.name, args.source, Path(args.dir))
    out_console.print(f"wrote {escape(path)} (from `{escape(args.source)}`); run it with: nnopt run {escape(path)}")
    if parents:
        out_console.print(f"and the shipped recipes it extends: {escape(', '.join(map(str, parents)))}")
    return EXIT_OK


def cmd_store(args) -> int:
    from rich.table import Table

    from runner.store import age, find_store, keep_setting, origin, size_text

    store = find_store(Path(args.folder))
    if store is None:
        raise RunError(f"no stage store in {args.folder} or the folders above it",
                       "give the output folder of a recipe, e.g. outputs/<recipe name>")
    keep = keep_setting(args.keep)
    if args.prune:
        removed = store.prune(keep)
        if removed is None:
            raise RunError(f"an nnopt run is using {store.root}", "prune once it has finished")
        out_console.print(f"pruned {len(removed)} artifacts, {size_text(sum(e.size for e in removed))} freed")
    entries = sorted(store.entries(), key=lambda e: (e.stage, -e.modified))
    surplus = {e.folder for e in store.surplus(keep)}
    table = Table(title=f"stage store {escape(store.root)}")
    for column in ("stage", "fingerprint", "build", "state", "size", "age", "shown by"):
        table.add_column(column, justify="right" if column in ("build", "size", "age") else "left")
    for e in entries:
        brought = origin(e.folder)  # finished in a sibling recipe's store, brought here (runner.store.Store.bring)
        state = (e.state + (f", from {brought['recipe']}" if brought else "")
                 + (" (prune removes)" if e.folder in surplus else ""))
        shown = ", ".join(str(p.relative_to(store.root.parent)) for p in e.used_by)
        table.add_row(escape(e.stage), e.fingerprint, "building" if e.build is None else str(e.build), state,
                      size_text(e.size), age(e.modified), escape(shown))
    out_console.print(table)
    total = size_text(sum(e.size for e in entries))
    out_console.print(f"{len(entries)} artifacts, {total}; a prune keeps every current one and the newest {keep} other "
                      f"configs per stage name" + (f": {len(surplus)} would go (--prune)" if surplus else ""))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from runner.store import DEFAULT_KEEP, KEEP_VARIABLE

    parser = argparse.ArgumentParser(prog="nnopt", description="Declarative neural-network optimization pipelines")
    parser.add_argument("--version", action="version", version=f"nnopt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_recipe(name: str, help_text: str):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("recipe", help="path to a recipe YAML file")
        sub.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                         help="set a field, e.g. -o stages.train.epochs=3 (repeatable; validated like the file)")
        return sub

    def seeds_option(sub):
        sub.add_argument("--seeds", metavar="K,K,...", help="run once per seed (e.g. 0,1,2) and report mean ± std; "
                         "replaces the recipe's seed/seeds")
        sub.add_argument("-O", "--output-dir", default="outputs", help="where run folders go (default: outputs)")

    run = with_recipe("run", "validate and run a recipe")
    seeds_option(run)
    run.add_argument("--check", action="store_true",
                     help=f"exit with code {EXIT_EXPECT_FAILED} when any figure of the recipe's `expect` block FAILs")
    rerun = run.add_mutually_exclusive_group()
    rerun.add_argument("--force", action="store_true", help="rerun every stage, even those with a finished artifact")
    rerun.add_argument("--from", dest="start", metavar="STAGE",
                       help="rerun STAGE and every stage after it; earlier finished stages are reused")
    rerun.add_argument("--only", metavar="STAGE",
                       help="run only STAGE, from the finished artifact of the stage before it")
    run.set_defaults(handler=cmd_run)
    sweep = with_recipe("sweep", "run a recipe over a grid of values and draw the trade-off curve")
    sweep.add_argument("-s", "--set", action="append", required=True, metavar="KEY=V1,V2,...",
                       help="an axis of the grid, e.g. -s stages.prune.sparsity=0.5,0.9 (repeatable: the grid is "
                            "the product; each value is validated like -o)")
    seeds_option(sweep)
    sweep.set_defaults(handler=cmd_sweep)
    validate = with_recipe("validate", "check a recipe without running anything")
    validate.add_argument("--build-model", action="store_true", help="also build an `import:` model factory (runs "
                          "your code) to check it against the data and the stages, as `run` does before any stage")
    validate.set_defaults(handler=cmd_validate)
    store = commands.add_parser("store", help="list the finished stage artifacts kept for a recipe's output folder; prune them")
    store.add_argument("folder", help="a recipe's output folder (outputs/<name>), or a run or stage folder in it")
    store.add_argument("--prune", action="store_true", help="remove what the bound does not keep (never a current artifact)")
    store.add_argument("--keep", metavar="N", help="configs kept per stage name besides the current ones "
                       f"(default: ${KEEP_VARIABLE}, else {DEFAULT_KEEP})")
    store.set_defaults(handler=cmd_store)
    commands.add_parser("schema", help="print the recipe JSON Schema").set_defaults(handler=cmd_schema)
    listing = commands.add_parser("list", help="list stage kinds, models, data sets, optimizers, schedules")
    listing.add_argument("--args", action="store_true", help="with each name's arguments and defaults")
    listing.set_defaults(handler=cmd_list)
    docs = commands.add_parser("docs", help="the recipe field reference: `nnopt docs prune`, `nnopt docs trainer`")
    docs.add_argument("key", nargs="?", help="a section: recipe, model, data, trainer, expect, a stage kind, "
                      "an optimizer or schedule name, or a nested block such as trainer.checkpoint")
    docs.add_argument("--all", action="store_true", help="print every section as one markdown page")
    docs.set_defaults(handler=cmd_docs)
    commands.add_parser("recipes", help="list the shipped recipes").set_defaults(handler=cmd_recipes)
    new = commands.add_parser("new", help="copy a shipped recipe to NAME.yaml to start your own")
    new.add_argument("name", help="the new recipe's name (and file name)")
    new.add_argument("--from", dest="source", default="prune_then_quant", help="the shipped recipe to copy "
                     "(default: prune_then_quant; `nnopt recipes` lists them)")
    new.add_argument("--dir", default=".", help="where to write NAME.yaml (default: here)")
    new.set_defaults(handler=cmd_new)
    return parser


def _os_error_message(error: OSError) -> str:
    """Disk full and unwritable folders are the user's to fix: say which file and what to do."""
    where = f" ({error.filename})" if error.filename else ""
    if error.errno == errno.ENOSPC:
        return f"the disk is full{where}; free some space or choose another output folder with -O, then rerun to continue"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
        return f"cannot write{where}: {error.strerror}; choose a writable output folder with -O"
    return str(error)


def _out_of_memory(error: Exception) -> bool:
    """Host or device allocation failures (absurd sizes in a valid recipe), as torch and Python report them."""
    text = str(error)
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text))


def _print_error(message: str, hint: str | None) -> None:
    err_console.print(f"[bold red]error[/]: {escape(message)}")
    if hint:
        err_console.print(f"  [yellow]hint[/]: {escape(hint)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except BrokenPipeError:  # the reader went away (`nnopt schema | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return EXIT_BROKEN_PIPE
    except RecipeError as error:
        _print_recipe_error(error)
        return EXIT_BAD_INPUT
    except StageError as error:
        _print_error(f"stage `{error.stage}` failed: {error.message}", error.hint)
        err_console.print("  earlier stages' artifacts are complete and will be reused on the next run")
        return EXIT_STAGE_FAILED
    except RunError as error:
        _print_error(error.message, error.hint)
        return EXIT_STAGE_FAILED
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: finished stages are kept and an interrupted training stage "
                          "resumes from its last checkpoint; to continue, run the same command again:")
        err_console.print("  " + escape(shlex.join(["nnopt", *argv])), soft_wrap=True)
        return EXIT_INTERRUPTED
    except Exception as error:  # data unavailable, disk full, ...: a message, not a traceback
        from runner.data import DataUnavailable

        if _out_of_memory(error):
            err_console.print(f"[bold red]error[/]: out of memory: {escape(str(error).splitlines()[0][:300])}")
            err_console.print("  [yellow]hint[/]: the recipe asks for more memory than this machine has: a smaller model "
                              "(`model.args`), `data.batch_size` or `eval_batch_size`; finished stages are kept")
            return EXIT_STAGE_FAILED
        if isinstance(error, OSError):
            err_console.print(f"[bold red]error[/]: {escape(_os_error_message(error))}")
            return EXIT_STAGE_FAILED
        if isinstance(error, DataUnavailable):
            err_console.print(f"[bold red]error[/]: {escape(str(error))}")
            return EXIT_STAGE_FAILED
        if os.environ.get("NNOPT_DEBUG"):
            raise
        # Anything else is a bug in nnopt or in user code behind `import:`; say where, keep it short.
        frame = traceback.extract_tb(error.__traceback__)[-1]
        err_console.print(f"[bold red]error[/]: unexpected {type(error).__name__}: {escape(str(error)[:300])}")
        err_console.print(f"  at {escape(frame.filename)}:{frame.lineno} in {escape(frame.name)}")
        err_console.print("  [yellow]hint[/]: finished stages are kept; set NNOPT_DEBUG=1 to see the full traceback "
                          "and please report it if the code is nnopt's")
        return EXIT_STAGE_FAILED


if __name__ == "__main__":
    sys.exit(main())
