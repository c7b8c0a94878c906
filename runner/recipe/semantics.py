"""What `validate` knows of the pipeline: the model's form through the stages, data and model that fit, schedules
resolved against each stage's length, and `expect` rules some stage can satisfy; errors and warnings, located."""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field

from runner.errors import Issue
import runner.recipe.states as states
from runner.recipe.expect import RUN_METRICS
from runner.recipe.facts_cache import Recorder, model_key, remember, replay, weights_state
from runner.recipe.locate import issue_at
from runner.recipe.source import Source

MAX_STAGE_SEED = 2**32 - 1  # torch/numpy seeds are 32-bit; stage i runs with seed + i
# torch's fused optimizer steps hold the rate as a float32 (at most 3.4e38); far below that, a rate that makes the
# loss diverge is caught when it does, with its own message.
MAX_LR = 1e30


@dataclass
class Findings:
    """Errors stop the recipe; warnings (legal but suspicious settings) are printed and recorded in run.json."""

    source: Source
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)

    def error(self, path: tuple, message: str, hint: str | None = None) -> None:
        self.errors.append(issue_at(self.source, path, message, hint))

    def warn(self, path: tuple, message: str, hint: str | None = None) -> None:
        self.warnings.append(issue_at(self.source, path, message, hint))


# ---- the model's form through the stages ------------------------------------------------------------


def check_order(recipe, found: Findings) -> None:
    """Walk the stages through the forms they accept and produce (runner.recipe.states)."""
    form, made_by = states.FLOAT, None
    for i, stage in enumerate(recipe.stages):
        if form not in stage.accepted_models():
            by = f" (made by stage `{made_by}`)" if made_by else ""
            what = f"{stage.kind}" + (f" {stage.method}" if stage.kind == "quantize" else "")
            if stage.kind == "export":
                found.error(("stages", i, "formats"), f"ONNX export cannot take the {form} model{by}: ONNX has no "
                            "operator for torch's dynamic int8 Linear",
                            "quantize with method static_int8 or qat for an int8 ONNX model, or export only "
                            "`torchscript`")
            else:
                found.error(("stages", i, "kind"), f"`{what}` cannot take the {form} model{by}",
                            states.REFUSAL_HINTS.get(form))
        if (stage.kind == "export" and "onnx" in stage.formats and form == states.INT8_STATIC
                and "tolerance" not in stage.model_fields_set):
            found.error(("stages", i), f"ONNX export of the {form} model{f' (made by stage `{made_by}`)'} keeps the "
                        f"float default tolerance {stage.tolerance:g}, but onnxruntime's int8 kernels round differently "
                        "from PyTorch's, by about one quantization step of the outputs: the check would fail",
                        "set `tolerance` to the difference you accept (a few tenths of a logit is usual for int8)")
        if stage.model_produces is not None:
            form, made_by = stage.model_produces, stage.name


def check_pruning_sequence(recipe, found: Findings) -> None:
    """Magnitude pruning keeps the zeros it finds: a target of 0, or one no higher than the sparsity an earlier
    stage left, removes nothing."""
    sparsity, made_by = 0.0, None
    for i, stage in enumerate(recipe.stages):
        target = stage.sparsity if stage.kind == "prune" and stage.granularity == "weights" else None
        if isinstance(target, float):
            if target == 0:
                found.error(("stages", i, "sparsity"), "sparsity 0 prunes nothing: the stage would change no weight",
                            "set the fraction of weights to remove, or drop the stage")
            elif stage.method == "magnitude" and target <= sparsity:
                found.error(("stages", i, "sparsity"), f"sparsity {target:g} is not above the {sparsity:g} stage "
                            f"`{made_by}` left: magnitude pruning keeps the zeros it finds, so this stage removes "
                            "nothing", f"prune to more than {sparsity:g}, or drop the stage")
        for path, block in training_blocks_of(stage, i):
            gradual = block.gradual_pruning
            if gradual is None or not isinstance(gradual.sparsity, float):
                continue
            if gradual.sparsity == 0:
                found.error(path + ("gradual_pruning", "sparsity"), "gradual pruning to sparsity 0 prunes nothing",
                            "set the final fraction of weights to remove, or drop `gradual_pruning`")
            elif gradual.method == "magnitude" and gradual.sparsity <= sparsity:
                found.error(path + ("gradual_pruning", "sparsity"), f"gradual pruning to {gradual.sparsity:g} is not "
                            f"above the {sparsity:g} stage `{made_by}` left: magnitude pruning keeps the zeros it "
                            "finds, so the schedule removes nothing", f"prune gradually to more than {sparsity:g}")
        if stage.kind == "iterative_prune" and isinstance(stage.fraction, float) and stage.fraction == 0:
            found.error(("stages", i, "fraction"), "fraction 0 prunes nothing in any round",
                        "set the fraction of the remaining weights each round removes")
        reached = _sparsity_after(stage, i)
        if reached is not None:
            sparsity, made_by = reached, stage.name
        elif stage.kind == "prune":  # per-layer targets or removed neurons: the uniform level is unknown
            sparsity, made_by = 0.0, None


# Why a training block inside another stage cannot prune gradually (train and finetune stages can).
NO_GRADUAL = {
    "qat": "QAT trains the fake-quantized copy of the model, whose layers the pruning masks do not reach",
    "weight_sharing": "the centroid fine-tuning keeps each weight in its cluster; the zeros were fixed when the "
                      "codebooks were built",
}


def check_gradual_places(recipe, found: Findings) -> None:
    for i, stage in enumerate(recipe.stages):
        reason = NO_GRADUAL.get(getattr(stage, "method", None))
        for path, block in training_blocks_of(stage, i):
            if reason and block.gradual_pruning is not None:
                found.error(path + ("gradual_pruning",), f"`quantize {stage.method}` cannot prune gradually: {reason}",
                            "prune gradually in a train or finetune stage before quantizing")


def check_repeats(recipe, found: Findings) -> None:
    """A list of things to do, each once: a repeat is a slip (an edit left half done)."""
    for i, stage in enumerate(recipe.stages):
        for name in ("formats", "latency_batch_sizes"):
            values = getattr(stage, name, None) or []
            for k, value in enumerate(values):
                if value in values[:k]:
                    found.error(("stages", i, name, k), f"`{value}` is listed twice in {name}",
                                "list each once")


def check_allocation_range(recipe, found: Findings) -> None:
    """`scope: auto` picks each layer's sparsity among the scanned levels: no mix of them passes the highest."""
    scans = {stage.name: stage.sparsities for stage in recipe.stages if stage.kind == "sensitivity"}
    for i, stage in enumerate(recipe.stages):
        allocation = getattr(stage, "allocation", None)
        if stage.kind != "prune" or allocation is None or not isinstance(stage.sparsity, float):
            continue
        levels = scans.get(allocation.sensitivity) if allocation.sensitivity else allocation.scan.sparsities
        if levels and stage.sparsity > max(levels):
            scanned = (f"stage `{allocation.sensitivity}` scanned" if allocation.sensitivity
                       else "allocation.scan.sparsities holds")
            found.error(("stages", i, "sparsity"), f"scope auto chooses each layer's sparsity among the scanned levels, "
                        f"and {scanned} none above {max(levels):g}: no mix of them reaches {stage.sparsity:g}",
                        f"scan up to at least {stage.sparsity:g}, or lower the target")


def _sparsity_after(stage, index: int) -> float | None:
    """The uniform weight sparsity a stage leaves when its targets are one number."""
    if stage.kind == "prune" and stage.granularity == "weights" and isinstance(stage.sparsity, float):
        return stage.sparsity
    if stage.kind == "iterative_prune" and isinstance(stage.fraction, float):
        return 1 - (1 - stage.fraction) ** stage.rounds
    for _, block in training_blocks_of(stage, index):
        if block.gradual_pruning is not None and isinstance(block.gradual_pruning.sparsity, float):
            return block.gradual_pruning.sparsity
    return None


# ---- what the data is, where the recipe says it ---------------------------------------------------------

# Registered data sets of fixed size: examples in the whole training split and the test split, input shape,
# classes; the validation split is cut from the training split (`val_size`, mnist's fixed 10k).
FIXED_SETS = {
    "mnist": (60_000, 10_000, (1, 28, 28), 10, 10_000),
    "fashion_mnist": (60_000, 10_000, (1, 28, 28), 10, 10_000),
    "kmnist": (60_000, 10_000, (1, 28, 28), 10, 10_000),
    "cifar10": (50_000, 10_000, (3, 32, 32), 10, 5_000),
    "cifar100": (50_000, 10_000, (3, 32, 32), 100, 5_000),
    "svhn": (73_257, 26_032, (3, 32, 32), 10, 5_000),
}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DataFacts:
    """What the recipe tells of its data without reading it; None where it does not say."""

    sizes: dict[str, int]  # examples per split before `limit`
    shape: tuple[int, ...] | None  # one example's input shape (None once transforms may change it)
    num_classes: int | None


def _arguments(factory, args: dict) -> dict:
    """The factory's parameters with their defaults, overridden by the recipe's `args`."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return dict(args)
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty} | dict(args)


def known_data(spec, found: Findings | None = None, scanned=None) -> DataFacts | None:
    """Sizes, shape and classes of a registered data set: from its fixed size, its arguments (synthetic) or the
    file names of its folder (image_folder; `scanned` is the preflight's scan of it, if it ran); the shape as the
    transforms leave it, their failures reported."""
    from runner.data import DATASETS
    from runner.registry import UnknownName

    if spec.name is None:
        return None  # user code: its sizes are known only once it runs
    try:
        arguments = _arguments(DATASETS.get(spec.name), spec.args)
    except UnknownName:
        return None
    example = None  # one example as the data source gives it, for the transforms
    if spec.name in FIXED_SETS:
        train, test, shape, classes, val = FIXED_SETS[spec.name]
        val = arguments.get("val_size") or val
        if arguments.get("train_on") == "train+val":
            sizes = {"train": train, "val": val, "test": test}
        else:
            sizes = {"train": train - val, "val": val, "test": test}
        facts = DataFacts(sizes, shape, classes)
    elif spec.name == "image_folder":
        facts, example = _image_folder_facts(spec, scanned)
        if facts is None:
            return None
    elif {"num_train", "num_val", "num_test"} <= arguments.keys():
        sizes = {split: arguments[f"num_{split}"] for split in SPLITS}
        shape = arguments.get("shape")
        facts = DataFacts(sizes, tuple(shape) if isinstance(shape, (list, tuple)) else None,
                          arguments.get("num_classes"))
    else:
        return None
    if not all(isinstance(n, int) for n in facts.sizes.values()):
        return None
    if facts.shape is not None and not all(isinstance(n, int) and n > 0 for n in facts.shape):
        if found is not None:
            found.error(("data", "args", "shape") if "shape" in spec.args else ("data",),
                        f"the input shape {list(facts.shape)} has a dimension that is not a positive whole number",
                        "every dimension of an example holds at least one value")
        return DataFacts(facts.sizes, None, facts.num_classes)
    if spec.transforms.train or spec.transforms.eval:  # a crop or resize changes the shape the model sees
        if example is None and facts.shape is not None:
            import torch

            example = torch.rand(facts.shape, generator=torch.Generator().manual_seed(0))
        shape = transformed_shape(spec, example, found) if example is not None else None
        facts = DataFacts(facts.sizes, shape, facts.num_classes)
    return facts


def _image_folder_facts(spec, scanned):
    """Examples per split and classes from the folder's file names (runner.data.image_folder.scan, no image
    decoded: the preflight's scan when it ran), and the shape of its first training image, decoded as the run
    decodes it (RGB)."""
    from runner.data import DataUnavailable
    from runner.data.image_folder import scan

    try:
        classes, samples = scanned if scanned is not None else scan(**spec.factory_args())
    except (DataUnavailable, TypeError):
        return None, None  # reported by runner.recipe.checks.data_problems
    try:
        from torchvision.datasets.folder import default_loader

        image = default_loader(samples["train"][0][0])
    except Exception:  # an unreadable first image: the run names it when it reads it
        return DataFacts({split: len(samples[split]) for split in SPLITS}, None, len(classes)), None
    shape = (len(image.getbands()), image.height, image.width)
    return DataFacts({split: len(samples[split]) for split in SPLITS}, shape, len(classes)), image


def transformed_shape(spec, example, found: Findings | None) -> tuple[int, ...] | None:
    """The shape of `example` after each split's transforms (seeded, so random ones draw the same), or None when
    a transform fails on it (reported at its item) or the splits disagree (reported at `data.transforms`)."""
    import torch

    from runner.data.augment import CONVERSIONS, as_float_image, build_item, split_item

    shapes = {}
    for split in ("train", "eval"):
        items = getattr(spec.transforms, split)
        value = example if any(split_item(item)[0] in CONVERSIONS for item in items) else as_float_image(example)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            for i, item in enumerate(items):
                try:
                    value = build_item(item)(value)
                except Exception as error:  # the transform refuses this example: wrong size, channels, type
                    if found is not None:
                        name = split_item(item)[0]
                        found.error(("data", "transforms", split, i), f"{name} fails on an example of this data "
                                    f"(shape {_shape_text(example)}): {_first_line(error)}",
                                    "check the transform's sizes and per-channel values against the data")
                    return None
        if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
            return None  # the run names a list that ends without a float tensor (runner.data.streaming)
        shapes[split] = tuple(value.shape)
    if shapes["train"] != shapes["eval"]:
        if found is not None:
            found.error(("data", "transforms"), f"the train transforms give examples of shape {shapes['train']}, the "
                        f"eval transforms {shapes['eval']}: one model sees both",
                        "end both lists at the same size (for example RandomCrop for train, CenterCrop for eval)")
        return None
    return shapes["eval"]


def _shape_text(example) -> str:
    shape = getattr(example, "shape", None)
    if shape is not None:
        return str(tuple(shape))
    return f"{len(example.getbands())}x{example.height}x{example.width} image"


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: " + (text[0] if text else "")[:300]


def check_data_sizes(recipe, facts: DataFacts, found: Findings) -> dict[str, int]:
    """Empty splits, one class, limits above the split and a batch above the training data; returns the
    number of examples each split gives after `limit`."""
    data = recipe.data
    arg_of = {"train": "num_train", "val": "num_val", "test": "num_test"}
    used = {}
    for split in SPLITS:
        size = facts.sizes[split]
        limit = getattr(data.limit, split)
        if size <= 0:
            found.error(("data", "args", arg_of[split]) if arg_of[split] in data.args else ("data",),
                        f"the {split} split is empty", "every stage needs examples: training reads train, "
                        "validation and the quantizers' checks read val, evaluate and export read test")
        elif limit is not None and limit > size:
            found.error(("data", "limit", split), f"limit.{split} is {limit}, above the {size} examples of the "
                        f"{split} split", f"use at most {size}, or drop the limit to use the whole split")
        used[split] = min(size, limit) if limit is not None else size
    classes = facts.num_classes
    if isinstance(classes, int) and classes < 2:
        found.error(("data", "args", "num_classes") if "num_classes" in data.args else ("data",),
                    f"the data has {classes} class{'es' if classes != 1 else ''}: a classifier needs at least 2")
    _check_world_share(recipe, facts, used, found)
    trains = any(training_blocks(recipe))
    if isinstance(classes, int) and trains and 0 < used["train"] < classes:
        found.error(_size_field(recipe, "train"), f"{used['train']} training example{'s' if used['train'] > 1 else ''} "
                    f"cannot show all {classes} classes: the model could never learn the others",
                    f"use at least {classes} training examples (many per class)")
    if trains and 0 < used["train"] < data.batch_size:
        found.error(("data", "batch_size"), f"batch_size {data.batch_size} is above the {used['train']} training "
                    "examples: every step would see the whole set and the throughput figures would count "
                    "examples that do not exist", f"use a batch_size of at most {used['train']}")
    return used


def _size_field(recipe, split: str) -> tuple:
    """Where the recipe sets a split's size: its limit, the synthetic count, or the data block."""
    if getattr(recipe.data.limit, split) is not None:
        return ("data", "limit", split)
    return ("data", "args", f"num_{split}") if f"num_{split}" in recipe.data.args else ("data",)


def _check_world_share(recipe, facts: DataFacts, used: dict[str, int], found: Findings) -> None:
    """Each process of a multi-process run reads its own share of every split: one with no example fails."""
    from runner.recipe.devices import world_size

    processes = world_size(recipe.trainer)
    if processes < 2:
        return
    for split in SPLITS:
        if 0 < used[split] < processes:
            found.error(_size_field(recipe, split), f"the {split} split has {used[split]} example"
                        f"{'s' if used[split] > 1 else ''} for {processes} processes: "
                        f"{processes - used[split]} of them would get none",
                        f"give every process at least one example ({processes}), or run on fewer devices")


def check_example_counts(recipe, used: dict[str, int], found: Findings) -> None:
    """Stages told to measure on the first N examples of a split, where N is above what the split holds: they would
    silently measure fewer. Defaults mean "up to N" and are left alone."""
    places = []
    for i, stage in enumerate(recipe.stages):
        if stage.kind == "sensitivity":
            places.append((("stages", i, "examples"), stage, "examples", "val"))
        allocation = getattr(stage, "allocation", None)
        if allocation is not None and stage.kind == "prune" and allocation.sensitivity is None:
            places.append((("stages", i, "allocation", "scan", "examples"), allocation.scan, "examples", "val"))
        if allocation is not None and stage.kind == "quantize" and allocation.sensitivity is None:
            places.append((("stages", i, "allocation", "examples"), allocation, "examples", "val"))
        if stage.kind == "export":
            places.append((("stages", i, "check_examples"), stage, "check_examples", "test"))
    for path, spec, name, split in places:
        asked = getattr(spec, name)
        if name in spec.model_fields_set and asked > used[split]:
            found.error(path, f"{path[-1]} is {asked}, above the {used[split]} examples of the {split} split",
                        f"use at most {used[split]}: the stage reads the split's first examples and would silently "
                        "measure on fewer")


# ---- schedules resolved against the stage's length ---------------------------------------------------


@dataclass(frozen=True)
class Length:
    """A training block's length in optimizer steps, once the data size is known."""

    steps_per_epoch: int
    total: int

    @property
    def epochs(self) -> float:
        return self.total / self.steps_per_epoch

    def steps(self, moment) -> int:
        """A Point/Moment in steps, as runner.lightning.units.to_steps resolves it."""
        if moment.steps is not None:
            return moment.steps
        if moment.epochs is not None:
            return round(moment.epochs * self.steps_per_epoch)
        return round(moment.fraction * self.total)


def training_blocks_of(stage, index: int):
    """(path, Training spec) for a stage that trains and for each training block inside a stage."""
    from runner.recipe.stages import Training

    if isinstance(stage, Training):
        yield ("stages", index), stage
    for name in type(stage).model_fields:
        value = getattr(stage, name)
        if isinstance(value, Training):
            yield ("stages", index, name), value


def training_blocks(recipe):
    """(path, Training spec) for every stage that trains and every training block inside a stage
    (iterative_prune's `retrain`, weight sharing's `finetune`)."""
    for index, stage in enumerate(recipe.stages):
        yield from training_blocks_of(stage, index)


def teacher_models(recipe):
    """(path, spec) of each distillation teacher given as a model spec rather than a stage name; each spec learns
    its path, so that problems found when the run loads it are located in the recipe too."""
    for path, block in training_blocks(recipe):
        if block.distillation is not None and not isinstance(block.distillation.teacher, str):
            where = path + ("distillation", "teacher")
            block.distillation.teacher._where = where
            yield where, block.distillation.teacher


def stage_length(recipe, block, train_examples: int | None) -> Length | None:
    if train_examples is None or train_examples <= 0 or block.batch_size_finder is not None:
        return None  # unknown, or the batch size is chosen while the stage runs
    accumulate = recipe.trainer.with_override(block.trainer).accumulate_grad_batches
    batches = math.ceil(train_examples / recipe.data.batch_size)
    steps_per_epoch = max(1, math.ceil(batches / accumulate))
    total = block.steps if block.steps is not None else block.epochs * steps_per_epoch
    return Length(steps_per_epoch, total)


def _stage_epochs(block, length: Length | None) -> float | None:
    """The block's length in epochs: as given, or from its steps once the data size is known."""
    if block.epochs is not None:
        return block.epochs
    return length.epochs if length is not None else None


def check_schedule(path: tuple, block, length: Length | None, found: Findings) -> None:
    """Schedules that cannot do what they say (errors) or barely do anything (warnings)."""
    schedule, lr = block.schedule, block.optimizer.lr
    at = path + ("schedule",)
    name = schedule.name
    if name in ("cosine", "linear"):
        if schedule.min_lr > lr:
            found.error(at + ("min_lr",), f"{name} min_lr {schedule.min_lr:g} is above the learning rate {lr:g}: the "
                        f"rate would rise {schedule.min_lr / lr:.3g}x over the stage instead of decaying",
                        f"set min_lr below optimizer.lr ({lr:g}), usually 0 or about lr/100")
        elif schedule.min_lr == lr:
            found.warn(at + ("min_lr",), f"{name} min_lr equals the learning rate: the schedule is constant",
                       "use `schedule: {name: constant}` or a lower min_lr")
    if name == "onecycle" and schedule.max_lr < lr:
        found.error(at + ("max_lr",), f"onecycle max_lr {schedule.max_lr:g} is below the learning rate {lr:g}: 1cycle "
                    f"peaks at max_lr and starts at max_lr/div_factor ({schedule.max_lr / schedule.div_factor:g})",
                    "set max_lr to the peak you want (Smith & Topin: several times the usual rate); optimizer.lr "
                    "is not used by 1cycle")
    epochs = _stage_epochs(block, length)
    if epochs is not None:
        if name == "multistep" and schedule.milestones[-1] >= epochs:
            late = [m for m in schedule.milestones if m >= epochs]
            found.error(at + ("milestones",), f"milestone{'s' if len(late) > 1 else ''} "
                        f"{', '.join(f'{m:g}' for m in late)} lie{'s' if len(late) == 1 else ''} at or beyond the "
                        f"stage's end (epoch {epochs:g}): the decay never happens",
                        f"milestones count epochs from the stage's start; keep them below {epochs:g}")
        if name == "piecewise" and schedule.boundaries[-1] >= epochs:
            found.error(at + ("boundaries",), f"boundary {schedule.boundaries[-1]:g} is at or beyond the stage's end "
                        f"(epoch {epochs:g}): its value {schedule.values[-1]:g} is never used",
                        f"boundaries count epochs from the stage's start; keep them below {epochs:g}")
        if name == "step" and schedule.every_epochs >= epochs:
            found.warn(at + ("every_epochs",), f"step decay every {schedule.every_epochs:g} epochs never decays in a "
                       f"stage of {epochs:g} epochs", "use a shorter interval or `schedule: {name: constant}`")
        _check_validation(path, block, epochs, found)
    if block.warmup is not None:
        warmup = block.warmup
        if length is not None:
            steps, total = max(1, length.steps(warmup)), length.total
        elif warmup.epochs is not None and block.epochs is not None:
            steps, total = warmup.epochs, block.epochs
        elif warmup.steps is not None and block.steps is not None:
            steps, total = warmup.steps, block.steps
        else:
            steps = total = None
        if steps is not None and steps >= total:
            unit = "steps" if length is not None or warmup.steps is not None else "epochs"
            found.error(path + ("warmup",), f"the warmup ({steps:g} {unit}) is not shorter than the stage ({total:g} "
                        f"{unit}): the learning rate never reaches its value and the schedule never runs",
                        "shorten the warmup (a few percent of the stage is usual)")


def _check_validation(path: tuple, block, epochs: float, found: Findings) -> None:
    """A plateau schedule or early stopping needs validations to watch; validation runs every val_every_epochs."""
    validations = math.floor(epochs / block.val_every_epochs + 1e-9)
    watchers = []
    if block.schedule.name == "reduce_on_plateau":
        watchers.append(("schedule", "reduce_on_plateau", block.schedule.patience))
    if block.early_stopping is not None:
        watchers.append(("early_stopping", "early stopping", block.early_stopping.patience))
    if block.keep.epoch == "best":
        watchers.append(("keep", "keep: best", None))
    if validations == 0:
        where = path + ("val_every_epochs",) if "val_every_epochs" in block.model_fields_set else path
        message = (f"validation runs every {block.val_every_epochs} epochs, so never in this stage of {epochs:g} epochs")
        if watchers:
            found.error(where, message + f": {' and '.join(w[1] for w in watchers)} would watch no validation",
                        f"set val_every_epochs to at most {max(1, math.floor(epochs))}")
        else:
            found.warn(where, message + ": the stage reports no val_loss or val_acc",
                       f"set val_every_epochs to at most {max(1, math.floor(epochs))}")
        return
    for field_name, what, patience in watchers:
        if patience is not None and patience >= validations:
            found.warn(path + (field_name, "patience"), f"{what} has patience {patience} but the stage validates only "
                       f"{validations} time{'s' if validations > 1 else ''}: it can never act",
                       f"lower the patience below {validations}, or validate more often")


def check_windows(path: tuple, block, length: Length, found: Findings) -> None:
    """Gradual-pruning windows and QAT freeze points inside the stage, in optimizer steps."""
    gradual = block.gradual_pruning
    if gradual is not None:
        at = path + ("gradual_pruning",)
        start, end, every = (length.steps(m) for m in (gradual.start, gradual.end, gradual.every))
        where = f"(the stage has {length.total} steps, {length.steps_per_epoch} per epoch)"
        if end >= length.total:
            found.error(at + ("end",), f"the gradual pruning window ends at step {end}, not inside the stage {where}",
                        "end it before the stage ends, so the final sparsity is reached and then held")
        elif start >= end:
            found.error(at + ("start",), f"the gradual pruning window starts at step {start}, not before its end "
                        f"(step {end}) {where}")
        elif every < 1:
            found.error(at + ("every",), f"`every` is shorter than one optimizer step {where}",
                        "prune at most once per step")
        elif every > end - start:
            found.error(at + ("every",), f"`every` ({every} steps) is longer than the window (steps {start} to {end}): "
                        "the schedule would prune once at its start and jump to the final sparsity at its end",
                        f"use an interval of at most {end - start} steps (Zhu & Gupta prune tens of times per window)")
    for name in ("freeze_observers_after", "freeze_batchnorm_after"):
        point = getattr(block, name, None)
        if point is not None and length.steps(point) >= length.total:
            found.error(path + (name,), f"{name} is at step {length.steps(point)}, not inside the stage's "
                        f"{length.total} steps: it would never happen", "freeze inside the stage, or drop the field")


def check_window_in_own_unit(path: tuple, block, found: Findings) -> None:
    """Without the data's size, a gradual window given in the stage's own unit is still checked against it."""
    gradual = block.gradual_pruning
    for unit, length in (("epochs", block.epochs), ("steps", block.steps)):
        start, end = getattr(gradual.start, unit), getattr(gradual.end, unit)
        if length is not None and end is not None and end >= length:
            found.error(path + ("gradual_pruning", "end", unit), f"the gradual pruning window ends at {unit} {end:g}, "
                        f"not inside the stage's {length}", f"end it before {unit} {length} so the final sparsity "
                        "is reached and held")
        if start is not None and end is not None and start >= end:
            found.error(path + ("gradual_pruning", "start", unit), f"the gradual pruning window starts at {unit} "
                        f"{start:g}, not before its end {end:g}")


def check_monitors(path: tuple, block, found: Findings) -> None:
    """What watches validation must be able to see a change: accuracy is a fraction, and loss goes down."""
    stopping = block.early_stopping
    if stopping is not None and stopping.monitor == "val_acc" and stopping.min_delta >= 1:
        found.error(path + ("early_stopping", "min_delta"), f"min_delta {stopping.min_delta:g} on val_acc, a fraction "
                    "in [0, 1]: no improvement can be that large, so training would always stop after "
                    f"{stopping.patience} validation{'s' if stopping.patience > 1 else ''}",
                    "give min_delta as a fraction of accuracy (0.001 is a tenth of a point)")
    keep = block.keep
    wrong_way = {"val_loss": "max", "val_acc": "min"}[keep.monitor]
    if keep.epoch == "best" and keep.mode == wrong_way:
        found.error(path + ("keep", "mode"), f"keep: best with mode {keep.mode} on {keep.monitor} hands on the "
                    f"{'highest-loss' if keep.monitor == 'val_loss' else 'least accurate'} epoch",
                    f"drop `mode` ({keep.monitor}'s default is {'min' if wrong_way == 'max' else 'max'})")


def check_tuners(path: tuple, block, length: Length | None, found: Findings) -> None:
    """The LR range test sweeps min_lr up to max_lr over num_steps steps of the stage's own epochs."""
    finder = block.lr_finder
    if finder is None:
        return
    if finder.max_lr <= finder.min_lr:
        found.error(path + ("lr_finder", "max_lr"), f"lr_finder max_lr {finder.max_lr:g} is not above min_lr "
                    f"{finder.min_lr:g}: the range test sweeps from min_lr up to max_lr",
                    "usual: min_lr 1e-6, max_lr 1")
    if length is not None and block.epochs is not None and finder.num_steps > length.total:
        # a warning, as at run: the range test still runs, on fewer steps than asked
        found.warn(path + ("lr_finder", "num_steps"), f"lr_finder asks {finder.num_steps} steps, but the stage's "
                    f"{block.epochs} epoch{'s hold' if block.epochs > 1 else ' holds'} {length.total}: the range test "
                    f"would stop at step {length.total}, short of max_lr",
                    f"use num_steps of at most {length.total}, or more epochs")


def _check_accumulation(recipe, path: tuple, block, train_examples: int, found: Findings) -> None:
    """Lightning steps the optimizer at each epoch's end whatever is accumulated: an accumulation longer than
    an epoch sums fewer batches than it says."""
    accumulate = recipe.trainer.with_override(block.trainer).accumulate_grad_batches
    batches = math.ceil(train_examples / recipe.data.batch_size)
    if block.batch_size_finder is None and accumulate > batches:
        own = block.trainer is not None and block.trainer.accumulate_grad_batches is not None
        where = path + ("trainer", "accumulate_grad_batches") if own else ("trainer", "accumulate_grad_batches")
        found.error(where, f"accumulate_grad_batches {accumulate} is more than the {batches} batches of an epoch: "
                    f"the optimizer steps at each epoch's end, so every step would sum {batches}",
                    f"use at most {batches}, or a larger data.batch_size")


def check_schedules(recipe, used: dict[str, int] | None, found: Findings) -> None:
    train_examples = used["train"] if used else None
    for i, stage in enumerate(recipe.stages):
        for path, block in training_blocks_of(stage, i):
            length = stage_length(recipe, block, train_examples)
            check_schedule(path, block, length, found)
            check_tuners(path, block, length, found)
            check_monitors(path, block, found)
            if train_examples:
                _check_accumulation(recipe, path, block, train_examples, found)
            if length is not None:
                check_windows(path, block, length, found)
            elif block.gradual_pruning is not None:
                check_window_in_own_unit(path, block, found)
        if used is None:
            continue
        batches = math.ceil(used["train"] / recipe.data.batch_size) if used["train"] > 0 else 0
        if getattr(stage, "method", None) == "static_int8" and stage.calibration_batches > batches:
            found.error(("stages", i, "calibration_batches"), f"calibration_batches is {stage.calibration_batches} "
                        f"but the training data gives {batches} batches of {recipe.data.batch_size}",
                        f"set calibration_batches to at most {batches}")
        if stage.kind == "iterative_prune" and stage.rewind not in (None, "init"):
            length = stage_length(recipe, stage.retrain, used["train"])
            if length is not None and length.steps(stage.rewind) >= length.total:
                found.error(("stages", i, "rewind"), f"the rewind point (step {length.steps(stage.rewind)}) is not "
                            f"inside the dense round's {length.total} steps: survivors would keep their trained values, "
                            "which is iterative pruning without rewinding",
                            "rewind to an early point of the dense round, or drop `rewind`")


# ---- numbers at the edge ---------------------------------------------------------------------------


def _non_finite(node, path: tuple = ()):
    """Paths of the infinite and NaN numbers in the recipe as written (model and data `args` included)."""
    if isinstance(node, float) and not math.isfinite(node):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _non_finite(value, path + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _non_finite(value, path + (index,))


FLOAT32_EPSILON = 2.0**-23  # the spacing of float32 numbers near 1: differences below it are rounding
FLOAT32_TINY = 2.0**-126  # the smallest normal float32; a product below it is flushed toward 0

# Optimizers whose weight decay multiplies every weight by (1 - lr * weight_decay) each step (SGD's coupled L2
# and AdamW's decoupled decay alike); Adam and RMSprop divide the decay term by the gradient's scale instead.
SCALING_DECAY = ("sgd", "adamw")


def check_bounds(recipe, found: Findings) -> None:
    """Finite numbers, seeds that stay valid for every stage, learning rates torch can hold, weight decay that
    does not wipe the weights, and thread counts this machine has."""
    for path, value in _non_finite(found.source.data):
        found.error(path, f"{value} is not a finite number", "every number in a recipe is finite")
    for path, block in training_blocks(recipe):
        optimizer = block.optimizer
        factor = 1 - optimizer.lr * getattr(optimizer, "weight_decay", 0.0)
        if optimizer.name in SCALING_DECAY and factor <= 0:
            found.error(path + ("optimizer", "weight_decay"), f"weight_decay {optimizer.weight_decay:g} at lr "
                        f"{optimizer.lr:g} scales every weight by 1 - lr * weight_decay = {factor:.3g} each step: "
                        f"the weights {'vanish' if factor == 0 else 'flip sign every step and blow up' if factor < -1 else 'flip sign every step'}",
                        f"keep lr * weight_decay far below 1 (usual weight_decay: 1e-5 to 1e-2)")
    for path, block in training_blocks(recipe):
        distillation = block.distillation
        if distillation is not None and distillation.temperature**2 < FLOAT32_TINY:
            found.error(path + ("distillation", "temperature"), f"temperature {distillation.temperature:g}: the soft "
                        f"term is scaled by T^2 = {distillation.temperature**2:.3g}, which is 0 in float32, so "
                        "distillation would change nothing", "Hinton et al. use T from 1 to 20")
    for i, stage in enumerate(recipe.stages):
        if stage.kind == "export" and "onnx" in stage.formats and stage.tolerance < FLOAT32_EPSILON:
            found.error(("stages", i, "tolerance"), f"tolerance {stage.tolerance:g} is below float32's resolution "
                        f"({FLOAT32_EPSILON:.2g}): only a bit-exact match would pass, and onnxruntime's kernels "
                        "round differently from PyTorch's", "usual: 1e-4 for float models, 1e-2 for int8")
    last = len(recipe.stages) - 1
    for path, seed in [(("seed",), recipe.seed)] + [(("seeds", k), s) for k, s in enumerate(recipe.seeds or [])]:
        if seed + last > MAX_STAGE_SEED:
            found.error(path, f"seed {seed} is too large: stage {last + 1} runs with seed + {last}, above the "
                        f"largest seed {MAX_STAGE_SEED}", f"use a seed of at most {MAX_STAGE_SEED - last}")
    for path, block in training_blocks(recipe):
        if block.optimizer.lr > MAX_LR:
            found.error(path + ("optimizer", "lr"), f"learning rate {block.optimizer.lr:g} is beyond what torch's "
                        f"optimizers can hold (float32)", "usual rates are 1e-4 to 1")
    cores = os.cpu_count() or 1
    threads = [(("trainer", "threads"), recipe.trainer.threads)]
    threads += [(("stages", i, "threads"), getattr(stage, "threads", None)) for i, stage in enumerate(recipe.stages)]
    for path, count in threads:
        if count is not None and count > cores:
            found.error(path, f"threads {count} is more than the {cores} cores of this machine",
                        f"use at most {cores}; more threads than cores only slows torch down")


# ---- expect: rules some stage can satisfy --------------------------------------------------------------

# Run-level metrics and what a stage must report for each (runner/verdicts.py derives them).
RUN_METRIC_NEEDS = {
    "test_error": ("test_error",),
    "test_acc": ("test_acc",),
    "weights_kept": ("params_nonzero", "params_total"),
    "compression_ratio": ("dense_fp32_bytes", "packed_bytes"),
    "bytes": ("packed_bytes",),
}
RUN_METRIC_HINTS = {
    "test_error": "add `{name: evaluate, kind: evaluate}` (split: test) after the last stage",
    "test_acc": "add `{name: evaluate, kind: evaluate}` (split: test) after the last stage",
    "latency_ratio": "it compares the first and the final latency: evaluate before and after compressing",
}


def _declares(stage, metric: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(metric, m.name) for m in stage.declared_metrics())


FRACTION_RUN_METRICS = ("test_error", "test_acc", "weights_kept")


def _unit(recipe, metric: str) -> str:
    import fnmatch

    if metric in FRACTION_RUN_METRICS:
        return "fraction"
    stage_name, _, name = metric.partition(".")
    stage = next((s for s in recipe.stages if s.name == stage_name), None)
    declared = stage.declared_metrics() if stage is not None else []
    return next((m.unit for m in declared if fnmatch.fnmatchcase(name, m.name)), "")


def _check_expect_range(recipe, metric: str, rule, found: Findings) -> None:
    """A fraction lies in [0, 1]: a numeric bound outside it can never hold."""
    if isinstance(rule.bound, str) or _unit(recipe, metric) != "fraction":
        return
    tolerance = rule.within.tolerance if rule.within is not None else 0.0
    never = {"at_least": rule.bound > 1, "at_most": rule.bound < 0,
             "within": rule.bound + tolerance < 0 or rule.bound - tolerance > 1}[rule.kind]
    if never:
        found.error(("expect", "metrics", metric, rule.kind), f"`{metric}` is a fraction in [0, 1]: "
                    f"{rule.describe()} can never hold", "give the bound as a fraction (0.92, not 92)")


def check_expect(recipe, found: Findings) -> None:
    """Run-level rules that no stage of this recipe can feed, and bounds no value can meet or every value meets."""
    if recipe.expect is None:
        return
    for metric, rule in recipe.expect.metrics.items():
        _check_expect_range(recipe, metric, rule, found)
        if rule.bound == metric:
            found.error(("expect", "metrics", metric, rule.kind), f"`{metric}` is compared with itself: the rule "
                        "always holds and checks nothing", "compare it with another stage's metric or a number")
    for metric in recipe.expect.metrics:
        if metric not in RUN_METRICS or metric == "wall_seconds":
            continue  # stage metrics (`stage.metric`) and unknown names are checked in runner.recipe.checks
        path = ("expect", "metrics", metric)
        if metric == "latency_ratio":
            timed = [s.name for s in recipe.stages if _declares(s, "latency_ms_b1")]
            if len(timed) < 2:
                found.error(path, "latency_ratio compares two latency measurements, but "
                            + (f"only stage `{timed[0]}` measures latency" if timed else "no stage measures latency"),
                            RUN_METRIC_HINTS["latency_ratio"])
                continue
            stages = {s.name: s for s in recipe.stages}
            first, last = (stages[timed[0]], stages[timed[-1]])
            batches = (set(getattr(first, "latency_batch_sizes", ())), set(getattr(last, "latency_batch_sizes", ())))
            if all(batches) and not batches[0] & batches[1]:
                found.error(path, f"latency_ratio compares the first and the last latency at a batch size both "
                            f"measured, but `{first.name}` times batches {sorted(batches[0])} and `{last.name}` "
                            f"{sorted(batches[1])}", "give both stages a common entry in latency_batch_sizes")
            continue
        needs = RUN_METRIC_NEEDS[metric]
        if not any(all(_declares(stage, need) for need in needs) for stage in recipe.stages):
            found.error(path, f"no stage of this recipe reports {' and '.join(f'`{n}`' for n in needs)}, which "
                        f"`{metric}` is computed from", RUN_METRIC_HINTS.get(metric, "add an evaluate stage"))


# ---- the whole walk ----------------------------------------------------------------------------------


def check_semantics(recipe, source: Source, data: dict, build_user_code: bool = False,
                    dry_build: bool = True) -> Findings:
    """Every semantic check that needs no training; `data` is runner.recipe.checks.look_at_data's record of the
    data spec. With `dry_build` the model is built on the meta device (runner.recipe.dry_build) when nnopt's or a
    model library's code builds it, user `import:` code only with `build_user_code`; its findings are
    remembered (runner.recipe.facts_cache) by everything it reads."""
    found = Findings(source)
    check_order(recipe, found)
    check_pruning_sequence(recipe, found)
    check_allocation_range(recipe, found)
    check_gradual_places(recipe, found)
    check_repeats(recipe, found)
    check_bounds(recipe, found)
    check_expect(recipe, found)
    replay(found, data["found"])
    facts = None if data["facts"] is None else DataFacts(**(data["facts"] | {"shape": data["facts"]["shape"] and
                                                                              tuple(data["facts"]["shape"])}))
    used = check_data_sizes(recipe, facts, found) if facts is not None else None
    check_schedules(recipe, used, found)
    if used is not None:
        check_example_counts(recipe, used, found)
    if dry_build:
        teachers = list(teacher_models(recipe))
        if teachers:  # loaded and run as the run will (rare): not remembered
            from runner.recipe.dry_build import check_teachers

            check_teachers(teachers, facts, found, build_user_code)
        replay(found, remember("dry_build", _dry_build_key(recipe, data["facts"], build_user_code),
                               lambda: _dry_build(recipe, facts, build_user_code)))
    return found


def _dry_build_key(recipe, facts: dict | None, build_user_code: bool) -> dict:
    """What the dry build reads: the model spec and its weights' content, the stages, the expect block, the data's
    facts, and whether user code may run."""
    return {"model": model_key(recipe.model), "weights": weights_state(recipe.model.weights_path()),
            "stages": [stage.model_dump(mode="json", by_alias=True) for stage in recipe.stages],
            "expect": recipe.expect.model_dump(mode="json", by_alias=True) if recipe.expect is not None else None,
            "facts": facts, "build_user_code": build_user_code}


def _dry_build(recipe, facts: DataFacts | None, build_user_code: bool) -> list:
    from runner.recipe.dry_build import builds_user_code, check_model_fits

    recorder = Recorder()
    if not (builds_user_code(recipe.model) and not build_user_code):  # else nothing is built: no torch either
        check_model_fits(recipe, facts, recorder, build_user_code)
    return recorder.found
