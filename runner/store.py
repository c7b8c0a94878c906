"""The stage store: finished artifacts kept by fingerprint, built apart and swapped in whole, or brought from a sibling recipe's."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from runner import artifacts
from runner.errors import RunError
from runner.files import read_json, write_json, write_text

STORE = ".store"  # one per recipe output folder (`outputs/<name>/.store`), shared by its seeds and sweep points
BUILDING = ".building"  # `<store>/.building/<fingerprint>/`: a stage being built, with its resume checkpoints
LOCKS = ".locks"  # `<store>/.locks/<fingerprint>`: held while that stage is built
USERS = ".lock"  # held shared by every run using the store, exclusively by a prune
OWNER = ".owner"  # `outputs/<name>/.owner`: the absolute path of the recipe file that writes there
ORIGIN = "origin.json"  # in an artifact brought from another recipe's store: where it was finished (`Store.bring`)
KEEP_VARIABLE = "NNOPT_STORE_KEEP"
DEFAULT_KEEP = 3  # configs kept per stage name besides those a numbered folder shows
_ENTRY = re.compile(r"^(?P<fingerprint>[0-9a-f]+)\.(?P<build>[0-9]+)$")  # `<fingerprint>.<build>`
_FINGERPRINT = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class Entry:
    """One artifact in the store: finished (`<fingerprint>.<build>/`) or being built (`.building/<fingerprint>/`)."""

    folder: Path
    fingerprint: str
    build: int | None  # None: in .building/
    stage: str  # the stage name from its stage.json ("?" if it has none yet)
    complete: bool  # DONE holds the fingerprint
    size: int  # bytes
    modified: float  # seconds since the epoch: when it was finished (DONE written) or last written
    used_by: tuple[Path, ...]  # numbered stage folders that show it

    @property
    def state(self) -> str:
        if self.used_by:
            return "current"
        return "kept" if self.complete else "unfinished"


def keep_setting(value: int | str | None = None) -> int:
    """How many configs per stage name a prune keeps besides the current ones: `value`, else
    $NNOPT_STORE_KEEP, else DEFAULT_KEEP."""
    raw = value if value is not None else os.environ.get(KEEP_VARIABLE, DEFAULT_KEEP)
    try:
        keep = int(raw)
    except ValueError:
        keep = -1
    if keep < 0:
        raise RunError(f"the number of configs to keep must be a whole number >= 0, not `{raw}`",
                       f"set --keep or ${KEEP_VARIABLE} to, for example, {DEFAULT_KEEP}")
    return keep


class Store:
    """Finished stage artifacts of one recipe output folder, by fingerprint.

    A stage is built in `.building/<fingerprint>/` (its resume checkpoints live there while it is
    unfinished), gets its DONE marker there, is renamed whole to `<fingerprint>.<build>/`, and only
    then does the numbered stage folder (`<run>/NN-<stage>`, a relative link the store makes) switch
    to it with one rename. A kill at any moment leaves the numbered folder showing the old artifact
    or the new one, and the finished work of every config stays findable by its fingerprint.
    """

    def __init__(self, root: Path):
        self.root = Path(os.path.normpath(Path(root).absolute()))

    # -- where things are ----------------------------------------------------------------------
    def building(self, fingerprint: str) -> Path:
        return self.root / BUILDING / fingerprint

    def finished(self, fingerprint: str) -> Path | None:
        """The newest finished artifact of this config, if any. A build that was killed after its DONE
        marker and before its rename into the store is completed here."""
        building = self.building(fingerprint)
        if artifacts.is_done(building, fingerprint):
            with contextlib.suppress(RunError), self.building_lock(fingerprint):
                if artifacts.is_done(building, fingerprint):
                    self._enter(building, fingerprint)
        return self._newest_done(fingerprint)

    def _newest_done(self, fingerprint: str) -> Path | None:
        """The newest finished entry of this config, found by reading only."""
        complete = [path for path in self._builds(fingerprint) if artifacts.is_done(path, fingerprint)]
        return complete[-1] if complete else None

    def shown(self, numbered: Path) -> Path | None:
        """The store entry a numbered stage folder links to, if the store made that link."""
        if not numbered.is_symlink():
            return None
        text = os.readlink(numbered)
        target = Path(os.path.normpath(os.path.join(numbered.absolute().parent, text)))
        if os.path.isabs(text) or target.parent != self.root or not _ENTRY.match(target.name):
            return None
        return target

    def _builds(self, fingerprint: str) -> list[Path]:
        """This config's entries (real folders only), oldest build first."""
        if not self.root.is_dir():
            return []
        found = [(int(m["build"]), path) for path in self.root.iterdir()
                 if (m := _ENTRY.match(path.name)) and m["fingerprint"] == fingerprint
                 and path.is_dir() and not path.is_symlink()]
        return [path for _, path in sorted(found)]

    # -- building and committing ---------------------------------------------------------------
    def begin(self, fingerprint: str, config: dict, resume: bool = True) -> Path:
        """The empty folder a stage is built in (keeping the checkpoints of an interrupted build of this
        config if `resume`). The caller holds `building_lock(fingerprint)` until it commits (see `build`)."""
        self._check_root()
        folder = self.building(fingerprint)
        artifacts.reset(folder, fingerprint, resume=resume)
        write_json(folder / artifacts.CONFIG, config)  # names the stage in `nnopt store` while unfinished
        return folder

    @contextlib.contextmanager
    def build(self, fingerprint: str, config: dict, resume: bool = True):
        """Hold this config's build lock and yield its build folder (`begin`). A build that stops with
        nothing to resume from (no checkpoint, no DONE) is removed: only the checkpoints were worth keeping."""
        with self.building_lock(fingerprint):
            folder = self.begin(fingerprint, config, resume)
            try:
                yield folder
            except BaseException:
                if not artifacts.resume_points(folder, fingerprint) and not artifacts.is_done(folder, fingerprint):
                    shutil.rmtree(folder, ignore_errors=True)
                raise

    def commit(self, fingerprint: str, numbered: Path) -> Path:
        """Finish the build: DONE (last file written), rename it into the store, then point `numbered`
        at it. Returns the store entry."""
        artifacts.mark_done(self.building(fingerprint), fingerprint)
        entry = self._enter(self.building(fingerprint), fingerprint)
        self.show(numbered, entry)
        return entry

    def _enter(self, folder: Path, fingerprint: str) -> Path:
        builds = self._builds(fingerprint)
        entry = self.root / f"{fingerprint}.{int(_ENTRY.match(builds[-1].name)['build']) + 1 if builds else 1}"
        os.rename(folder, entry)  # atomic: the entry appears whole or not at all
        return entry

    # -- artifacts of sibling recipes ----------------------------------------------------------
    def siblings(self) -> list[Store]:
        """The stores of the other recipes under the same output folder (`<output>/*/.store`), by recipe name.
        A recipe's seeds and sweep points share its one store, so these are all the artifacts built there."""
        output = self.root.parent.parent
        try:
            recipes = sorted(output.iterdir())
        except OSError:
            return []
        return [Store(recipe / STORE) for recipe in recipes
                if recipe / STORE != self.root and not recipe.is_symlink()
                and (recipe / STORE).is_dir() and not (recipe / STORE).is_symlink()]

    def bring(self, fingerprint: str) -> tuple[Path, str | None] | None:
        """This config's finished artifact from a sibling recipe's store, brought into this one: returns (the new
        entry, where it was finished: `han2015_lenet5 (seed-0)`), or None when no sibling has one (or (this
        store's entry, None) when another run of this recipe built or brought it since the plan looked).

        The sibling is only read, under its shared lock (no prune of it removes the entry meanwhile), and only a
        finished entry (`<fingerprint>.<build>/` with DONE) is taken, never a `.building/` one. Its files are hard
        links where the file system allows (a finished artifact's files are never written again) and copies
        otherwise, so deleting or pruning the sibling never breaks this store. The copy is assembled as a build
        is, in this config's build folder under its build lock, DONE written last and renamed in whole: a kill
        leaves an unfinished build that plans ignore. A config another run is building here is not brought."""
        with contextlib.suppress(RunError), self.building_lock(fingerprint):
            if (own := self._newest_done(fingerprint)) is not None:
                return own, None
            for sibling in self.siblings():
                with _flock(sibling.root / USERS, exclusive=False, wait=True, create=False) as readable:
                    source = sibling._newest_done(fingerprint) if readable else None
                    files = _plain_files(source) if source is not None else None
                    if files is None:
                        continue
                    folder = self.building(fingerprint)
                    if folder.exists():  # an interrupted build of this config: the finished artifact supersedes it
                        shutil.rmtree(folder)
                    linked = _link_or_copy(source, folder, files)
                    where = sibling.where_shown(source)
                    write_json(folder / ORIGIN, {"recipe": sibling.root.parent.name, "shown_by": where,
                                                 "artifact": os.path.relpath(source, sibling.root.parent.parent),
                                                 "files": "linked" if linked else "copied"})
                artifacts.mark_done(folder, fingerprint)
                return self._enter(folder, fingerprint), _where_label(sibling.root.parent.name, where)
        return None

    def where_shown(self, entry: Path) -> list[str]:
        """The run folders (relative to the recipe output folder: `.`, `seed-0`, `sweep/01_x`) showing `entry`."""
        return sorted({os.path.relpath(numbered.parent, self.root.parent) for numbered in self._uses().get(entry, [])})

    def show(self, numbered: Path, entry: Path) -> None:
        """Make the numbered stage folder a relative link to `entry`, replacing what it showed in one rename."""
        self.prepare(numbered)
        if numbered.is_dir() and not numbered.is_symlink():
            shutil.rmtree(numbered)  # left by prepare: an unfinished old-layout folder with nothing to resume
        numbered.parent.mkdir(parents=True, exist_ok=True)
        staged = numbered.with_name(f".{numbered.name}.{os.getpid()}.link")
        staged.unlink(missing_ok=True)
        os.symlink(os.path.relpath(entry, numbered.absolute().parent), staged)
        os.replace(staged, numbered)

    def prepare(self, numbered: Path) -> None:
        """Before a plan reads a numbered stage folder: refuse a link the store did not make (it could
        lead nnopt to write outside the output folder), and move a real folder of the layout before the
        store into it: a finished one as an entry, an interrupted one (with checkpoints) as its build."""
        if numbered.is_symlink():
            if self.shown(numbered) is None:
                raise OSError(f"{numbered} is a symbolic link that nnopt did not make; nnopt links stage folders "
                              f"only into its store, {self.root} (remove the link or choose another output folder with -O)")
            return
        if not numbered.is_dir():
            return
        done = _marker(numbered / artifacts.DONE)
        owner = _marker(numbered / artifacts.CHECKPOINTS / artifacts.CHECKPOINT_OWNER)
        if done is not None and artifacts.is_done(numbered, done):
            self._check_root()
            # Between this rename and the link the numbered folder is missing; the plan finds the entry by fingerprint.
            self.show(numbered, self._enter(numbered, done))
        elif owner is not None and not self.building(owner).exists():
            self._check_root()
            self.building(owner).parent.mkdir(parents=True, exist_ok=True)
            os.rename(numbered, self.building(owner))

    def _check_root(self) -> None:
        for folder in (self.root.parent, self.root):
            artifacts.refuse_link(folder)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- locks ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def building_lock(self, fingerprint: str):
        """One builder per config: a second run building the same stage config into this store is refused."""
        with _flock(self.root / LOCKS / fingerprint, exclusive=True, wait=False) as held:
            if not held:
                raise RunError(f"another nnopt run ({_holder(self.root / LOCKS / fingerprint)}) is building the same "
                               f"stage config into {self.root}",
                               "wait for it to finish (this run then reuses its artifact), or stop it")
            yield

    @contextlib.contextmanager
    def in_use(self):
        """Held (shared) by a run from its plan to its end, so that a prune never removes what it planned to reuse."""
        self._check_root()
        with _flock(self.root / USERS, exclusive=False, wait=True):
            yield

    # -- listing and pruning -------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Every artifact in the store, finished and unfinished, oldest first."""
        if not self.root.is_dir():
            return []
        uses = self._uses()
        found = []
        for folder in sorted(self.root.iterdir()):
            match = _ENTRY.match(folder.name)
            if match and folder.is_dir() and not folder.is_symlink():
                found.append(self._entry(folder, match["fingerprint"], int(match["build"]), uses))
        building = self.root / BUILDING
        if building.is_dir():
            found += [self._entry(folder, folder.name, None, uses) for folder in sorted(building.iterdir())
                      if _FINGERPRINT.match(folder.name) and folder.is_dir() and not folder.is_symlink()]
        return sorted(found, key=lambda entry: entry.modified)

    def _entry(self, folder: Path, fingerprint: str, build: int | None, uses: dict) -> Entry:
        complete = artifacts.is_done(folder, fingerprint)
        try:
            stage = str(read_json(folder / artifacts.CONFIG)["name"])
        except (OSError, ValueError, KeyError, TypeError):
            stage = "?"
        files = [path for path in folder.rglob("*") if path.is_file() and not path.is_symlink()]
        stamp = folder / artifacts.DONE if complete else folder
        modified = max([stamp.stat().st_mtime] + ([] if complete else [path.stat().st_mtime for path in files]))
        return Entry(folder, fingerprint, build, stage, complete, sum(path.stat().st_size for path in files),
                     modified, tuple(uses.get(folder, ())))

    def _uses(self) -> dict[Path, list[Path]]:
        """Store entry -> the numbered stage folders linking to it, in every run folder beside the store."""
        uses: dict[Path, list[Path]] = defaultdict(list)
        for here, folders, files in os.walk(self.root.parent):  # never follows links
            if Path(here) == self.root.parent and STORE in folders:
                folders.remove(STORE)
            for name in folders + files:
                target = self.shown(Path(here) / name)
                if target is not None:
                    uses[target].append(Path(here) / name)
        return uses

    def surplus(self, keep: int) -> list[Entry]:
        """What a prune removes: never an artifact a numbered folder shows; of the others, per stage name,
        the newest finished build of the `keep` most recent configs stays (or its unfinished build, if
        it has no finished one), everything else goes (older builds of one config, dead builds)."""
        entries = self.entries()
        newest: dict[str, Entry] = {}
        for entry in entries:
            if entry.complete and entry.build is not None and (
                    entry.fingerprint not in newest or entry.build > newest[entry.fingerprint].build):
                newest[entry.fingerprint] = entry
        recency: dict[str, dict[str, float]] = defaultdict(dict)  # stage -> fingerprint -> latest write
        current = {entry.fingerprint for entry in entries if entry.used_by}
        for entry in entries:
            if entry.fingerprint not in current:
                configs = recency[entry.stage]
                configs[entry.fingerprint] = max(configs.get(entry.fingerprint, 0.0), entry.modified)
        kept = current | {fingerprint for configs in recency.values()
                          for fingerprint in sorted(configs, key=configs.get, reverse=True)[:keep]}

        def stays(entry: Entry) -> bool:
            if entry.used_by:
                return True
            if entry.fingerprint not in kept:
                return False
            if entry.fingerprint in newest:
                return entry is newest[entry.fingerprint]
            return entry.build is None  # an interrupted build keeps its checkpoints; a broken entry goes
        return [entry for entry in entries if not stays(entry)]

    def prune(self, keep: int) -> list[Entry] | None:
        """Remove `surplus(keep)`; None (and nothing removed) while a run is using the store."""
        if not self.root.is_dir():
            return []
        with _flock(self.root / USERS, exclusive=True, wait=False) as held:
            if not held:
                return None
            removed = self.surplus(keep)
            for entry in removed:
                shutil.rmtree(entry.folder)
            left = {entry.fingerprint for entry in self.entries()}
            locks = self.root / LOCKS
            for lock in locks.iterdir() if locks.is_dir() else []:
                if lock.name not in left:  # no run holds a build lock while the store lock is held exclusively
                    lock.unlink()
            return removed


def store_of(recipe_output: Path) -> Store:
    return Store(Path(recipe_output) / STORE)


def find_store(folder: Path) -> Store | None:
    """The store a recipe output folder, run folder (seed-<k>/, a sweep point) or stage folder belongs to."""
    folder = Path(folder).absolute()
    for candidate in [folder, *folder.parents][:4]:
        if (candidate / STORE).is_dir() and not (candidate / STORE).is_symlink():
            return Store(candidate / STORE)
    return None


def claim(recipe_output: Path, recipe_file: Path, take_over: bool = False) -> None:
    """One recipe file writes a recipe output folder: another file with the same `name:` is refused
    (unless `take_over`), so that two recipes never replace each other's finished stages."""
    recipe_output = Path(recipe_output)
    artifacts.refuse_link(recipe_output)
    marker, mine = recipe_output / OWNER, str(Path(recipe_file).resolve())
    owner = marker.read_text(encoding="utf-8").strip() if marker.is_file() else ""
    if owner == mine:
        return
    if owner and Path(owner).exists() and not take_over:
        raise RunError(f"{recipe_output} holds the runs of another recipe file with the same `name:`, {owner} "
                       f"(this one is {mine})",
                       "give this run another output folder with -O DIR or the recipe another `name:`; "
                       f"or, to take {recipe_output} over, rerun with --force (every stage of this recipe reruns)")
    recipe_output.mkdir(parents=True, exist_ok=True)
    write_text(marker, mine + "\n")


def origin(entry: Path) -> dict | None:
    """Where a store entry brought from a sibling recipe's store was finished; None for one built in its own store."""
    try:
        return read_json(Path(entry) / ORIGIN)
    except (OSError, ValueError):
        return None


def _where_label(recipe: str, runs: list[str]) -> str:
    """`a` (its plain run shows it), `a (seed-0)`, `a (seed-0, seed-1, seed-2 and 4 more)`, `a (kept in its store)`."""
    named = [run for run in runs if run != "."]
    if not runs:
        return f"{recipe} (kept in its store)"
    if not named:
        return recipe
    return f"{recipe} ({', '.join(named[:3])}{f' and {len(named) - 3} more' if len(named) > 3 else ''})"


def _plain_files(entry: Path) -> list[Path] | None:
    """The files of a finished entry relative to it, DONE and ORIGIN left out (they are written anew);
    None when it holds anything but real folders and files (a link could lead a copy outside the store)."""
    files = []
    for here, folders, names in os.walk(entry):
        for name in folders + names:
            path = Path(here) / name
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                return None
            if not (Path(here) == entry and name in (artifacts.DONE, ORIGIN)):
                files.append(path.relative_to(entry))
    return files


def _link_or_copy(source: Path, target: Path, files: list[Path]) -> bool:
    """Recreate `files` of `source` (folders included) under `target`; True when every file is a hard link."""
    linked = True
    target.mkdir(parents=True)
    for relative in files:
        if (source / relative).is_dir():
            (target / relative).mkdir(parents=True, exist_ok=True)
            continue
        try:
            os.link(source / relative, target / relative, follow_symlinks=False)
        except OSError:  # another file system, or one without hard links
            shutil.copy2(source / relative, target / relative)
            linked = False
    return linked


def _marker(path: Path) -> str | None:
    """The fingerprint a DONE or checkpoint owner mark holds, if it is one."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if _FINGERPRINT.match(text) else None


def _holder(path: Path) -> str:
    try:
        return f"pid {path.read_text().strip() or 'unknown'}"
    except OSError:
        return "pid unknown"


@contextlib.contextmanager
def _flock(path: Path, *, exclusive: bool, wait: bool, create: bool = True):
    """Hold an advisory lock on `path`; yields False instead when it is taken and `wait` is False, or when it
    does not exist (or cannot be opened) and not `create` (a shared lock on another recipe's store, read only).
    The kernel releases it when the process dies, even by kill -9."""
    import fcntl  # POSIX only; nnopt's supported platforms are Linux and macOS

    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT if create else os.O_RDONLY, 0o644)
    except OSError:
        if create or exclusive:
            raise
        yield False
        return
    try:
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, mode)
        except BlockingIOError:
            yield False
            return
        if exclusive:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield True
    finally:
        os.close(fd)


def age(seconds: float, now: float | None = None) -> str:
    """`3m`, `5h`, `2d`: how long ago a time was."""
    elapsed = max(0.0, (time.time() if now is None else now) - seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if elapsed >= size:
            return f"{int(elapsed // size)}{unit}"
    return f"{int(elapsed)}s"


def size_text(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
