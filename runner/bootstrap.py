"""Set up `.venv` when it is missing or stale, then run a command inside it (standard library only).

    python3 -m runner.bootstrap nnopt run recipes/prune_then_quant.yaml
    python3 -m runner.bootstrap pytest -q

The first call creates `.venv` next to pyproject.toml and installs a matching torch/torchvision pair
first, then nnopt with its `dev` extra (tests, plots, ONNX). Later calls find the environment ready
(a stamp records what was installed) and go straight to the command. This module lives inside the
package so the quick start is one plain `python3 -m` call on any OS, with no shell script to keep in
step; it imports nothing but the standard library (runner/__init__.py must stay that way), because
it runs before torch or any dependency exists.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# torch and torchvision are released in lockstep: each torchvision build works with exactly one torch.
# They are installed together, before nnopt, so pip never resolves one without the other.
TORCH_PAIR = ("torch==2.14.1", "torchvision==0.29.1")
TORCH_VARIABLE = "NNOPT_TORCH"  # e.g. "torch==2.5.1 torchvision==0.20.1": another matching pair
STAMP = ".nnopt-bootstrap"  # inside the venv: what the last set-up installed
PIP_INSTALL = ["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]


def torch_pair() -> list[str]:
    return os.environ.get(TORCH_VARIABLE, " ".join(TORCH_PAIR)).split()


def venv_bin(env: Path) -> Path:
    return env / ("Scripts" if os.name == "nt" else "bin")


def wanted_stamp(root: Path, pair: list[str]) -> str:
    """What a ready environment was built from: the torch pair and pyproject.toml's content."""
    digest = hashlib.sha256((root / "pyproject.toml").read_bytes()).hexdigest()[:16]
    return f"{' '.join(pair)} pyproject:{digest}\n"


def normalized(name: str) -> str:
    """A distribution's name as packaging compares them (PEP 503): `PyYAML`, `torch_pruning`, `torch-pruning`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def missing_distributions(env: Path) -> list[str]:
    """What nnopt's installed metadata requires (its `dev` extra included) and `env` lacks, e.g. a package
    uninstalled by hand after the stamp was written; ["nnopt"] when nnopt itself is not installed. Read from
    the folder names and nnopt's METADATA alone (a few milliseconds, no process started). A requirement under
    any other environment marker (a platform, a Python version) is left to pip: judging it needs pip's parser."""
    folders = [*env.glob("lib/python*/site-packages"), env / "Lib" / "site-packages"]
    # `name-version.dist-info` (the name with - as _), or an older `name-version-pyX.Y.egg-info`
    found = {folder / entry: normalized(entry.split("-")[0]) for folder in folders if folder.is_dir()
             for entry in os.listdir(folder) if entry.endswith((".dist-info", ".egg-info"))}
    installed = set(found.values())
    metadata = [path / "METADATA" for path, name in found.items() if name == "nnopt" and path.suffix == ".dist-info"]
    if not metadata:
        return ["nnopt"]
    wanted = []
    for line in metadata[0].read_text(encoding="utf-8").splitlines():
        if line.startswith("Requires-Dist:"):
            requirement, _, marker = line.removeprefix("Requires-Dist:").partition(";")
            if marker.strip() in ("", 'extra == "dev"'):
                wanted.append(normalized(re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1)))
    return [name for name in dict.fromkeys(wanted) if name not in installed]


def set_up_steps(root: Path, env: Path, pair: list[str]) -> list[list[str]]:
    """The commands that make `env` ready; none when its stamp matches (a ready environment) and none of
    nnopt's requirements has gone missing since."""
    stamp = env / STAMP
    if stamp.is_file() and stamp.read_text() == wanted_stamp(root, pair) and not missing_distributions(env):
        return []
    python = str(venv_bin(env) / "python")
    pip = [python, *PIP_INSTALL]
    return [pip + ["--upgrade", "pip"], pip + pair, pip + ["-e", f"{root}[dev]"]]


def ensure_env(root: Path = ROOT, env: Path | None = None, echo=print) -> Path:
    """Create and fill `root/.venv` if it is missing or stale; returns its bin folder."""
    env = env or root / ".venv"
    pair = torch_pair()
    steps = set_up_steps(root, env, pair)
    if steps:
        if not (venv_bin(env) / "python").exists():
            echo(f"nnopt bootstrap: creating {env}")
            venv.EnvBuilder(with_pip=True).create(env)
        for step in steps:
            echo("nnopt bootstrap: pip install " + " ".join(step[1 + len(PIP_INSTALL):]))
            # pip's own output (build-backend notices included) only when it fails: then it is the diagnosis
            done = subprocess.run(step, cwd=root, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"nnopt bootstrap: pip failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
        (env / STAMP).write_text(wanted_stamp(root, pair))
    return venv_bin(env)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ + f"\nThe torch pair installed: {' '.join(TORCH_PAIR)} (${TORCH_VARIABLE} names another matching pair).")
        return 0 if argv else 2
    bin_dir = ensure_env()
    program = bin_dir / argv[0]
    if not program.exists():
        print(f"nnopt bootstrap: {argv[0]} is not a command of {bin_dir} (try nnopt, pytest or python)", file=sys.stderr)
        return 2
    return subprocess.run([str(program), *argv[1:]], cwd=os.getcwd()).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
