"""`evaluate`: test loss and accuracy, parameter counts and sparsity, size on disk, latency."""

from __future__ import annotations

import torch

from runner.compress.packed import encode
from runner.deploy import fastest_path
from runner.measure import (accuracy, dense_fp32_bytes, latency_ms, paired_latency_ms, parameter_stats,
                            serialized_bytes)
from runner.modelio import spec_data
from runner.models import build_model
from runner.transforms import transforms_of
from runner.stages import STAGES
from runner.stages.base import StageContext, StageResult


def _example(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    example = images[:batch_size]
    if len(example) < batch_size:  # a tiny test split: repeat it to the asked batch size
        example = example.repeat((batch_size // len(example) + 1,) + (1,) * (example.dim() - 1))[:batch_size]
    return example


@STAGES.register("evaluate")
def run(spec, model, ctx: StageContext) -> StageResult:
    data = ctx.data()
    batches = data.test_dataloader() if spec.split == "test" else data.val_dataloader()
    scores = accuracy(model, batches)
    metrics = {f"{spec.split}_{key}": value for key, value in scores.items()}
    metrics.update(parameter_stats(model))
    metrics["model_bytes"] = serialized_bytes(model)
    metrics["packed_bytes"] = len(encode(model, spec_data(ctx.model_spec)))  # what the compressed artifact of this model holds
    metrics["dense_fp32_bytes"] = dense_fp32_bytes(ctx.model_spec)
    metrics["size_ratio"] = round(metrics["dense_fp32_bytes"] / metrics["packed_bytes"], 3)

    # An int8 model is timed against the dense fp32 model of the same architecture, in the same run.
    reference = build_model(ctx.model_spec).eval() if any(t["kind"] == "int8" for t in transforms_of(model)) else None
    threads_before = torch.get_num_threads()
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    try:
        images = data.examples("test", max(spec.latency_batch_sizes))[0]
        metrics["latency_threads"] = torch.get_num_threads()
        for batch_size in spec.latency_batch_sizes:
            example = _example(images, batch_size)
            # The fastest verified way to run it (runner.deploy); an int8 model is set against the
            # fp32 model's fastest way, the two taking turns as below.
            path, runnable, metrics[f"deploy_latency_ms_b{batch_size}"] = fastest_path(
                model, example, spec.latency_repeats, spec.latency_warmup)
            metrics[f"deploy_path_b{batch_size}"] = path
            if reference is None:
                metrics[f"latency_ms_b{batch_size}"] = latency_ms(model, example, spec.latency_repeats,
                                                                  spec.latency_warmup)
                continue
            _, fp32_runnable, _ = fastest_path(reference, example, spec.latency_repeats, spec.latency_warmup)
            int8_ms, fp32_ms = paired_latency_ms([runnable, fp32_runnable], example, spec.latency_repeats,
                                                 spec.latency_warmup)
            metrics[f"deploy_latency_ms_b{batch_size}"] = int8_ms
            metrics[f"deploy_latency_fp32_ms_b{batch_size}"] = fp32_ms
            metrics[f"deploy_latency_ratio_b{batch_size}"] = round(int8_ms / fp32_ms, 3)
            int8_ms, fp32_ms = paired_latency_ms([model, reference], example, spec.latency_repeats,
                                                 spec.latency_warmup)
            metrics[f"latency_ms_b{batch_size}"] = int8_ms
            metrics[f"latency_fp32_ms_b{batch_size}"] = fp32_ms
            metrics[f"latency_ratio_b{batch_size}"] = round(int8_ms / fp32_ms, 3)
    finally:
        torch.set_num_threads(threads_before)
    return StageResult(model, metrics)
