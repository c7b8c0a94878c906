"""What a training stage is made of: optimizer, learning-rate schedule, loss, regularization."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from runner.recipe.base import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, Sparsity, Spec, StageName, tag_values
from runner.recipe.model import TeacherModel

# ---- optimizers -------------------------------------------------------------------------------


class SGD(Spec):
    name: Literal["sgd"]
    lr: PositiveFloat
    # foreach: torch multi-tensor ops, bit for bit torch's default; fused: one kernel per step,
    # faster still but rounds differently (CPU and CUDA only)
    implementation: Literal["foreach", "fused"] = "foreach"
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    dampening: Annotated[float, Field(ge=0, le=1)] = 0.0
    nesterov: bool = False
    weight_decay: NonNegativeFloat = 0.0

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self):
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0")
        return self


class Adam(Spec):
    name: Literal["adam"]
    lr: PositiveFloat
    # foreach: torch multi-tensor ops, bit for bit torch's default; fused: one kernel per step,
    # faster still but rounds differently (CPU and CUDA only)
    implementation: Literal["foreach", "fused"] = "foreach"
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 0.0
    amsgrad: bool = False


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), hence a nonzero default."""

    name: Literal["adamw"]
    weight_decay: NonNegativeFloat = 0.01


class RMSprop(Spec):
    name: Literal["rmsprop"]
    lr: PositiveFloat
    alpha: Fraction = 0.99
    eps: PositiveFloat = 1e-8
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0
    centered: bool = False
    weight_decay: NonNegativeFloat = 0.0


Optimizer = Annotated[Union[SGD, Adam, AdamW, RMSprop], Field(discriminator="name")]
OPTIMIZER_NAMES = tag_values(Optimizer, "name")

# ---- learning-rate schedules (milestones in epochs; fractional epochs allowed) -----------------


class Constant(Spec):
    name: Literal["constant"]


class StepDecay(Spec):
    """lr * gamma every `every_epochs` epochs."""

    name: Literal["step"]
    every_epochs: PositiveFloat
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1


class MultiStep(Spec):
    """lr * gamma at each milestone epoch."""

    name: Literal["multistep"]
    milestones: Annotated[list[PositiveFloat], Field(min_length=1)]
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1

    @model_validator(mode="after")
    def _increasing(self):
        if list(self.milestones) != sorted(set(self.milestones)):
            raise ValueError("milestones must be strictly increasing")
        return self


class Exponential(Spec):
    """lr * gamma ** epoch, applied smoothly per step."""

    name: Literal["exponential"]
    gamma: Annotated[float, Field(gt=0, le=1)]


class Cosine(Spec):
    """Cosine annealing from lr to min_lr over the stage (after warmup)."""

    name: Literal["cosine"]
    min_lr: NonNegativeFloat = 0.0


class Linear(Spec):
    """Linear decay from lr to min_lr over the stage (after warmup)."""

    name: Literal["linear"]
    min_lr: NonNegativeFloat = 0.0


class OneCycle(Spec):
    """Smith & Topin 2017 1cycle, with momentum cycled inversely (torch OneCycleLR)."""

    name: Literal["onecycle"]
    max_lr: PositiveFloat
    pct_start: Annotated[float, Field(gt=0, lt=1)] = 0.3
    div_factor: PositiveFloat = 25.0
    final_div_factor: PositiveFloat = 1e4
    anneal: Literal["cos", "linear"] = "cos"
    cycle_momentum: bool = True
    base_momentum: Fraction = 0.85
    max_momentum: Fraction = 0.95


class ReduceOnPlateau(Spec):
    """Divide lr by 1/factor when the monitored validation metric stops improving."""

    name: Literal["reduce_on_plateau"]
    monitor: Literal["val_loss", "val_acc"] = "val_loss"
    factor: Annotated[float, Field(gt=0, lt=1)] = 0.1
    patience: Annotated[int, Field(ge=0)] = 10
    threshold: NonNegativeFloat = 1e-4
    min_lr: NonNegativeFloat = 0.0


class Piecewise(Spec):
    """An epoch -> lr table: values[0] until boundaries[0], values[1] until boundaries[1], ..."""

    name: Literal["piecewise"]
    boundaries: Annotated[list[PositiveFloat], Field(min_length=1)]
    values: Annotated[list[PositiveFloat], Field(min_length=2)]

    @model_validator(mode="after")
    def _shape(self):
        if list(self.boundaries) != sorted(set(self.boundaries)):
            raise ValueError("boundaries must be strictly increasing")
        if len(self.values) != len(self.boundaries) + 1:
            raise ValueError(
                f"need one more value than boundaries: {len(self.boundaries)} boundaries, {len(self.values)} values"
            )
        return self


class Inv(Spec):
    """Caffe's `inv` policy: lr * (1 + gamma * iteration) ** -power."""

    name: Literal["inv"]
    gamma: PositiveFloat = 1e-4
    power: PositiveFloat = 0.75


Schedule = Annotated[
    Union[Constant, StepDecay, MultiStep, Exponential, Cosine, Linear, OneCycle, ReduceOnPlateau, Piecewise, Inv],
    Field(discriminator="name"),
]
SCHEDULE_NAMES = tag_values(Schedule, "name")


class Point(Spec):
    """A moment inside a training stage: after this many epochs (fractions allowed) or optimizer steps."""

    epochs: PositiveFloat | None = None
    steps: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_unit(self):
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("give exactly one of `epochs` or `steps`")
        return self


class Warmup(Point):
    """Linear warmup from start_factor * lr to lr, then the schedule runs over the rest of the stage."""

    start_factor: Annotated[float, Field(gt=0, le=1)] = 0.01


# ---- loss and regularization ------------------------------------------------------------------


class CrossEntropy(Spec):
    name: Literal["cross_entropy"]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0


class MSE(Spec):
    """Mean squared error between the softmax output and one-hot targets."""

    name: Literal["mse"]


Loss = Annotated[Union[CrossEntropy, MSE], Field(discriminator="name")]


class Distillation(Spec):
    """Knowledge distillation (Hinton et al. 2015 §2): the training loss becomes
    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * the stage's `loss`;
    the T^2 keeps the soft term's gradients on the scale of the hard one's as T changes. The teacher is
    an earlier stage's finished model, or a model spec with its trained `weights:`; it runs in eval mode,
    without gradients, on the same batches."""

    # an earlier stage's name, or a model: {torchvision: resnet18, weights: teacher.pt} (any `model:` form)
    teacher: Annotated[Union[Annotated[StageName, Tag("teacher stage")], Annotated[TeacherModel, Tag("teacher model")]],
                       Discriminator(lambda value: "teacher stage" if isinstance(value, str) else "teacher model")]
    temperature: PositiveFloat = 4.0
    alpha: Fraction = 0.9  # weight of the distillation term; 1 - alpha weighs the labels' loss


class DropoutAdjustment(Spec):
    """Han et al. 2015 §3.2: a pruned network retrains with less dropout, since pruning already cut its capacity.
    `sqrt_kept`: each dropout module's ratio becomes D_o * sqrt(C_r / C_o), C_r / C_o the kept fraction of the weights
    of the one Linear or Conv layer its output feeds (found in the model's torch.fx graph, through activations,
    pooling, normalization and reshapes), measured on the model as the fit receives it (each round's, in
    iterative_prune); D_o is the ratio the model has then. The adjusted ratios hold for this fit only: the model
    handed on keeps its original ratios, as one rebuilt from the recipe would (a ratio is not stored with the
    weights), and a later stage that sets this computes its own. The stage's metrics give each dropout's ratio
    before and after, the layer and its kept fraction (`dropout`; per round in iterative_prune). A model without
    dropout modules, or with one that feeds no single such layer, is a validate error."""

    adjust: Literal["sqrt_kept"]  # D_r = D_o * sqrt(kept), the paper's rule


class Regularization(Spec):
    """An explicit penalty added to the loss: l1 * sum|w| + l2 * sum(w^2) over matching parameters.

    `params` are glob patterns over parameter names (`fc1.weight`, `*.weight`); each pattern
    must match at least one parameter. Keras's `kernel_regularizer=l1(0.01)` on a layer named
    fc1 is `{l1: 0.01, params: [fc1.weight]}`.
    """

    l1: NonNegativeFloat = 0.0
    l2: NonNegativeFloat = 0.0
    params: Annotated[list[str], Field(min_length=1)] = ["*.weight"]

    @model_validator(mode="after")
    def _some_term(self):
        if self.l1 == 0 and self.l2 == 0:
            raise ValueError("set `l1` or `l2` above 0 (or remove the entry)")
        return self


class EarlyStopping(Spec):
    monitor: Literal["val_loss", "val_acc"] = "val_loss"
    patience: Annotated[int, Field(ge=1)] = 3
    min_delta: NonNegativeFloat = 0.0


class LRFinder(Spec):
    """Lightning's learning-rate range test; its suggestion replaces the optimizer's lr."""

    min_lr: PositiveFloat = 1e-6
    max_lr: PositiveFloat = 1.0
    num_steps: Annotated[int, Field(ge=10)] = 100


class BatchSizeFinder(Spec):
    """Lightning's batch-size scaler: the largest batch that fits, grown by `power` or `binsearch`."""

    mode: Literal["power", "binsearch"] = "power"
    max_trials: Annotated[int, Field(ge=1)] = 6
    steps_per_trial: Annotated[int, Field(ge=1)] = 3


# ---- per-stage trainer settings ----------------------------------------------------------------

# 64-true is left out: Lightning leaves the model in float64 after fit and every later stage feeds it float32.
Precision = Literal["32-true", "bf16-mixed", "16-mixed"]


class TrainerOverride(Spec):
    """Trainer settings one training stage may change; the process layout (devices, strategy) is run-wide."""

    precision: Precision | None = None
    accumulate_grad_batches: PositiveInt | None = None
    sync_batchnorm: bool | None = None
    compile: bool | None = None


# ---- gradual pruning inside a training stage -------------------------------------------------


class Moment(Spec):
    """A point (or an interval) in a training stage: `{epochs: 1.5}`, `{steps: 200}` or `{fraction: 0.5}`
    of the stage; resolved to optimizer steps once the data length is known."""

    epochs: NonNegativeFloat | None = None
    steps: Annotated[int, Field(ge=0)] | None = None
    fraction: Fraction | None = None

    @model_validator(mode="after")
    def _one_unit(self):
        if sum(v is not None for v in (self.epochs, self.steps, self.fraction)) != 1:
            raise ValueError("give exactly one of `epochs`, `steps` or `fraction`")
        return self


class GradualPruning(Spec):
    """Zhu & Gupta 2017 automated gradual pruning: from `initial_sparsity` at `start` to `sparsity` at
    `end`, pruning every `every`, with s_t = s_f + (s_i - s_f)(1 - (t - t0)/(end - t0))^3."""

    sparsity: Sparsity  # the final target: one value, or {module pattern: value} per layer
    initial_sparsity: Annotated[float, Field(ge=0, lt=1)] = 0.0
    start: Moment = Moment(fraction=0.0)
    end: Moment
    every: Moment
    method: Literal["magnitude", "random"] = "magnitude"
    scope: Literal["layer", "global"] = "layer"
    params: Annotated[list[str], Field(min_length=1)] | None = None  # default: Linear and Conv weights
    allow_empty_layers: bool = False  # true: a layer may lose every weight (the network is then cut)

    @model_validator(mode="after")
    def _consistent(self):
        if isinstance(self.sparsity, dict) and self.scope == "global":
            raise ValueError("per-layer `sparsity` targets need `scope: layer`")
        finals = self.sparsity.values() if isinstance(self.sparsity, dict) else [self.sparsity]
        if any(final < self.initial_sparsity for final in finals):
            raise ValueError("`sparsity` (the final target) must be at least `initial_sparsity`")
        if self.every.fraction == 0 or self.every.steps == 0 or self.every.epochs == 0:
            raise ValueError("`every` must be a positive interval")
        return self
