"""`quantize`: int8 (dynamic, static with calibration, QAT) or Deep Compression weight sharing."""

from __future__ import annotations

import torch

from runner.compress import int8, sharing
from runner.errors import StageError
from runner.lightning.fit import fit
from runner.lightning.module import ClassifierModule
from runner.lightning.qat import FreezeQuantization
from runner.measure import accuracy, dense_fp32_bytes, serialized_bytes
from runner.modelio import write_packed
from runner.recipe.stages import DynamicInt8, QatInt8, StaticInt8, WeightSharing
from runner.stages import STAGES
from runner.stages.base import StageContext, StageResult

PACKED_FILE = "model.dcz"  # the compressed artifact (Han 2016 §3-4; runner.compress.packed)


def _dynamic(spec: DynamicInt8, model, ctx: StageContext):
    return int8.dynamic_int8(model), {}


def _static(spec: StaticInt8, model, ctx: StageContext):
    data = ctx.data()
    batches = data.train_dataloader()
    if spec.calibration_batches > len(batches):
        raise StageError(spec.name, f"calibration_batches is {spec.calibration_batches} but the training data "
                         f"has only {len(batches)} batches", f"set calibration_batches <= {len(batches)}")
    prepared, groups = int8.prepare(model, qat=False, weights=spec.weights, observer=spec.observer)
    with torch.inference_mode():
        for index, (x, _) in enumerate(batches):
            if index == spec.calibration_batches:
                break
            prepared(x)
    quantized = int8.convert(prepared, data.examples("test", 2)[0])
    return int8.finish_static(quantized, model, method="static_int8", weights=spec.weights, observer=spec.observer,
                              groups=groups), {"calibration_examples": spec.calibration_batches * data.batch_size}


def _qat(spec: QatInt8, model, ctx: StageContext):
    data = ctx.data()
    example = data.examples("test", 2)[0]
    prepared, groups = int8.prepare(model, qat=True, weights=spec.weights)
    int8.convert(prepared, example)  # fail now, before training, if the int8 model cannot run
    freeze = FreezeQuantization(spec.freeze_observers_after, spec.freeze_batchnorm_after)
    module = ClassifierModule(prepared, spec, data.num_classes)
    metrics = fit(spec, module, ctx, callbacks=[freeze])
    metrics.update(observers_frozen_at_step=freeze.observers_frozen_at, batchnorm_frozen_at_step=freeze.batchnorm_frozen_at)
    quantized = int8.convert(module.model, example)
    return int8.finish_static(quantized, model, method="qat", weights=spec.weights, observer="minmax",
                              groups=groups), metrics


def _weight_sharing(spec: WeightSharing, model, ctx: StageContext):
    shared, metrics = sharing.share_weights(model, spec.bits, spec.kmeans_iterations)
    if spec.finetune is not None:
        module = ClassifierModule(shared, spec.finetune, ctx.data().num_classes)
        metrics.update({f"finetune_{k}": v for k, v in fit(spec.finetune, module, ctx).items()})
        shared = module.model
    metrics["distinct_values"] = sharing.distinct_values(shared)
    return shared, metrics


# One implementation per spec class of the quantize union (tests/test_architecture.py checks it is complete).
METHODS = {DynamicInt8: _dynamic, StaticInt8: _static, QatInt8: _qat, WeightSharing: _weight_sharing}


@STAGES.register("quantize")
def run(spec, model, ctx: StageContext) -> StageResult:
    model.eval()
    val = ctx.data().val_dataloader()
    before = accuracy(model, val)
    try:
        quantized, metrics = METHODS[type(spec)](spec, model, ctx)
    except int8.UnsupportedModel as err:
        raise StageError(spec.name, f"{spec.method} cannot quantize this model: {err}",
                         "dynamic_int8 needs no int8 kernel for other layers; static int8 and QAT need every "
                         "operation in int8 (a residual `+` in forward() is not)") from None
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
