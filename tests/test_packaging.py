"""Set-up and packaging: the bootstrap module, the package list, `import nnopt`, console behaviour in a pipe."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from runner import bootstrap

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_of_runner_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "runner").rglob("__init__.py")}
    found -= {"runner.facade"}  # installed as `nnopt`
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert config["package-dir"] == {"nnopt": "runner/facade", "nnopt.recipes": "recipes"}


def test_torch_pair_matches_the_declared_ranges():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("torchvision>=") for d in dependencies)
    torch_pin, vision_pin = bootstrap.TORCH_PAIR
    from packaging.requirements import Requirement

    ranges = {Requirement(d).name: Requirement(d).specifier for d in dependencies}
    assert torch_pin.split("==")[1] in ranges["torch"] and vision_pin.split("==")[1] in ranges["torchvision"]


def test_bootstrap_plans_a_fresh_env_then_nothing_once_stamped(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    env = tmp_path / ".venv"
    pair = ["torch==2.14.1", "torchvision==0.29.1"]
    steps = bootstrap.set_up_steps(tmp_path, env, pair)
    # torch and torchvision together and before nnopt, so pip never resolves one without the other
    assert steps[1][-2:] == pair and steps[2][-2:] == ["-e", f"{tmp_path}[dev]"]
    env.mkdir()
    (env / bootstrap.STAMP).write_text(bootstrap.wanted_stamp(tmp_path, pair))
    assert bootstrap.set_up_steps(tmp_path, env, pair) == []
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\ndependencies = ['rich']\n")
    assert len(bootstrap.set_up_steps(tmp_path, env, pair)) == 3  # pyproject changed: refilled


def test_bootstrap_runs_on_a_bare_python():
    """It must work before any dependency exists: -S hides site-packages (no torch, yaml, rich)."""
    done = subprocess.run([sys.executable, "-S", "-m", "runner.bootstrap", "--help"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "python3 -m runner.bootstrap nnopt run" in done.stdout, done.stderr


def test_ci_runs_the_readme_test_command():
    assert "python3 -m runner.bootstrap pytest" in (ROOT / ".ci" / "run").read_text()
    assert "python3 -m runner.bootstrap pytest" in (ROOT / "README.md").read_text()


def test_schema_in_a_closed_pipe_ends_quietly():
    shell = f"{sys.executable} -m runner schema | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", shell], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.strip() == "{" and done.stderr == "", done.stderr


def test_first_mnist_fetch_says_what_and_where(tmp_path, monkeypatch, capsys):
    import pytest

    from runner.data import DataUnavailable, mnist

    monkeypatch.setenv("NNOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NNOPT_MNIST_PKL", raising=False)
    monkeypatch.setattr(mnist.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "offline"))
    with pytest.raises(DataUnavailable):
        mnist._load_arrays()
    notice = capsys.readouterr().err
    assert "fetching MNIST once" in notice and "MB" in notice and str(tmp_path / "cache") in notice
