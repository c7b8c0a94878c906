"""The structure the code promises: no import cycle, stages that never import each other, every spec variant
implemented, metrics declared, loading a model without the stages, and the Lightning internals we rely on."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

import runner
from runner.recipe.base import variants

from conftest import read_metrics, synthetic_recipe

PACKAGE = Path(runner.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Every runner module -> the runner modules it imports, at top level or inside functions."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    # The registration pattern: a package's __init__ defines its registry, then imports the modules that
    # register into it, which import the registry back from the half-initialized package. Not a cycle.
    for name in graph:
        parent = name.rpartition(".")[0]
        if parent in graph and name in graph[parent]:
            graph[name].discard(parent)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle_in_runner():
    assert _cycles(_import_graph()) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_stage_imports_another_stage():
    graph = _import_graph()
    stage_files = {name for name in graph if name.startswith("runner.stages.") and name != "runner.stages.base"}
    assert stage_files, "no stage modules found"
    assert {(s, t) for s in stage_files for t in graph[s] if t in stage_files} == set()


def test_loading_a_model_needs_neither_lightning_nor_the_stages():
    # nor Torch-Pruning (with the timm and torchvision it imports), until a model with removed channels is replayed
    code = ("import sys, runner.modelio; print(sorted(m for m in sys.modules if m in ('pytorch_lightning', "
            "'torch_pruning', 'timm', 'torchvision') or m.startswith('runner.stages')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_spec_variant_has_its_implementation():
    from runner.lightning.objective import OBJECTIVES
    from runner.lightning.optim import OPTIMIZERS, SCHEDULERS
    from runner.recipe.stages import QuantizeStage
    from runner.recipe.training import Loss, Optimizer, Schedule
    from runner.stages.quantize import METHODS

    for union, implementations in ((Optimizer, OPTIMIZERS), (Schedule, SCHEDULERS), (Loss, OBJECTIVES),
                                   (QuantizeStage, METHODS)):
        assert set(variants(union)) == set(implementations), union


def test_name_lists_come_from_the_unions():
    from runner.recipe.stages import STAGE_KINDS
    from runner.recipe.training import OPTIMIZER_NAMES, SCHEDULE_NAMES
    from runner.stages import STAGES

    assert sorted(STAGE_KINDS) == STAGES.names()
    assert "adamw" in OPTIMIZER_NAMES and "onecycle" in SCHEDULE_NAMES and len(set(SCHEDULE_NAMES)) == 10


def test_the_lightning_internals_we_use_still_exist():
    from pytorch_lightning.loops.fit_loop import _FitLoop
    from pytorch_lightning.trainer import call

    from runner.lightning.internals import HOOK_NAME_ATTRIBUTE

    assert HOOK_NAME_ATTRIBUTE in inspect.getsource(call._call_lightning_module_hook)
    assert callable(getattr(_FitLoop, "_load_combined_loader_states", None))


EVERY_KIND = [
    {"name": "train", "kind": "train", "epochs": 2, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
    {"name": "prune", "kind": "prune", "sparsity": 0.5},
    {"name": "finetune", "kind": "finetune", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01}},
    {"name": "rounds", "kind": "iterative_prune", "rounds": 1, "fraction": 0.2,
     "retrain": {"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01}}},
    {"name": "slim", "kind": "prune", "granularity": "neurons", "sparsity": {"fc1": 0.25}},
    {"name": "evaluate", "kind": "evaluate", "latency_batch_sizes": [1, 8], "latency_repeats": 3, "latency_warmup": 0},
    {"name": "share", "kind": "quantize", "method": "weight_sharing", "bits": 4, "kmeans_iterations": 5},
    {"name": "export", "kind": "export", "formats": ["torchscript"], "check_examples": 8},
]
INT8_KINDS = [
    {"name": "dynamic", "kind": "quantize", "method": "dynamic_int8"},
    {"name": "static", "kind": "quantize", "method": "static_int8", "calibration_batches": 2},
    {"name": "qat", "kind": "quantize", "method": "qat", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01}},
]


@pytest.mark.parametrize("stages", [EVERY_KIND, EVERY_KIND[:1] + INT8_KINDS[1:2], EVERY_KIND[:1] + INT8_KINDS[2:],
                                    EVERY_KIND[:1] + INT8_KINDS[:1]], ids=["float", "static", "qat", "dynamic"])
def test_every_stage_writes_only_the_metrics_it_declares(nnopt, write_recipe, tmp_path, stages):
    from runner.recipe import load_recipe

    recipe = synthetic_recipe()
    recipe["stages"] = stages
    path = write_recipe(recipe)
    code, _, err = nnopt("run", path, "-O", tmp_path)
    assert code == 0, err
    for index, spec in enumerate(load_recipe(path).stages):
        patterns = [metric.name for metric in spec.declared_metrics()]
        written = read_metrics(tmp_path / "tiny", f"{index + 1:02d}-{spec.name}")
        assert written, spec.name
        for metric, value in written.items():
            keys = list(value) if isinstance(value, dict) else range(len(value)) if isinstance(value, list) else None
            names = [metric] if keys is None else [f"{metric}.{key}" for key in keys]
            for name in names:
                assert any(fnmatchcase(name, p) for p in patterns), (spec.kind, name)
