"""`quantize`: int8 (dynamic, static with calibration, QAT) or Deep Compression weight sharing."""

from __future__ import annotations

import torch

from runner import pruning, sensitivity
from runner.allocation import AllocationError, allocate_bits
from runner.compress import int8, sharing
from runner.errors import StageError
from runner.lightning.fit import fit
from runner.lightning.module import ClassifierModule
from runner.lightning.qat import FreezeQuantization
from runner.measure import accuracy, dense_fp32_bytes, named_tensors, named_weights, serialized_bytes
from runner.modelio import write_packed
from runner.recipe.stages import DynamicInt8, QatInt8, StaticInt8, WeightSharing
from runner.registry import closest_names
from runner.stages import STAGES
from runner.stages.base import StageContext, StageResult

PACKED_FILE = "model.dcz"  # the compressed artifact (Han 2016 §3-4; runner.compress.packed)


def _checked_skip(spec: DynamicInt8 | StaticInt8, model) -> tuple[str, ...]:
    layers = int8.quantizable_layers(model, spec.method)
    unknown = [name for name in spec.skip if name not in layers]
    if unknown:
        raise StageError(spec.name, f"skip: `{unknown[0]}` is no layer of the model that {spec.method} quantizes",
                         closest_names(unknown[0], layers, "layers"))
    return tuple(spec.skip)


def _fallback_order(spec, ctx: StageContext, skip: tuple[str, ...], candidates: list[str], quantize,
                    drop) -> tuple[list[str], dict]:
    """The candidates, the most sensitive to int8 first: by the named scan's accuracy with the layer alone in
    (simulated dynamic) int8, or measured here as the drop left with the layer alone back in float."""
    if spec.sensitivity is None:
        alone = {name: drop(quantize(skip + (name,))[0]) for name in candidates}
        return sorted(candidates, key=lambda name: alone[name]), {"drop_with_alone_in_float": alone}
    scan = sensitivity.read(ctx.artifact(spec.sensitivity))
    int8_acc = {weight.rpartition(".")[0]: entry.get("int8") for weight, entry in scan["layers"].items()}
    missing = [name for name in candidates if int8_acc.get(name) is None]
    if missing:
        raise StageError(spec.name, f"the scan of `{spec.sensitivity}` has no int8 accuracy for {', '.join(missing)}",
                         "scan every Linear and Conv weight with `int8: true`")
    drops = {name: scan["baseline_acc"] - int8_acc[name] for name in candidates}
    return sorted(candidates, key=lambda name: -drops[name]), {"int8_drop_alone": drops}


def _mixed_precision(spec: DynamicInt8 | StaticInt8, model, ctx: StageContext, quantize):
    """`quantize(skip)` -> (int8 model, metrics) with the layers in `skip` left in float. With
    `max_accuracy_drop`, layers go back to float the most sensitive first until the validation accuracy drop
    (the stage's own val_acc_drop) is within it; each step is measured, none predicted."""
    skip = _checked_skip(spec, model)
    quantized, metrics = quantize(skip)
    if spec.max_accuracy_drop is None:
        return quantized, metrics
    val = ctx.data().val_dataloader()
    float_acc = accuracy(model, val)["acc"]

    def drop(candidate) -> float:
        return round(float_acc - accuracy(candidate.eval(), val)["acc"], 6)

    steps = [{"float": list(skip), "drop": drop(quantized)}]
    order, source = [], {}
    if steps[-1]["drop"] > spec.max_accuracy_drop:
        candidates = [name for name in int8.quantizable_layers(model, spec.method) if name not in skip]
        order, source = _fallback_order(spec, ctx, skip, candidates, quantize, drop)
    for name in order:
        skip += (name,)
        quantized, metrics = quantize(skip)
        steps.append({"float": list(skip), "drop": drop(quantized)})
        if steps[-1]["drop"] <= spec.max_accuracy_drop:
            break
    if steps[-1]["drop"] > spec.max_accuracy_drop:
        raise StageError(spec.name, f"with every {spec.method} layer in float the validation accuracy still drops by "
                         f"{steps[-1]['drop']:.4f}, above max_accuracy_drop {spec.max_accuracy_drop:g}",
                         "raise max_accuracy_drop; the drop left comes from the operations around the layers")
    metrics["allocation"] = {"sensitivity": spec.sensitivity or "measured here", **source, "steps": steps,
                             "float_layers": list(skip), "measured_drop": steps[-1]["drop"],
                             "reproduce": "skip: [" + ", ".join(skip) + "]"}
    return quantized, metrics


def _dynamic(spec: DynamicInt8, model, ctx: StageContext):
    return _mixed_precision(spec, model, ctx, lambda skip: (int8.dynamic_int8(model, skip), {}))


def _static(spec: StaticInt8, model, ctx: StageContext):
    data = ctx.data()
    batches = data.train_dataloader()
    if spec.calibration_batches > len(batches):
        raise StageError(spec.name, f"calibration_batches is {spec.calibration_batches} but the training data "
                         f"has only {len(batches)} batches", f"set calibration_batches <= {len(batches)}")
    example = data.examples("test", 2)[0]

    def calibrated(skip: tuple[str, ...]):
        prepared, layout = int8.prepare(model, qat=False, weights=spec.weights, observer=spec.observer,
                                        example=example, skip=skip)
        with torch.inference_mode():
            for index, (x, _) in enumerate(batches):
                if index == spec.calibration_batches:
                    break
                prepared(x)
        quantized = int8.convert(prepared, example, skip)
        return int8.finish_static(quantized, model, method="static_int8", weights=spec.weights,
                                  observer=spec.observer, layout=layout), \
            {"calibration_examples": spec.calibration_batches * data.batch_size}

    return _mixed_precision(spec, model, ctx, calibrated)


def _qat(spec: QatInt8, model, ctx: StageContext):
    data = ctx.data()
    example = data.examples("test", 2)[0]
    prepared, layout = int8.prepare(model, qat=True, weights=spec.weights, example=example)
    int8.convert(prepared, example)  # fail now, before training, if the int8 model cannot run
    freeze = FreezeQuantization(spec.freeze_observers_after, spec.freeze_batchnorm_after)
    module = ClassifierModule(prepared, spec, data.num_classes)
    metrics = fit(spec, module, ctx, callbacks=[freeze])
    metrics.update(observers_frozen_at_step=freeze.observers_frozen_at, batchnorm_frozen_at_step=freeze.batchnorm_frozen_at)
    quantized = int8.convert(module.model, example)
    return int8.finish_static(quantized, model, method="qat", weights=spec.weights, observer="minmax",
                              layout=layout), metrics


def _bits_scan(spec: WeightSharing, model, names: list[str], ctx: StageContext) -> tuple[dict, str]:
    settings = spec.allocation
    if settings.sensitivity is None:
        x, y = ctx.data().examples("val", settings.examples)
        return sensitivity.scan(model, x, y, names=names, sparsities=[], bits=settings.bits, int8=False,
                                kmeans_iterations=spec.kmeans_iterations, batch_size=1000), "scanned here"
    folder = ctx.artifact(settings.sensitivity)
    scan = sensitivity.read(folder)
    missing = [name for name in names if not scan["layers"].get(name, {}).get("shared")]
    if missing:
        raise StageError(spec.name, f"the scan of `{settings.sensitivity}` has no codebook curve for "
                         f"{', '.join(missing)}", "scan every Linear and Conv weight with some `bits`")
    return scan, settings.sensitivity


def _allocate_bits(spec: WeightSharing, model, ctx: StageContext) -> tuple[dict[str, int], dict]:
    """Per-layer bits under the budget; with `max_drop`, layers go back to float, the most sensitive first,
    until the drop measured on the scan's examples is within it (accuracy-driven tuning)."""
    names = pruning.prunable_names(model)
    scan, source = _bits_scan(spec, model, names, ctx)
    settings = spec.allocation
    weights = named_tensors(model)
    nonzeros = {name: int((weights[name] != 0).sum()) for name in names}  # the model's, maybe pruned since the scan
    try:
        chosen = allocate_bits(scan, nonzeros, max_bytes=settings.max_bytes, max_drop=settings.max_drop)
    except AllocationError as err:
        raise StageError(spec.name, err.message, err.hint) from None
    bits = {name: b for name, b in chosen["bits"].items() if b is not None}
    report = {"sensitivity": source, "predicted_drop": chosen["predicted_drop"],
              "predicted_total_drop": chosen["predicted_total_drop"]}
    if settings.max_drop is not None:
        x, y = ctx.data().examples("val", settings.examples)
        baseline = sensitivity.accuracy(model, x, y, 1000)
        while True:
            measured = baseline - sensitivity.accuracy(sharing.share_weights(model, bits, spec.kmeans_iterations)[0],
                                                       x, y, 1000) if bits else 0.0
            if measured <= settings.max_drop or not bits:
                break
            del bits[max(bits, key=lambda name: chosen["predicted_drop"][name])]
        report["measured_drop"] = measured
    report["bits"] = {name: bits.get(name) for name in names}  # None: left in float
    report["reproduce"] = "bits: {" + ", ".join(f"{name}: {b}" for name, b in bits.items()) + "}"
    return bits, report


def _weight_sharing(spec: WeightSharing, model, ctx: StageContext):
    bits, allocation = _allocate_bits(spec, model, ctx) if spec.allocation is not None else (spec.bits, None)
    shared, metrics = sharing.share_weights(model, bits, spec.kmeans_iterations)
    if allocation is not None:
        metrics["allocation"] = allocation
    if spec.finetune is not None:
        module = ClassifierModule(shared, spec.finetune, ctx.data().num_classes)
        metrics.update({f"finetune_{k}": v for k, v in fit(spec.finetune, module, ctx).items()})
        shared = module.model
    if spec.floats == "float16":
        try:
            sharing.round_floats_to_float16(shared)
        except ValueError as err:
            raise StageError(spec.name, f"`floats: float16` cannot hold this model: {err}", "keep `floats: float32`") from None
    metrics["distinct_values"] = sharing.distinct_values(shared)
    return shared, metrics


# One implementation per spec class of the quantize union (tests/test_architecture.py checks it is complete).
METHODS = {DynamicInt8: _dynamic, StaticInt8: _static, QatInt8: _qat, WeightSharing: _weight_sharing}


def _zeros_moved(before: dict[str, torch.Tensor], quantized) -> dict[str, int]:
    """Weights that quantizing zeroed and zeros it lost, counted over the weights both models hold by name
    and shape (a BatchNorm folded into its conv still maps a zero to a zero)."""
    after = named_weights(quantized)
    shared = [name for name in before if name.endswith("weight") and name in after
              and before[name].shape == after[name].shape]
    return {"zeros_new": sum(int(((before[n] != 0) & (after[n] == 0)).sum()) for n in shared),
            "zeros_lost": sum(int(((before[n] == 0) & (after[n] != 0)).sum()) for n in shared)}


@STAGES.register("quantize")
def run(spec, model, ctx: StageContext) -> StageResult:
    model.eval()
    val = ctx.data().val_dataloader()
    before = accuracy(model, val)
    float_weights = {name: weight.clone() for name, weight in named_weights(model).items()}
    try:
        quantized, metrics = METHODS[type(spec)](spec, model, ctx)
        metrics.update(_zeros_moved(float_weights, quantized))
    except int8.UnsupportedModel as err:
        raise StageError(spec.name, f"{spec.method} cannot quantize this model: {err}",
                         "dynamic_int8 needs no int8 kernel for other layers; static int8 and QAT trace the "
                         "model with torch.fx and need an int8 kernel for every Conv and Linear") from None
    after = accuracy(quantized.eval(), val)
    artifact = write_packed(quantized, ctx.model_spec, ctx.folder / PACKED_FILE)
    packed_bytes = len(artifact.data)
    dense = dense_fp32_bytes(ctx.model_spec)
    metrics.update(
        val_acc_before=before["acc"], val_acc=after["acc"], val_acc_drop=round(before["acc"] - after["acc"], 6),
        model_bytes=serialized_bytes(quantized), packed_bytes=packed_bytes, dense_fp32_bytes=dense,
        size_ratio=round(dense / packed_bytes, 3), packed_breakdown=artifact.breakdown,
    )
    return StageResult(quantized, metrics)
