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
    (env / "lib" / "python3.11" / "site-packages" / "nnopt-0.1.0.dist-info").mkdir(parents=True)
    (env / "lib" / "python3.11" / "site-packages" / "nnopt-0.1.0.dist-info" / "METADATA").write_text("Name: nnopt\n")
    (env / bootstrap.STAMP).write_text(bootstrap.wanted_stamp(tmp_path, pair))
    assert bootstrap.set_up_steps(tmp_path, env, pair) == []
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\ndependencies = ['rich']\n")
    assert len(bootstrap.set_up_steps(tmp_path, env, pair)) == 3  # pyproject changed: refilled


def test_bootstrap_refills_an_env_that_lost_a_requirement(tmp_path):
    """A stamped environment from which a requirement was uninstalled (or that predates one its metadata lists)."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    env, pair = tmp_path / ".venv", ["torch==2.14.1", "torchvision==0.29.1"]
    site = env / "lib" / "python3.11" / "site-packages"
    (site / "nnopt-0.1.0.dist-info").mkdir(parents=True)
    (site / "nnopt-0.1.0.dist-info" / "METADATA").write_text(
        "Name: nnopt\nRequires-Dist: PyYAML>=6\nRequires-Dist: torch-pruning<1.7,>=1.6\n"
        'Requires-Dist: pytest-xdist<4,>=3.6; extra == "dev"\nRequires-Dist: onnx>=1.15; extra == "onnx"\n'
        'Requires-Dist: pywin32; sys_platform == "win32"\n')
    for installed in ("PyYAML-6.0.2.dist-info", "torch_pruning-1.6.1.dist-info"):
        (site / installed).mkdir()
    (env / bootstrap.STAMP).write_text(bootstrap.wanted_stamp(tmp_path, pair))
    assert bootstrap.missing_distributions(env) == ["pytest-xdist"]  # other extras' and platforms' are pip's
    assert len(bootstrap.set_up_steps(tmp_path, env, pair)) == 3
    (site / "pytest_xdist-3.8.0.dist-info").mkdir()
    assert bootstrap.set_up_steps(tmp_path, env, pair) == []
    # the environment these tests run in is complete, or every bootstrap call would reinstall it
    assert bootstrap.missing_distributions(Path(sys.prefix)) == []


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
