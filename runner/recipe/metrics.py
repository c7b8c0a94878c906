"""The metrics stages write, declared with their meaning and unit: what `expect` may name and the report shows.

Each stage spec class lists its metrics in a `stage_metrics` ClassVar built from the groups below; a name is
an fnmatch pattern, `{split}` stands for the evaluate stage's split, and a nested metric is
`metric.key`. tests/test_architecture.py runs every stage kind and checks that what it writes is declared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    meaning: str
    unit: str = ""


# Latency per batch size: `latency_ms_b{batch}` and its variants, one template for writers and readers.
LATENCY_TEMPLATE = "latency_ms_b{batch}"
_LATENCY_KEY = re.compile(r"^latency_ms_b(\d+)$")


def latency_key(batch: int) -> str:
    return LATENCY_TEMPLATE.format(batch=batch)


def latency_batches(metrics: dict) -> list[int]:
    """The batch sizes whose latency `metrics` holds, ascending."""
    return sorted(int(match.group(1)) for key in metrics if (match := _LATENCY_KEY.match(key)))


FIT = (
    Metric("train_loss", "training objective, mean over the last epoch (penalties included)"),
    Metric("val_loss", "validation loss at the last validation"),
    Metric("val_acc", "validation accuracy at the last validation", "fraction"),
    Metric("epochs", "epochs completed"),
    Metric("steps", "optimizer steps taken"),
    Metric("fit_seconds", "wall time of the fit (the resumed part only, after a resume)", "s"),
    Metric("samples_per_second", "training examples per second of fit time", "1/s"),
    Metric("final_lr", "learning rate at the end of the fit"),
    Metric("lr_found", "learning rate the LR finder chose"),
    Metric("batch_size_found", "batch size the batch-size finder chose"),
    Metric("resumed", "true when the fit continued from a checkpoint"),
    Metric("rank_digests", "state digest per rank after a multi-process fit"),
    Metric("rank_examples", "per epoch of a multi-process fit: examples each rank trained on, examples two ranks "
                            "shared (0: disjoint shards) and distinct examples over all ranks"),
    Metric("gradual_pruning.*", "gradual pruning: sparsity reached, per layer and at each pruning step"),
    Metric("lr_finder.*", "LR finder: steps it ran and steps asked (its curve: lr_finder.json, lr_finder.png)"),
    Metric("kept.*", "keep: best: the epoch whose weights the stage handed on, and its monitored value"),
    Metric("distillation.*", "distillation: the teacher stage, its parameters, the seconds its forward passes "
                             "took and their share of the fit; per rank, the examples it scored and whether it "
                             "stayed in eval mode and frozen"),
)

DROPOUT = (
    Metric("dropout.*", "with `dropout: {adjust: ...}`, per dropout module: its ratio `before` and `after` the "
                        "adjustment (the one its fit trained with), the `layer` it feeds and that layer's `kept` "
                        "fraction of weights"),
)

PARAMETERS = (
    Metric("params_total", "parameters of the model"),
    Metric("params_nonzero", "parameters that are not zero"),
    Metric("sparsity", "fraction of parameters that are zero", "fraction"),
    Metric("compression_rate", "params_total / params_nonzero", "x"),
    Metric("layer_sparsity.*", "fraction of zeros per prunable weight", "fraction"),
    Metric("layer_bits.*", "bits per stored weight, when some layers are integer (int8: 8; float layers: 32)", "bits"),
)

SIZE = (
    Metric("model_bytes", "bytes of the model's serialized state dict", "B"),
    Metric("packed_bytes", "bytes of the compressed artifact of the model", "B"),
    Metric("dense_fp32_bytes", "bytes of the dense fp32 model of the same architecture", "B"),
    Metric("size_ratio", "dense_fp32_bytes / packed_bytes", "x"),
)

LATENCY = (
    Metric("latency_threads", "torch threads while timing"),
    Metric("latency_ms_b*", "median forward time per batch of the given size", "ms"),
    Metric("latency_fp32_ms_b*", "the same for the dense fp32 model, timed in turns with it", "ms"),
    Metric("latency_ratio_b*", "latency / the reference's latency at that batch size", "x"),
    Metric("deploy_latency_ms_b*", "median time on the fastest verified way to run the model", "ms"),
    Metric("deploy_path_b*", "that fastest way (eager, CSR sparse, TorchScript, ...)"),
    Metric("deploy_latency_fp32_ms_b*", "the same for the dense fp32 model", "ms"),
    Metric("deploy_latency_ratio_b*", "deploy latency / the fp32 model's deploy latency", "x"),
)

EVALUATION = (
    Metric("{split}_loss", "cross-entropy on the split"),
    Metric("{split}_acc", "accuracy on the split", "fraction"),
    Metric("{split}_error", "1 - accuracy on the split", "fraction"),
    Metric("{split}_examples", "examples evaluated"),
)

PRUNE_WEIGHTS = (
    Metric("sparsity_before", "sparsity of the pruned weights before this stage", "fraction"),
    Metric("sparsity_after", "sparsity of the pruned weights after it", "fraction"),
    Metric("layer_sparsity_before.*", "per-layer sparsity before", "fraction"),
    Metric("layer_sparsity_after.*", "per-layer sparsity after", "fraction"),
)

PRUNE_NEURONS = (
    Metric("widths_before.*", "output neurons/channels per pruned layer before slimming"),
    Metric("widths_after.*", "output neurons/channels per pruned layer after slimming"),
    Metric("parity_max_abs_diff", "max |slimmed - masked| output difference on the probe batch"),
    Metric("coupled_layers.*", "layers whose output channels went with the root's (added together in a residual)"),
    Metric("params_total_before", "parameters before slimming"),
    Metric("model_bytes_before", "serialized bytes before slimming", "B"),
    Metric("model_bytes", "serialized bytes after slimming", "B"),
    Metric("latency_threads", "torch threads while timing (1: slimming's gain without thread-pool noise)"),
    Metric("latency_ms_b*_before", "latency of the masked (dense-shaped) model", "ms"),
    Metric("latency_ms_b*", "latency of the slimmed model, timed in turns with the masked one", "ms"),
    Metric("latency_ratio_b*", "slimmed latency / masked latency", "x"),
)

SENSITIVITY = (
    Metric("val_acc", "validation accuracy of the unchanged model on the scanned examples", "fraction"),
    Metric("examples", "validation examples each accuracy is measured on"),
    Metric("scan_seconds", "wall time of the scan", "s"),
    Metric("pruned_acc.*", "per layer: {sparsity: accuracy} with that layer alone pruned", "fraction"),
    Metric("shared_acc.*", "per layer: {bits: accuracy} with that layer alone weight-shared", "fraction"),
    Metric("int8_acc.*", "per layer: accuracy with that layer alone in simulated dynamic int8", "fraction"),
)

ALLOCATION = (
    Metric("allocation.*", "what was chosen automatically: the scan used (`sensitivity`), the per-layer values "
                           "(sparsity and pruned count, or bits), predicted (and measured) accuracy drops, and "
                           "`reproduce`, the plain recipe fields that make the same choice"),
)

ITERATIVE = (
    Metric("rounds.*", "per round: sparsity, per-layer sparsity, the retrain's fit metrics and, with "
                       "`retrain.dropout`, its adjusted dropout ratios (as finetune's `dropout`)"),
    Metric("dense.*", "the dense round 0's fit metrics (with rewind or reinit)"),
    Metric("rewind_step", "with rewind: the dense round's optimizer step whose weights (rewind_point.pt) every "
                          "round restarts from (0: the stage's input weights)", "steps"),
)

QUANTIZE = (
    Metric("val_acc_before", "validation accuracy before quantizing", "fraction"),
    Metric("val_acc", "validation accuracy after quantizing", "fraction"),
    Metric("val_acc_drop", "val_acc_before - val_acc", "fraction"),
    Metric("zeros_new", "weights nonzero in the stage's input that are exactly zero once quantized (small "
                        "survivors rounding to 0; they add to the pruned zeros)"),
    Metric("zeros_lost", "weights zero in the stage's input (pruned) that are nonzero once quantized: 0 unless "
                         "quantizing broke the sparsity"),
    Metric("packed_breakdown.*", "where the compressed artifact's bytes go: total, per stream (header, positions, "
                                 "values, tables, biases, codebooks, floats) and per layer (those, kept entries, bits "
                                 "per kept entry, the paper's sparse Huffman form's bytes)", "B"),
)
STATIC_INT8 = (Metric("calibration_examples", "training examples the activation ranges were calibrated on"),)
QAT = (
    Metric("observers_frozen_at_step", "optimizer step the activation ranges were frozen at"),
    Metric("batchnorm_frozen_at_step", "optimizer step the BatchNorm statistics were frozen at"),
)
WEIGHT_SHARING = (
    Metric("layer_bits.*", "codebook bits per layer", "bits"),
    Metric("kmeans_iterations", "k-means iterations per layer"),
    Metric("distinct_values.*", "distinct nonzero weight values per layer after sharing"),
    Metric("finetune_*", "the centroid fine-tune's fit metrics"),
)

EXPORT = (
    Metric("check_examples", "test examples each exported file was checked on"),
    Metric("onnx_bytes", "size of model.onnx", "B"),
    Metric("onnx_max_abs_diff", "max |onnxruntime - PyTorch| output difference"),
    Metric("onnx_tolerance", "the tolerance that difference was held to"),
    Metric("onnx_opset", "ONNX opset"),
    Metric("onnx_argmax_agreement", "fraction of examples where onnxruntime and PyTorch agree on the class", "fraction"),
    Metric("torchscript_bytes", "size of model.ts", "B"),
    Metric("torchscript_max_abs_diff", "max |reloaded TorchScript - PyTorch| output difference"),
)
