"""The recipe: model, data, trainer settings and the ordered list of stages."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PrivateAttr, field_validator, model_validator

from runner.errors import Issue
from runner.recipe.base import PositiveInt, Slug, Spec
from runner.recipe.expect import Expect
from runner.recipe.model import FromRecipeFile, ModelSpec
from runner.recipe.stages import Stage
from runner.recipe.tracking import CallbackSpec, LoggerName
from runner.recipe.training import Precision


class DataLimit(Spec):
    """Use only the first N examples of a split (after a fixed shuffle), for quick runs."""

    train: PositiveInt | None = None
    val: PositiveInt | None = None
    test: PositiveInt | None = None


def _one_transform(item: str | dict) -> str | dict:
    if isinstance(item, dict) and len(item) != 1:
        raise ValueError("a transform is a name (`RandomHorizontalFlip`) or one name with its arguments "
                         "(`{RandomCrop: {size: 32, padding: 4}}`)")
    return item


TransformItem = Annotated[str | dict[str, dict[str, Any] | None], AfterValidator(_one_transform)]


class DataTransforms(Spec):
    """torchvision `transforms.v2` by name, applied to each example: `train` to the training batches,
    `eval` to validation, test and the probes (calibration, export and parity checks). A list without
    ToImage/ToDtype runs on float tensors in [0, 1]. Data read into memory streams when given any."""

    train: list[TransformItem] = []  # e.g. [{RandomCrop: {size: 32, padding: 4}}, RandomHorizontalFlip]
    eval: list[TransformItem] = []  # e.g. [{Resize: {size: 36}}, {CenterCrop: {size: 32}}, {Normalize: {...}}]


class DataLoaderSpec(Spec):
    """DataLoader settings for data read example by example (in-memory data has no loader)."""

    workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"  # auto: a core each, less one, at most 8
    pin_memory: bool | Literal["auto"] = "auto"  # auto: when training on a CUDA GPU
    persistent_workers: bool = True  # keep the workers between epochs (with workers > 0)
    prefetch_factor: PositiveInt | None = None  # batches each worker reads ahead (torch's default: 2)

    @model_validator(mode="after")
    def _workers_for_worker_settings(self):
        if self.workers == 0 and self.prefetch_factor is not None:
            raise ValueError("`prefetch_factor` needs workers: with `workers: 0` the training process reads itself")
        return self


class DataSpec(FromRecipeFile):
    """A registered data set by `name`, or trusted user code via `import: package.module:factory`
    returning a LightningDataModule or (train, val, test) torch Datasets."""

    name: str | None = None  # a registered data set (`nnopt list`): mnist, image_folder, cifar10, ...
    import_: Annotated[str | None, Field(alias="import", pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")] = None  # module:factory
    batch_size: PositiveInt = 128  # the global training batch, split over the processes of a multi-process run
    eval_batch_size: PositiveInt = 1000  # validation and test batches (global, too)
    limit: DataLimit = DataLimit()  # the first N examples of a split after a fixed shuffle, for quick runs
    args: dict[str, Any] = {}  # the data set's or factory's arguments; a `root` is relative to the recipe file
    transforms: DataTransforms = DataTransforms()  # torchvision transforms.v2 per split: `train` and `eval`
    loader: DataLoaderSpec = DataLoaderSpec()  # DataLoader workers for data read example by example

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name is None) == (self.import_ is None):
            raise ValueError("give exactly one of `name` (a registered data set) or `import` (package.module:factory)")
        return self

    def factory_args(self) -> dict[str, Any]:
        """`args` as a registered data set takes them: a `root` folder relative to the recipe file."""
        if self.name is not None and isinstance(self.args.get("root"), str):
            return {**self.args, "root": str(self.relative_path(self.args["root"]))}
        return dict(self.args)


class CheckpointSpec(Spec):
    """Resume points inside training stages: the full training state (model, optimizer, schedule,
    RNG, position in the data, callbacks) every N optimizer steps and/or at the end of every N epochs."""

    every_n_steps: PositiveInt | None = None
    every_n_epochs: PositiveInt | None = 1

    @model_validator(mode="after")
    def _some_interval(self):
        if self.every_n_steps is None and self.every_n_epochs is None:
            raise ValueError("set `every_n_steps` or `every_n_epochs` (or `checkpoint: null` to turn checkpoints off)")
        return self


class FSDPOptions(Spec):
    """Lightning's FSDPStrategy (torch FullyShardedDataParallel): how parameters are sharded."""

    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD"
    cpu_offload: bool = False  # keep parameters on CPU between uses: less GPU memory, slower


class DeepSpeedOptions(Spec):
    """Lightning's DeepSpeedStrategy, ZeRO stages 1-2 (stage 3 shards parameters; not supported here)."""

    stage: Literal[1, 2] = 2
    offload_optimizer: bool = False


class TrainerSpec(Spec):
    """Lightning Trainer settings shared by every training stage (a stage's `trainer:` may override some)."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu"] = "cpu"
    devices: PositiveInt | Literal["auto"] = 1  # per node; on CPU, the number of processes
    num_nodes: PositiveInt = 1
    strategy: Literal["auto", "ddp", "ddp_spawn", "fsdp", "deepspeed"] = "auto"
    fsdp: FSDPOptions | None = None  # only with strategy fsdp
    deepspeed: DeepSpeedOptions | None = None  # only with strategy deepspeed
    precision: Precision = "32-true"
    sync_batchnorm: bool = False
    accumulate_grad_batches: PositiveInt = 1
    deterministic: bool = True
    threads: PositiveInt | None = None  # torch intra-op threads; default: torch's choice
    log_every_n_steps: PositiveInt = 50
    progress_bar: bool = True
    checkpoint: CheckpointSpec | None = CheckpointSpec()  # null: no resume points (a rerun restarts the stage)
    compile: bool = False  # torch.compile the forward pass while training (opt-in: compiling takes tens of seconds)
    loggers: list[LoggerName] = ["csv"]  # experiment loggers, all offline (runner/recipe/tracking.py); csv is always on
    callbacks: list[CallbackSpec] = []  # your Lightning callbacks (`import:` with `args`), in every training stage

    def with_override(self, override) -> "TrainerSpec":
        """These settings with a training block's own `trainer:` (a TrainerOverride, or None) applied."""
        if override is None:
            return self
        return self.model_copy(update=override.model_dump(exclude_none=True))

    def one_process(self) -> "TrainerSpec":
        """These settings for a stage that runs on rank 0 alone (a one-shot prune's or quantizer's Trainer)."""
        return self.model_copy(update={"devices": 1, "num_nodes": 1, "strategy": "auto", "fsdp": None,
                                       "deepspeed": None, "sync_batchnorm": False})


Seed = Annotated[int, Field(ge=0, lt=2**32)]


class Extends(Spec):
    """The recipe file this one builds on (`extends: base.yaml` is `{file: base.yaml}`), merged when the file is
    read (runner/recipe/inherit.py): mappings merge key by key, the child's values winning; lists and other
    values are replaced; `stages` merge by `name`: an entry naming a parent's stage changes the fields it gives,
    a new name is appended, or placed by `_after_: STAGE` / `_before_: STAGE`, and `{name: S, _remove_: true}`
    drops stage S. A block that picks another variant (a stage's `kind`, an optimizer's or schedule's `name`, a
    quantize `method`) replaces the parent's whole, as does any mapping with `_replace_: true`. `name` is always
    the child's own (it names the output folder); `description` and `expect` too, unless `inherit` lists them.
    Paths in either file (weights, `import:` modules, data roots) are relative to the recipe file that is run."""

    file: Annotated[str, Field(min_length=1)]  # the parent recipe, relative to this recipe file's folder
    inherit: list[Literal["description", "expect"]] = []  # also taken from the parent (merged like other fields)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        return {"file": value} if isinstance(value, str) else value


class Recipe(Spec):
    # A recipe file this one builds on, merged in when the file is read: the merged recipe is what runs and what
    # run.json records (so `extends` itself is left out of dumps), and its stages' fingerprints are the flat copy's.
    extends: Annotated[Extends | None, Field(exclude=True)] = None
    name: Slug
    description: str = ""
    seed: Seed = 0
    seeds: Annotated[list[Seed], Field(min_length=1)] | None = None  # one run per seed, reported as mean ± std
    expect: Expect | None = None
    model: ModelSpec
    data: DataSpec
    trainer: TrainerSpec = TrainerSpec()
    stages: Annotated[list[Stage], Field(min_length=1)]
    # Legal but suspicious settings `validate` found (runner.recipe.semantics): printed, and recorded in run.json.
    _warnings: list[Issue] = PrivateAttr(default_factory=list)

    @property
    def warnings(self) -> list[Issue]:
        return self._warnings

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds):
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct: a repeated seed repeats the same run")
        return seeds
