"""The terminal summary: fits 100 columns, full stage names, readable numbers, columns from what was measured."""

from __future__ import annotations

from rich.console import Console

from runner.outcome import StageOutcome
from runner.summary import summary_table

EVALUATED = {"test_loss": 0.06, "test_acc": 0.9823, "test_error": 0.0177, "params_total": 266610,
             "params_nonzero": 21706, "sparsity": 0.9186, "model_bytes": 281191, "packed_bytes": 41695,
             "latency_ms_b1": 0.0871, "latency_ms_b256": 0.84, "samples_per_second": 41308.2}


def _render(outcomes) -> list[str]:
    console = Console(width=160, record=True, file=open("/dev/null", "w"))
    console.print(summary_table("prune_then_quant", outcomes))
    return console.export_text().rstrip("\n").splitlines()


def test_a_long_pipeline_fits_100_columns_with_full_names_and_readable_numbers():
    outcomes = [
        StageOutcome("train_dense", "train", "ran", "f", "x", 254.3,
                     {"val_acc": 0.9832, "samples_per_second": 41308.2, "train_loss": 0.01}),
        StageOutcome("prune", "prune", "reused", "f", "x", 0.0, {"sparsity": 0.92, "params_nonzero": 21706}),
        StageOutcome("quantize", "quantize", "ran", "f", "x", 4.3, {"val_acc": 0.9807, "model_bytes": 281191,
                                                                    "packed_bytes": 41695}),
        StageOutcome("evaluate", "evaluate", "ran", "f", "x", 1.5, EVALUATED),
    ]
    lines = _render(outcomes)
    assert max(map(len, lines)) <= 100, "\n".join(lines)
    text = "\n".join(lines)
    assert "train_dense" in text and "(4 stages)" in text
    assert "1.77%" in text and "98.32%" in text and "21.7k" in text and "41.7 kB" in text and "4.3 s" in text
    assert "test acc" not in text  # test_error says it; the two never share a row as `test_...`
    assert "1.102e+04" not in text and "0.0177" not in text


def test_columns_follow_what_was_measured():
    lines = _render([StageOutcome("train", "train", "ran", "f", "x", 2.0, {"val_acc": 0.5, "test_acc": 0.4})])
    header = lines[2]
    assert "test acc" in header and "val acc" in header  # no test_error measured: test_acc shown
    assert "sparsity" not in header and "packed" not in header
    assert "(1 stage)" in lines[0]


def test_seed_reports_lead_with_expect_then_varying_metrics():
    from types import SimpleNamespace

    from runner.report import seed_order, seeds_table

    means = {"evaluate.params_total": 266610.0, "train.epochs": 10.0, "train.val_acc": 0.981, "test_error": 0.0177,
             "evaluate.test_acc": 0.9823}
    spread = {"evaluate.params_total": 0.0, "train.epochs": 0.0, "train.val_acc": 0.0011, "test_error": 0.0009,
              "evaluate.test_acc": 0.0009}
    expect = SimpleNamespace(metrics={"test_error": object()})
    assert seed_order(means, spread, expect) == ["test_error", "train.val_acc", "evaluate.test_acc",
                                                 "evaluate.params_total", "train.epochs"]
    console = Console(width=160, record=True, file=open("/dev/null", "w"))
    console.print(seeds_table("r", [0, 1], means, spread, expect))
    rows = [line.split()[1] for line in console.export_text().splitlines() if line.startswith("│")]
    assert rows[:3] == ["test_error", "train.val_acc", "evaluate.test_acc"]
