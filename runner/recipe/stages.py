"""Stage specs: one class per `kind`, joined into a discriminated union."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, model_validator

import runner.recipe.metrics as declared
import runner.recipe.states as states
from runner.recipe.base import Fraction, PositiveFloat, PositiveInt, Sparsity, Spec, StageName, tag_values
from runner.recipe.tracking import Keep
from runner.recipe.training import (
    Point,
    BatchSizeFinder,
    Constant,
    CrossEntropy,
    Distillation,
    DropoutAdjustment,
    EarlyStopping,
    GradualPruning,
    Moment,
    Loss,
    LRFinder,
    Optimizer,
    Regularization,
    Schedule,
    TrainerOverride,
    Warmup,
)


class Training(Spec):
    """What every training stage shares: duration, optimizer, schedule, loss, regularization."""

    epochs: PositiveInt | None = None
    steps: PositiveInt | None = None
    optimizer: Optimizer
    schedule: Schedule = Constant(name="constant")
    warmup: Warmup | None = None
    loss: Loss = CrossEntropy(name="cross_entropy")
    regularization: list[Regularization] = []
    gradient_clip: PositiveFloat | None = None
    gradient_clip_algorithm: Literal["norm", "value"] = "norm"
    early_stopping: EarlyStopping | None = None
    lr_finder: LRFinder | None = None
    batch_size_finder: BatchSizeFinder | None = None
    val_every_epochs: PositiveInt = 1
    allow_chance_accuracy: bool = False  # true: a fit may end at chance accuracy without failing (a control run)
    trainer: TrainerOverride | None = None
    gradual_pruning: GradualPruning | None = None
    distillation: Distillation | None = None
    keep: Keep = Keep()  # the weights handed on: `last` epoch, or `best` (with monitor, mode)

    runs_on_every_rank: ClassVar[bool] = True  # it trains: under DDP every rank runs it
    stage_metrics: ClassVar[tuple[declared.Metric, ...]] = declared.FIT
    model_accepts: ClassVar[frozenset[str]] = states.WEIGHTS_CHANGE

    @model_validator(mode="after")
    def _duration(self):
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of `epochs` or `steps`")
        if self.warmup is not None and self.schedule.name in ("onecycle", "reduce_on_plateau"):
            raise ValueError(f"`warmup` cannot be combined with the `{self.schedule.name}` schedule"
                             + (" (1cycle has its own warmup: pct_start)" if self.schedule.name == "onecycle" else ""))
        return self


class TrainStage(Training):
    """Train the model with Lightning: optimizer, schedule, loss, regularization."""

    name: StageName
    kind: Literal["train"]


class Retraining(Training):
    """Training of a model that pruning thinned: the same settings, and its dropout ratios may follow the pruning."""

    dropout: DropoutAdjustment | None = None  # {adjust: sqrt_kept}: Han et al. 2015 §3.2's ratios for this fit


class FinetuneStage(Retraining):
    """Train on from the previous stage's weights keeping its pruning masks: pruned weights stay exactly 0."""

    name: StageName
    kind: Literal["finetune"]
    stage_metrics: ClassVar[tuple[declared.Metric, ...]] = declared.FIT + declared.PARAMETERS + declared.DROPOUT


Level = Annotated[float, Field(gt=0, lt=1)]
Bits = Annotated[int, Field(ge=1, le=8)]


class PruneScan(Spec):
    """A sensitivity scan of pruning: each layer alone pruned by magnitude to each level, no retraining."""

    sparsities: Annotated[list[Level], Field(min_length=1)] = [0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99]
    examples: PositiveInt = 2000  # validation examples the accuracies are measured on (the first ones)
    batch_size: PositiveInt = 1000  # examples per forward pass


class SensitivityStage(PruneScan):
    """Per-layer sensitivity: validation accuracy with one layer alone pruned to each sparsity, its weights
    shared with each codebook width, and in (simulated dynamic) int8; everything else unchanged and nothing
    retrained. Writes sensitivity.json and sensitivity.png and hands the model on unchanged."""

    name: StageName
    kind: Literal["sensitivity"]
    bits: list[Bits] = [1, 2, 3, 4, 5, 6, 8]  # weight-sharing codebook widths (Han 2016 §3)
    int8: bool = True
    kmeans_iterations: PositiveInt = 20
    params: Annotated[list[str], Field(min_length=1)] | None = None  # default: Linear and Conv weights
    stage_metrics: ClassVar[tuple[declared.Metric, ...]] = declared.SENSITIVITY
    model_accepts: ClassVar[frozenset[str]] = states.WEIGHTS_CHANGE  # it prunes and shares float weights


class Allocation(Spec):
    """How `scope: auto` chooses each layer's sparsity: the levels reaching the global target exactly with the
    least accuracy loss that the sensitivity curves predict, each within its bounds."""

    sensitivity: StageName | None = None  # an earlier `sensitivity` stage whose scan to use; none: scan here
    scan: PruneScan = PruneScan()  # the scan made here when `sensitivity` is not given
    bounds: dict[str, tuple[Fraction, Level]] = {}  # {layer pattern: [min, max] sparsity}; later patterns win
    keep_params: PositiveInt | None = None  # instead of `sparsity`: exactly this many weights of the pruned layers stay
    keep_bytes: PositiveInt | None = None  # instead of `sparsity`: the kept weights' fp32 values fit this (4 bytes each)

    @property
    def keeps(self) -> bool:
        return self.keep_params is not None or self.keep_bytes is not None

    @model_validator(mode="after")
    def _consistent(self):
        if self.keep_params is not None and self.keep_bytes is not None:
            raise ValueError("give one budget: `keep_params` or `keep_bytes`")
        if self.sensitivity is not None and "scan" in self.model_fields_set:
            raise ValueError("`scan` sets the scan made here; with `sensitivity` the named stage's scan is used")
        for pattern, (low, high) in self.bounds.items():
            if low > high:
                raise ValueError(f"bounds of `{pattern}`: the minimum {low} is above the maximum {high}")
        return self


class PruneStage(Spec):
    """One-shot pruning between stages.

    `granularity: weights` masks single weights (unstructured; the masks travel with the model);
    `neurons` removes whole Linear output neurons / Conv output channels and physically slims the
    model (the following layers and BatchNorm shrink with them). `scope: auto` chooses per-layer
    sparsities for one global target from a sensitivity scan (`allocation`).
    """

    name: StageName
    kind: Literal["prune"]
    granularity: Literal["weights", "neurons"] = "weights"
    method: Literal["magnitude", "random"] = "magnitude"
    norm: Literal["l1", "l2"] | None = None  # how neurons are ranked by magnitude (default l1)
    scope: Literal["layer", "global", "auto"] = "layer"
    # one target, or {module pattern: target}; later patterns override earlier ones. Required, except with
    # `scope: auto` and a budget in `allocation` (keep_params or keep_bytes) instead
    sparsity: Sparsity | None = None
    params: Annotated[list[str], Field(min_length=1)] | None = None  # default: Linear and Conv weights
    parity_tolerance: PositiveFloat = 1e-4  # neurons: max |slimmed - masked| output difference allowed
    allow_empty_layers: bool = False  # true: a layer may lose every weight (the network is then cut; meant for studies)
    allocation: Allocation | None = None  # scope auto: where the scan comes from, per-layer bounds
    model_accepts: ClassVar[frozenset[str]] = states.WEIGHTS_CHANGE

    def declared_metrics(self) -> tuple[declared.Metric, ...]:
        if self.granularity == "neurons":
            return declared.PRUNE_NEURONS + declared.PARAMETERS
        auto = declared.ALLOCATION if self.scope == "auto" else ()
        return declared.PRUNE_WEIGHTS + auto + declared.PARAMETERS

    @property
    def allocation_settings(self) -> Allocation:
        return self.allocation if self.allocation is not None else Allocation()

    @model_validator(mode="after")
    def _consistent(self):
        budget = self.allocation is not None and self.allocation.keeps
        if self.sparsity is None and not budget:
            raise ValueError("give `sparsity`" + (" (or, with `scope: auto`, `allocation.keep_params` or `keep_bytes`)"
                                                  if self.scope == "auto" else ""))
        if self.sparsity is not None and budget:
            raise ValueError("give one target: `sparsity`, or `allocation.keep_params` / `keep_bytes`")
        if isinstance(self.sparsity, dict) and self.scope != "layer":
            raise ValueError(f"per-layer `sparsity` targets need `scope: layer` ({self.scope} takes one target for "
                             "all layers)")
        if self.allocation is not None and self.scope != "auto":
            raise ValueError("`allocation` says how `scope: auto` chooses per-layer sparsities: set `scope: auto` or "
                             "drop `allocation`")
        if self.scope == "auto" and (self.granularity != "weights" or self.method != "magnitude"):
            raise ValueError("`scope: auto` allocates magnitude pruning of weights (the scan prunes by magnitude)")
        if self.granularity == "weights" and self.norm is not None:
            raise ValueError("`norm` ranks neurons; unstructured pruning ranks weights by |w|")
        if self.granularity == "neurons":
            if self.scope == "global":
                raise ValueError("neurons are ranked within their layer: use `scope: layer` (norms of layers with "
                                 "different fan-in are not comparable)")
            if self.params is not None:
                raise ValueError("`params` selects parameters for weight pruning; for neurons name the layers in "
                                 "`sparsity` (e.g. {fc1: 0.5, fc2: 0.5})")
        return self


class IterativePruneStage(Spec):
    """Rounds of prune-then-retrain: Han et al. 2015 iterative pruning, and with `rewind` the lottery-ticket
    procedure of Frankle & Carbin 2019 (survivors reset to their initial values θ0, or, after Frankle et
    al. 2020, to their values after an early iteration θk); `reinit` is the random re-initialization control.

    Each round prunes `fraction` of the weights still remaining (per layer, or one global ranking),
    so after k rounds the sparsity is 1 - (1 - fraction)^k. With `rewind` or `reinit`, round 0 first
    trains the incoming weights densely with `retrain`, since the rewind point lies in that run.
    """

    name: StageName
    kind: Literal["iterative_prune"]
    rounds: PositiveInt
    fraction: Sparsity  # of the remaining weights, per round: one value, or {module pattern: value}
    method: Literal["magnitude", "random"] = "magnitude"
    scope: Literal["layer", "global"] = "layer"
    params: Annotated[list[str], Field(min_length=1)] | None = None  # default: Linear and Conv weights
    retrain: Retraining
    rewind_lr: bool = True  # each round restarts retrain's schedule; false: continue at the last round's final lr
    rewind: Literal["init"] | Moment | None = None  # θ0, or θk at a point of the dense round 0
    reinit: bool = False  # survivors get a fresh random initialization instead (the control)
    allow_empty_layers: bool = False  # true: rounds may leave a layer without weights (the network is then cut)

    runs_on_every_rank: ClassVar[bool] = True  # it trains: under DDP every rank runs it
    stage_metrics: ClassVar[tuple[declared.Metric, ...]] = declared.ITERATIVE + declared.PARAMETERS
    model_accepts: ClassVar[frozenset[str]] = states.WEIGHTS_CHANGE

    @model_validator(mode="after")
    def _consistent(self):
        if isinstance(self.fraction, dict) and self.scope == "global":
            raise ValueError("per-layer `fraction` targets need `scope: layer`")
        if self.rewind is not None and self.reinit:
            raise ValueError("`rewind` resets survivors to their trained-from values, `reinit` to fresh random ones: "
                             "choose one")
        if self.retrain.gradual_pruning is not None:
            raise ValueError("`retrain` cannot prune gradually: the rounds do the pruning")
        return self


class EvaluateStage(Spec):
    """Measure the model: test loss/accuracy, parameter counts, sparsity, size, latency."""

    name: StageName
    kind: Literal["evaluate"]
    split: Literal["test", "val"] = "test"
    latency_batch_sizes: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 256]
    latency_repeats: Annotated[int, Field(ge=3)] = 30
    latency_warmup: Annotated[int, Field(ge=0)] = 5
    threads: PositiveInt | None = None  # torch threads during timing; default: as the process has

    def declared_metrics(self) -> tuple[declared.Metric, ...]:
        split = tuple(declared.Metric(m.name.format(split=self.split), m.meaning, m.unit) for m in declared.EVALUATION)
        return split + declared.PARAMETERS + declared.SIZE + declared.LATENCY


class MixedPrecision(Spec):
    """Post-training int8 with some layers left in float: named in `skip`, or chosen under an accuracy-drop
    budget, as accuracy-driven tuners do: everything in int8, then the most sensitive layers back to float
    one by one until the validation accuracy drop is within `max_accuracy_drop`."""

    skip: list[str] = []  # module names of Linear/Conv layers left in float (e.g. [fc3, layer1.0.conv1])
    max_accuracy_drop: Fraction | None = None  # validation accuracy drop allowed against the float model
    sensitivity: StageName | None = None  # order layers by this earlier `sensitivity` stage's int8 scan; none: measure here

    @model_validator(mode="after")
    def _budget(self):
        if self.sensitivity is not None and self.max_accuracy_drop is None:
            raise ValueError("`sensitivity` orders the layers that `max_accuracy_drop` leaves in float: set "
                             "`max_accuracy_drop` or drop `sensitivity`")
        if len(set(self.skip)) != len(self.skip):
            raise ValueError("`skip` names a layer twice")
        return self

    def declared_metrics(self) -> tuple[declared.Metric, ...]:
        return type(self).stage_metrics + (declared.ALLOCATION if self.max_accuracy_drop is not None else ())


class DynamicInt8(MixedPrecision):
    """Post-training dynamic int8: Linear and LSTM weights stored int8, activations quantized per batch."""

    name: StageName
    kind: Literal["quantize"]
    method: Literal["dynamic_int8"]
    stage_metrics: ClassVar[tuple[declared.Metric, ...]] = declared.QUANTIZE + declared.SIZE
    model_accepts: ClassVar[frozenset[str]] = states.WEIGHTS_CHANGE
    model_produces: ClassVar[str | None] = states.INT8_DYNAMIC


class StaticInt8(MixedPrecision):
    """Post-training static int8: activation ranges calibrated on training batches (Jacob et al. 2018)."""

    name: StageName
    kind: Literal["quantize"]
    method: Literal["static_int8"]
    calibration_batches: PositiveInt  # required: static quantization without calibration data is meaningless
    observer: Literal["minmax", "histogram"] = "histogram"  # activation range estimator
    weights: Literal["per_tensor", "per_channel"] = "per_channel"
    stage_metrics: ClassVar[tuple[declared.Metric, ...]] = declared.QUANTIZE + declared.SIZE + declared.STATIC_INT8
    model_accepts: ClassVar[frozenset[str]] = states.WEIGHTS_CHANGE
    model_produces: ClassVar[str | None] = states.INT8_STATIC


class QatInt8(Training):
    """Quantization-aware fine-tuning with fake quantization, then conversion to a real int8 model."""

    name: StageName
    kind: Literal["quantize"]
    method: Literal["qat"]
    weights: Literal["per_tensor", "per_channel"] = "per_channel"
    # The fake-quant observers' ranges are per-process buffers that DDP does not reduce, so the
    # ranks would convert different int8 models: QAT runs on rank 0, in one process.
    runs_on_every_rank: ClassVar[bool] = False
    stage_metrics: ClassVar[tuple[declared.Metric, ...]] = declared.FIT + declared.QUANTIZE + declared.SIZE + declared.QAT
    model_produces: ClassVar[str | None] = states.INT8_STATIC
    freeze_observers_after: Point | None = None  # ranges fixed from here on (Jacob et al. 2018 §3)
    freeze_batchnorm_after: Point | None = None  # BN statistics fixed from here on (folded BN, §3.2)


class BitsAllocation(Spec):
    """Codebook bits per layer chosen automatically: under a bytes budget for the shared layers' values, or an
    accuracy-drop budget, in which case layers are left in float (unshared) until the measured drop is within it."""

    sensitivity: StageName | None = None  # an earlier `sensitivity` stage whose scan to use; none: scan here
    bits: Annotated[list[Bits], Field(min_length=1)] = [2, 3, 4, 5, 6, 8]  # the widths scanned here
    examples: PositiveInt = 2000  # validation examples the scan and the drop are measured on
    max_bytes: PositiveInt | None = None  # nonzero values as codebook indices plus the codebooks, all layers
    max_drop: Fraction | None = None  # validation accuracy drop allowed (0.005: half a point)

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.max_bytes is None) == (self.max_drop is None):
            raise ValueError("give exactly one budget: `max_bytes` or `max_drop`")
        if self.sensitivity is not None and "bits" in self.model_fields_set:
            raise ValueError("`bits` sets the widths scanned here; with `sensitivity` the named stage's scan is used")
        return self


class WeightSharing(Spec):
    """Deep Compression (Han et al. 2016 §3): per-layer k-means codebooks over the nonzero weights."""

    name: StageName
    kind: Literal["quantize"]
    method: Literal["weight_sharing"]
    bits: Bits | dict[str, Bits] | None = None  # one value or {glob: bits}; or `allocation`
    allocation: BitsAllocation | None = None  # per-layer bits chosen under a budget instead of `bits`
    kmeans_iterations: PositiveInt = 50
    finetune: Training | None = None  # centroid fine-tuning (§3.3): a centroid's gradient sums its members'
    # float16: after fine-tuning, every float the artifact stores (codebooks, biases) is rounded to float16 and
    # packed in 2 bytes instead of 4; lossy, so the stage's val_acc is measured after the rounding
    floats: Literal["float32", "float16"] = "float32"
    stage_metrics: ClassVar[tuple[declared.Metric, ...]] = declared.QUANTIZE + declared.SIZE + declared.WEIGHT_SHARING

    def declared_metrics(self) -> tuple[declared.Metric, ...]:
        return type(self).stage_metrics + (declared.ALLOCATION if self.allocation is not None else ())

    @model_validator(mode="after")
    def _bits_or_allocation(self):
        if (self.bits is None) == (self.allocation is None):
            raise ValueError("give `bits` (one width or {pattern: bits}) or `allocation` (bits chosen under a budget)")
        return self
    model_accepts: ClassVar[frozenset[str]] = states.WEIGHTS_CHANGE
    model_produces: ClassVar[str | None] = states.SHARED


QuantizeStage = Annotated[Union[DynamicInt8, StaticInt8, QatInt8, WeightSharing], Field(discriminator="method")]


class ExportStage(Spec):
    """Write ONNX (checked in onnxruntime against PyTorch) and TorchScript files of the model."""

    name: StageName
    kind: Literal["export"]
    formats: Annotated[list[Literal["onnx", "torchscript"]], Field(min_length=1)] = ["onnx", "torchscript"]
    opset: Annotated[int, Field(ge=13, le=21)] = 17
    tolerance: PositiveFloat = 1e-4  # max |onnxruntime - PyTorch| over a test batch; larger fails the stage
    check_examples: PositiveInt = 256
    stage_metrics: ClassVar[tuple[declared.Metric, ...]] = declared.EXPORT

    def accepted_models(self) -> frozenset[str]:
        # ONNX has no operator for torch's dynamic int8 Linear (quantized::linear_dynamic).
        return states.ANY - {states.INT8_DYNAMIC} if "onnx" in self.formats else states.ANY


Stage = Annotated[Union[TrainStage, FinetuneStage, PruneStage, IterativePruneStage, EvaluateStage, QuantizeStage, ExportStage,
                        SensitivityStage],
                  Field(discriminator="kind")]
STAGE_KINDS = tag_values(Stage, "kind")
