"""PNG plots for reports: training curves, per-layer sparsity, sweep trade-offs (matplotlib, optional)."""

from __future__ import annotations

import csv
from pathlib import Path

MISSING = "plots skipped: matplotlib is not installed (pip install 'nnopt[plots]')"


def missing_notice() -> str | None:
    """None when plots can be drawn, else the notice to show instead."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return MISSING
    return None


def _figure(width: float, height: float):
    # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def read_csv_log(path: Path) -> dict[str, list[tuple[float, float]]]:
    """Lightning's CSV log as {column: [(step, value), ...]}; each row fills only some columns."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            step = float(row.get("step") or 0)
            for key, value in row.items():
                if key in ("epoch", "step") or value in ("", None):
                    continue
                series.setdefault(key, []).append((step, float(value)))
    return series


def training_curves(log: Path, path: Path, title: str) -> Path | None:
    """Loss (train per step, validation per epoch), validation accuracy, learning rate per step."""
    series = read_csv_log(log)
    # with L1/L2 terms, train_loss is the whole objective; train_data_loss is the part comparable with val_loss
    panels = [("loss", [k for k in ("train_loss", "train_data_loss", "train_penalty", "val_loss") if k in series]),
              ("accuracy", [k for k in ("train_acc", "val_acc") if k in series]),
              ("learning rate", sorted(k for k in series if k.startswith("lr-") and not k.endswith("-momentum")))]
    panels = [(label, keys) for label, keys in panels if keys]
    if not panels:
        return None
    figure = _figure(4.2 * len(panels), 3.2)
    for axes, (label, keys) in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
        for key in keys:
            steps, values = zip(*series[key])
            axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
        axes.set_xlabel("step")
        axes.set_ylabel(label)
        axes.legend()
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    return _save(figure, path)


def layer_bars(values: dict[str, float], path: Path, title: str, ylabel: str) -> Path:
    """One bar per layer (sparsity, bits, ...)."""
    figure = _figure(max(4.0, 0.9 * len(values) + 2), 3.2)
    axes = figure.subplots()
    names = list(values)
    axes.bar(range(len(names)), [values[n] for n in names], color="tab:blue")
    axes.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def tradeoff(points: list[dict], x_keys: list[str], y_key: str, path: Path, title: str) -> Path | None:
    """Accuracy against each of `x_keys` that the points report (weights kept, bytes); one panel each."""
    x_keys = [k for k in x_keys if all(p.get(k) is not None for p in points)]
    if not x_keys or not all(p.get(y_key) is not None for p in points):
        return None
    figure = _figure(4.5 * len(x_keys), 3.4)
    for axes, x_key in zip(figure.subplots(1, len(x_keys), squeeze=False)[0], x_keys):
        ordered = sorted(points, key=lambda p: p[x_key])
        axes.errorbar([p[x_key] for p in ordered], [p[y_key] for p in ordered],
                      yerr=[p.get(f"{y_key}_std") or 0 for p in ordered], marker="o", capsize=3)
        for p in ordered:
            axes.annotate(p["label"], (p[x_key], p[y_key]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if x_key.endswith("bytes"):
            axes.set_xscale("log")
        axes.set_xlabel(x_key)
        axes.set_ylabel(y_key)
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    return _save(figure, path)


def lr_finder_curve(lrs: list[float], losses: list[float], suggestion: float | None, path: Path, title: str) -> Path:
    """The LR range test: smoothed loss against learning rate (log scale), with the rate it suggested."""
    figure = _figure(5.0, 3.4)
    axes = figure.subplots()
    axes.plot(lrs, losses, marker="o" if len(lrs) < 30 else None, markersize=3)
    if suggestion is not None:
        axes.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested {suggestion:.3g}")
        axes.legend()
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss (smoothed)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    return _save(figure, path)


def widths(before: dict[str, int], after: dict[str, int], path: Path, title: str) -> Path:
    """Neurons or channels per layer before and after structured pruning, side by side."""
    figure = _figure(max(4.0, 1.1 * len(before) + 2), 3.2)
    axes = figure.subplots()
    names = list(before)
    positions = range(len(names))
    axes.bar([p - 0.2 for p in positions], [before[n] for n in names], width=0.4, label="before", color="tab:gray")
    axes.bar([p + 0.2 for p in positions], [after.get(n, 0) for n in names], width=0.4, label="after", color="tab:blue")
    axes.set_xticks(list(positions), names, rotation=30, ha="right")
    axes.set_ylabel("neurons / channels")
    axes.set_title(title)
    axes.legend()
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def pipeline_curves(stages: list[tuple[str, Path | None, dict]], path: Path, title: str) -> Path | None:
    """The whole pipeline on one step axis: losses on top; validation accuracy and sparsity (both fractions)
    below, so train -> pruning dip -> fine-tune recovery reads left to right. `stages` holds (name, CSV log
    or None, metrics) in run order; a stage without a log (prune, quantize, ...) sits at a boundary."""
    figure = _figure(9.0, 5.6)
    losses, fractions = figure.subplots(2, 1, sharex=True)
    offset, sparsity, drew, labels = 0.0, [], False, {}
    for name, log, metrics in stages:
        series = read_csv_log(log) if log is not None and log.is_file() else {}
        end = max((step for values in series.values() for step, _ in values), default=0.0)
        for key, axes, colour in (("train_data_loss" if "train_data_loss" in series else "train_loss", losses, "tab:blue"),
                                  ("val_loss", losses, "tab:orange"), ("val_acc", fractions, "tab:green")):
            if key in series:
                steps, values = zip(*series[key])
                axes.plot([offset + s for s in steps], values, color=colour, label=key if not drew else None,
                          marker="o" if len(steps) < 30 else None, markersize=3)
        # Sparsity of the pruned weights (biases and BatchNorm left out), the measure both one-shot and gradual
        # pruning report; the whole model's `sparsity` counts biases too and would make the line jump between them.
        gradual = metrics.get("gradual_pruning") or {}
        for step, reached in gradual.get("pruned_at_steps", {}).items():
            sparsity.append((offset + float(step), reached if isinstance(reached, (int, float)) else None))
        for key in ("sparsity_after",):
            if isinstance(metrics.get(key), (int, float)):
                sparsity.append((offset + end, float(metrics[key])))
        drew = drew or bool(series)
        labels.setdefault(offset, []).append(name)
        offset += end
    for at, names in labels.items():
        for axes in (losses, fractions):
            axes.axvline(at, color="gray", linestyle=":", linewidth=0.8)
        losses.annotate(" / ".join(names), (at, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top",
                        ha="right", fontsize=8, color="gray")
    points = [(step, value) for step, value in sparsity if value is not None]
    if not drew and not points:
        return None
    if points:
        steps, values = zip(*points)
        fractions.step(steps, values, where="post", color="tab:red", label="sparsity (pruned weights)", marker="o",
                       markersize=3)
    losses.set_ylabel("loss")
    fractions.set_ylabel("fraction")
    fractions.set_xlabel("step (all stages, in run order)")
    for axes in (losses, fractions):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="best", fontsize=8)
    figure.suptitle(title)
    return _save(figure, path)
