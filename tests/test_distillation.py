"""Knowledge distillation: Hinton's loss on fixed logits, the teacher an earlier stage in eval mode without
gradients, its cost reported, exact resume with a teacher, and a missing teacher found at validate."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from runner.lightning.objective import build_objective, distillation_loss
from runner.lightning.resume import ResumePoints
from runner.lightning.teacher import Teacher
from runner.modelio import load_model
from runner.recipe.training import CrossEntropy, Distillation
from tests.conftest import building_folder, kill_at_step, read_metrics, synthetic_recipe, timing
from tests.test_resume import nnopt_process

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 1.0, 0.0], [0.5, 0.5, 2.5]]
LABELS = [1, 2]


def _softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _by_hand(temperature: float, alpha: float) -> float:
    kl = sum(sum(p * (math.log(p) - math.log(q)) for p, q in zip(_softmax(t, temperature), _softmax(s, temperature)))
             for s, t in zip(STUDENT, TEACHER)) / len(STUDENT)
    ce = sum(-math.log(_softmax(s, 1.0)[y]) for s, y in zip(STUDENT, LABELS)) / len(STUDENT)
    return alpha * temperature**2 * kl + (1 - alpha) * ce


@pytest.mark.parametrize("temperature, alpha", [(2.0, 0.75), (4.0, 0.9), (1.0, 0.0), (3.0, 1.0)])
def test_distillation_loss_equals_a_hand_computation(temperature, alpha):
    spec = Distillation(teacher="train", temperature=temperature, alpha=alpha)
    hard = build_objective(CrossEntropy(name="cross_entropy"), 3)
    student = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    loss = distillation_loss(spec, hard, student, torch.tensor(TEACHER, dtype=torch.float64), torch.tensor(LABELS))
    assert float(loss.detach()) == pytest.approx(_by_hand(temperature, alpha), rel=1e-12)
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_a_student_that_matches_its_teacher_pays_only_the_labels_share():
    spec = Distillation(teacher="train", temperature=5.0, alpha=0.6)
    hard = build_objective(CrossEntropy(name="cross_entropy"), 3)
    logits, labels = torch.tensor(TEACHER), torch.tensor(LABELS)
    assert float(distillation_loss(spec, hard, logits, logits.clone(), labels)) == pytest.approx(
        0.4 * float(hard(logits, labels)), abs=1e-6)


def test_the_teacher_runs_in_eval_mode_without_gradients():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    teacher = Teacher("train", model)
    x = torch.randn(16, 4)
    first, second = teacher.logits(x), teacher.logits(x)
    assert torch.equal(first, second)  # dropout off
    assert not first.requires_grad and not any(p.requires_grad for p in model.parameters())
    cost = teacher.cost(fit_seconds=10.0, world_size=1)
    assert cost["teacher"] == "train" and cost["teacher_params"] == 4 * 8 + 8 + 8 * 3 + 3
    assert teacher.seconds > 0 and cost["teacher_seconds"] == round(teacher.seconds, 3)
    assert cost["teacher_share"] == pytest.approx(teacher.seconds / 10, abs=1e-4)
    assert cost["ranks"] == [{"examples": 32, "eval_mode": True, "frozen": True}]


# ---- through the CLI ---------------------------------------------------------------------------------------


def _distilled_recipe(epochs: int = 3, **distillation) -> dict:
    recipe = synthetic_recipe(epochs=2)
    recipe["model"]["args"]["dropout"] = 0.3  # the student draws from the RNG: resume must restore it
    finetune = {"name": "finetune", "kind": "finetune", "epochs": epochs, "schedule": {"name": "cosine"},
                "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
                "distillation": {"teacher": "train", "temperature": 3.0, "alpha": 0.8, **distillation}}
    recipe["stages"] = [recipe["stages"][0], {"name": "prune", "kind": "prune", "sparsity": 0.8}, finetune]
    recipe["trainer"]["checkpoint"] = {"every_n_steps": 4}
    # Sums round by the thread count: the in-process straight run (whose process earlier tests may have set
    # to one thread) and the SIGKILL'd subprocess must use the same one.
    recipe["trainer"]["threads"] = 1
    return recipe


def _finetune_result(run_dir) -> tuple[dict, dict]:
    metrics = read_metrics(run_dir, "03-finetune")
    teacher = metrics.pop("distillation")
    metrics = {k: v for k, v in metrics.items() if not timing(k)}
    return metrics, teacher


def _weights(run_dir) -> dict:
    return torch.load(run_dir / "03-finetune" / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    from runner.cli import main
    import yaml

    folder = tmp_path_factory.mktemp("straight")
    (folder / "recipe.yaml").write_text(yaml.safe_dump(_distilled_recipe()))
    assert main(["run", str(folder / "recipe.yaml"), "-O", str(folder)]) == 0
    return folder / "tiny"


def test_distillation_changes_training_and_reports_the_teachers_cost(nnopt, write_recipe, tmp_path, straight):
    metrics, teacher = _finetune_result(straight)
    assert teacher["teacher"] == "train" and teacher["teacher_params"] == 32 * 32 + 32 + 32 * 10 + 10
    assert teacher["teacher_seconds"] > 0 and 0 < teacher["teacher_share"] < 1
    plain = _distilled_recipe()
    del plain["stages"][2]["distillation"]
    code, _, err = nnopt("run", write_recipe(plain), "-O", tmp_path)
    assert code == 0, err
    assert "distillation" not in read_metrics(tmp_path / "tiny", "03-finetune")
    distilled, undistilled = _weights(straight), _weights(tmp_path / "tiny")
    assert not torch.equal(distilled["fc1.parametrizations.weight.original"], undistilled["fc1.parametrizations.weight.original"])


def test_a_distilled_fit_resumes_exactly_after_an_interruption(nnopt, write_recipe, tmp_path, monkeypatch, straight):
    save, seen = ResumePoints._save, {}

    def save_then_interrupt(self, trainer):  # Ctrl-C after the finetune's third checkpoint
        save(self, trainer)
        seen[self.path] = seen.get(self.path, 0) + 1
        if len(seen) == 2 and seen[self.path] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(ResumePoints, "_save", save_then_interrupt)
    path = write_recipe(_distilled_recipe())
    code, _, _ = nnopt("run", path, "-O", tmp_path)
    assert code == 130 and len(seen) == 2
    monkeypatch.setattr(ResumePoints, "_save", save)
    code, out, err = nnopt("run", path, "-O", tmp_path)
    assert code == 0, err
    assert "finetune (finetune): unfinished: resumes from its last checkpoint at step" in out
    got, teacher = _finetune_result(tmp_path / "tiny")
    assert got == _finetune_result(straight)[0]
    expected = _weights(straight)
    assert all(torch.equal(_weights(tmp_path / "tiny")[k], expected[k]) for k in expected)
    assert teacher["teacher"] == "train"


@pytest.mark.slow
def test_a_distilled_fit_killed_with_sigkill_resumes_exactly(write_recipe, tmp_path, straight):
    path = write_recipe(_distilled_recipe())  # exactly the straight run's recipe
    victim = nnopt_process(path, tmp_path)
    position = building_folder(tmp_path / "tiny", path, index=2) / "checkpoint" / "last.json"
    kill_at_step(victim, position, 20)  # the finetune's second epoch
    resumed = nnopt_process(path, tmp_path)
    out = resumed.communicate()[0]
    assert resumed.returncode == 0, out
    assert "finetune (finetune): unfinished: resumes from its last checkpoint" in out
    assert _finetune_result(tmp_path / "tiny")[0] == _finetune_result(straight)[0]
    expected = _weights(straight)
    assert all(torch.equal(_weights(tmp_path / "tiny")[k], expected[k]) for k in expected)


@pytest.mark.parametrize("where, teacher, message", [
    ("finetune", "trian", "stages[2].distillation.teacher: the recipe has no stage `trian`"),
    ("finetune", "finetune", "stage `finetune` runs after this one"),
    ("retrain", "nowhere", "stages[2].retrain.distillation.teacher: the recipe has no stage `nowhere`"),
])
def test_a_missing_teacher_stage_is_a_located_validate_error(nnopt, write_recipe, where, teacher, message):
    recipe = _distilled_recipe(teacher=teacher)
    if where == "retrain":
        finetune = recipe["stages"][2]
        recipe["stages"][2] = {"name": "rounds", "kind": "iterative_prune", "rounds": 1, "fraction": 0.5,
                               "retrain": {k: v for k, v in finetune.items() if k not in ("name", "kind")}}
    path = write_recipe(recipe)
    code, _, err = nnopt("validate", path)
    assert code == 2
    flat = " ".join(err.split())
    assert message in flat and f"{path.name}:" in flat
    if teacher == "trian":
        assert "did you mean `train`" in flat


# ---- a teacher given as a model spec with its weights --------------------------------------------------------


def test_a_teacher_given_as_a_model_with_weights_teaches_as_the_stage_it_came_from(nnopt, write_recipe, tmp_path,
                                                                                   straight):
    """The straight run's trained model, given by its stage folder instead of the stage's name: the same teacher,
    so the distilled student comes out bit for bit the same."""
    from runner.plan import fingerprints
    from runner.recipe import load_recipe

    recipe = _distilled_recipe()
    teacher = {**recipe["model"], "weights": str(straight / "01-train")}
    recipe["stages"][2]["distillation"]["teacher"] = teacher
    path = write_recipe(recipe)
    code, _, err = nnopt("run", path, "-O", tmp_path)
    assert code == 0, err
    metrics, cost = _finetune_result(tmp_path / "tiny")
    assert metrics == _finetune_result(straight)[0]
    expected = _weights(straight)
    assert all(torch.equal(_weights(tmp_path / "tiny")[k], expected[k]) for k in expected)
    assert cost["teacher"] == f"mlp ({straight / '01-train'})" and cost["teacher_params"] == 32 * 32 + 32 + 32 * 10 + 10

    # the teacher's weights enter the fingerprint of the stage it teaches, and of no earlier stage
    recipe["stages"][2]["distillation"]["teacher"]["weights"] = str(tmp_path / "teacher.pt")
    path = write_recipe(recipe)
    torch.save(load_model(straight / "01-train").state_dict(), tmp_path / "teacher.pt")
    before = fingerprints(load_recipe(path))
    other = {key: value + 0.01 for key, value in load_model(straight / "01-train").state_dict().items()}
    torch.save(other, tmp_path / "teacher.pt")  # other weights, same path
    after = fingerprints(load_recipe(path))
    assert before[:2] == after[:2] and before[2] != after[2]


def _saved_mlp(folder, name: str, **args) -> str:
    from runner.models import MODELS

    torch.save(MODELS.get("mlp")(**args).state_dict(), folder / name)
    return str(folder / name)


@pytest.mark.parametrize("case, message", [
    ("no weights", "stages[2].distillation.teacher: a teacher model needs `weights:`"),
    ("missing file", "stages[2].distillation.teacher.weights: no such file or folder"),
    ("other sizes", "stages[2].distillation.teacher.weights: the weights do not fit the model: shape mismatch"),
    ("other classes", "stages[2].distillation.teacher.weights: the teacher outputs 3 classes; the student and the data "
                      "have 10 hint: its weights end in 3 outputs: give `weights:` of a teacher trained on these 10 "
                      "classes (with `args.num_classes: 10`)"),
    ("other classes, strict: false", "stages[2].distillation.teacher.args.num_classes: the teacher outputs 3 classes; "
                                     "the student and the data have 10 hint: set `args.num_classes: 10`, with "
                                     "`weights:` that fill that output layer"),
    ("other input", "stages[2].distillation.teacher: the teacher's forward pass fails on a batch of the data's examples"),
])
def test_a_missing_or_incompatible_teacher_model_is_a_located_validate_error(nnopt, write_recipe, tmp_path, case,
                                                                             message):
    recipe = _distilled_recipe()
    architecture = {"hidden": [32], "in_features": 32}
    teacher = {"name": "mlp", "args": architecture, "weights": _saved_mlp(tmp_path, "t.pt", **architecture)}
    if case == "no weights":
        del teacher["weights"]
    elif case == "missing file":
        teacher["weights"] = "nowhere/teacher.pt"
    elif case == "other sizes":
        teacher["weights"] = _saved_mlp(tmp_path, "wide.pt", hidden=[48], in_features=32)
    elif case == "other classes":
        teacher = {"name": "mlp", "args": {**architecture, "num_classes": 3},
                   "weights": _saved_mlp(tmp_path, "three.pt", **architecture, num_classes=3)}
    elif case == "other classes, strict: false":  # a 10-class teacher's weights, but a 3-output head built
        teacher = {"name": "mlp", "args": {**architecture, "num_classes": 3}, "strict": False,
                   "weights": teacher["weights"]}
    else:
        teacher = {"name": "mlp", "args": {"hidden": [32], "in_features": 20},
                   "weights": _saved_mlp(tmp_path, "narrow.pt", hidden=[32], in_features=20)}
    recipe["stages"][2]["distillation"]["teacher"] = teacher
    path = write_recipe(recipe)
    code, _, err = nnopt("validate", path)
    assert code == 2, err
    flat = " ".join(err.split())
    assert message in flat and f"{path.name}:" in flat
