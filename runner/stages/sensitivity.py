"""`sensitivity`: per-layer accuracy with one layer alone pruned, weight-shared or in int8 (sensitivity.json, .png)."""

from __future__ import annotations

import time

from runner import pruning, sensitivity
from runner.stages import STAGES
from runner.stages.base import StageContext, StageResult


@STAGES.register("sensitivity")
def run(spec, model, ctx: StageContext) -> StageResult:
    start = time.perf_counter()
    names = pruning.resolve_targets(spec.name, model, 0.0, spec.params)
    x, y = ctx.data().examples("val", spec.examples)
    result = sensitivity.scan(model, x, y, names=list(names), sparsities=spec.sparsities, bits=spec.bits,
                              int8=spec.int8, kmeans_iterations=spec.kmeans_iterations, batch_size=spec.batch_size)
    sensitivity.write(result, ctx.folder)
    sensitivity.plot(result, ctx.folder / sensitivity.PLOT_FILE, spec.name)
    layers = result["layers"]
    metrics = {"val_acc": result["baseline_acc"], "examples": result["examples"],
               "pruned_acc": {name: {str(level): acc for level, acc in entry["pruned"]} for name, entry in layers.items()},
               "shared_acc": {name: {str(bits): acc for bits, acc in entry["shared"]} for name, entry in layers.items()}}
    if spec.int8:
        metrics["int8_acc"] = {name: entry["int8"] for name, entry in layers.items()}
    metrics["scan_seconds"] = round(time.perf_counter() - start, 3)
    return StageResult(model, metrics)
