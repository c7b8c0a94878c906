"""`quantize`: int8 (dynamic, static with calibration, QAT) or Deep Compression weight sharing."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from runner.compress import int8, sharing
from runner.compress.packed import write_packed
from runner.errors import StageError
from runner.lightning.module import ClassifierModule
from runner.lightning.units import stage_length, to_steps
from runner.measure import accuracy, dense_fp32_bytes, serialized_bytes
from runner.stages import STAGES
from runner.stages.base import StageContext, StageResult
from runner.stages.train import fit

PACKED_FILE = "model.dcz"  # the compressed artifact: sparse offsets, codebook indices, Huffman (Han 2016 §3-4)


class FreezeQuantization(pl.Callback):
    """Fixes the activation ranges, then the BatchNorm statistics, at the configured steps (Jacob et al. 2018 §3).

    Validation never moves the ranges: torch's observers run in eval mode too, so they are paused
    while Lightning validates.
    """

    def __init__(self, observers_after, batchnorm_after):
        self.observers_after, self.batchnorm_after = observers_after, batchnorm_after  # Point specs or None
        self.observers_at: int | None = None  # optimizer steps, resolved once the data is attached
        self.batchnorm_at: int | None = None
        self.observers_frozen_at: int | None = None
        self.batchnorm_frozen_at: int | None = None

    def setup(self, trainer, pl_module, stage):
        steps_per_epoch, total = stage_length(trainer)
        self.observers_at, self.batchnorm_at = (None if point is None else to_steps(point, steps_per_epoch, total)
                                                for point in (self.observers_after, self.batchnorm_after))

    def on_train_start(self, trainer, pl_module):
        # Resuming from a checkpoint: `freeze_bn` is a plain attribute, not in the state dict, so what the
        # restored state says was frozen must be frozen again before training goes on.
        if self.observers_frozen_at is not None:
            int8.freeze_observers(pl_module.model)
        if self.batchnorm_frozen_at is not None:
            int8.freeze_batchnorm(pl_module.model)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        if self.observers_frozen_at is None and self.observers_at is not None and step >= self.observers_at:
            int8.freeze_observers(pl_module.model)
            self.observers_frozen_at = step
        if self.batchnorm_frozen_at is None and self.batchnorm_at is not None and step >= self.batchnorm_at:
            int8.freeze_batchnorm(pl_module.model)
            self.batchnorm_frozen_at = step

    def on_validation_epoch_start(self, trainer, pl_module):
        int8.freeze_observers(pl_module.model)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.observers_frozen_at is None:
            int8.resume_observers(pl_module.model)

    def state_dict(self):
        return {"observers_frozen_at": self.observers_frozen_at, "batchnorm_frozen_at": self.batchnorm_frozen_at}

    def load_state_dict(self, state_dict):
        self.observers_frozen_at = state_dict["observers_frozen_at"]
        self.batchnorm_frozen_at = state_dict["batchnorm_frozen_at"]


def _static(spec, model, ctx: StageContext):
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
    quantized = int8.convert(prepared, data.test[0][:2])
    return int8.finish_static(quantized, model, method="static_int8", weights=spec.weights, observer=spec.observer,
                              groups=groups), {"calibration_examples": spec.calibration_batches * data.batch_size}


def _qat(spec, model, ctx: StageContext):
    data = ctx.data()
    example = data.test[0][:2]
    prepared, groups = int8.prepare(model, qat=True, weights=spec.weights)
    int8.convert(prepared, example)  # fail now, before training, if the int8 model cannot run
    freeze = FreezeQuantization(spec.freeze_observers_after, spec.freeze_batchnorm_after)
    module = ClassifierModule(prepared, spec, data.num_classes)
    metrics = fit(spec, module, ctx, callbacks=[freeze])
    metrics.update(observers_frozen_at_step=freeze.observers_frozen_at, batchnorm_frozen_at_step=freeze.batchnorm_frozen_at)
    quantized = int8.convert(module.model, example)
    return int8.finish_static(quantized, model, method="qat", weights=spec.weights, observer="minmax",
                              groups=groups), metrics


def _weight_sharing(spec, model, ctx: StageContext):
    shared, metrics = sharing.share_weights(model, spec.bits, spec.kmeans_iterations)
    if spec.finetune is not None:
        module = ClassifierModule(shared, spec.finetune, ctx.data().num_classes)
        metrics.update({f"finetune_{k}": v for k, v in fit(spec.finetune, module, ctx).items()})
        shared = module.model
    metrics["distinct_values"] = sharing.distinct_values(shared)
    return shared, metrics


@STAGES.register("quantize")
def run(spec, model, ctx: StageContext) -> StageResult:
    model.eval()
    val = ctx.data().val_dataloader()
    before = accuracy(model, val)
    try:
        if spec.method == "dynamic_int8":
            quantized, metrics = int8.dynamic_int8(model), {}
        elif spec.method == "static_int8":
            quantized, metrics = _static(spec, model, ctx)
        elif spec.method == "qat":
            quantized, metrics = _qat(spec, model, ctx)
        else:
            quantized, metrics = _weight_sharing(spec, model, ctx)
    except int8.UnsupportedModel as err:
        raise StageError(spec.name, f"{spec.method} cannot quantize this model: {err}",
                         "dynamic_int8 needs no int8 kernel for other layers; static int8 and QAT need every "
                         "operation in int8 (a residual `+` in forward() is not)") from None
    after = accuracy(quantized.eval(), val)
    model_spec = ctx.recipe.model.model_dump(mode="json", by_alias=True, exclude_none=True)
    packed_bytes = write_packed(quantized, model_spec, ctx.stage_dir / PACKED_FILE)
    dense = dense_fp32_bytes(ctx.recipe.model)
    metrics.update(
        val_acc_before=before["acc"], val_acc=after["acc"], val_acc_drop=round(before["acc"] - after["acc"], 6),
        model_bytes=serialized_bytes(quantized), packed_bytes=packed_bytes, dense_fp32_bytes=dense,
        size_ratio=round(dense / packed_bytes, 3),
    )
    return StageResult(quantized, metrics)
