"""`evaluate`: test loss and accuracy, parameter counts and sparsity, size on disk, latency."""

from __future__ import annotations

import torch

from runner.measure import accuracy, latency_ms, parameter_stats, serialized_bytes
from runner.stages import STAGES
from runner.stages.base import StageContext, StageResult


@STAGES.register("evaluate")
def run(spec, model, ctx: StageContext) -> StageResult:
    data = ctx.data()
    batches = data.test_dataloader() if spec.split == "test" else data.val_dataloader()
    scores = accuracy(model, batches)
    metrics = {f"{spec.split}_{key}": value for key, value in scores.items()}
    metrics.update(parameter_stats(model))
    metrics["model_bytes"] = serialized_bytes(model)

    threads_before = torch.get_num_threads()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    try:
        images = data.test[0]
        metrics["latency_threads"] = torch.get_num_threads()
        for batch_size in spec.latency_batch_sizes:
            example = images[:batch_size]
            if len(example) < batch_size:  # a tiny test split: repeat it to the asked batch size
                example = example.repeat((batch_size // len(example) + 1,) + (1,) * (example.dim() - 1))[:batch_size]
            metrics[f"latency_ms_b{batch_size}"] = latency_ms(model, example, spec.latency_repeats, spec.latency_warmup)
    finally:
        torch.set_num_threads(threads_before)
    return StageResult(model, metrics)
