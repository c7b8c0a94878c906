"""The recipe: model, data, trainer settings and the ordered list of stages."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from runner.recipe.base import PositiveInt, Slug, Spec
from runner.recipe.expect import Expect
from runner.recipe.stages import Stage
from runner.recipe.training import Precision


class ModelSpec(Spec):
    """A registered model by `name`, or trusted user code via `import: package.module:factory`."""

    name: str | None = None
    import_: Annotated[str | None, Field(alias="import", pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")] = None
    args: dict[str, Any] = {}

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name is None) == (self.import_ is None):
            raise ValueError("give exactly one of `name` (a registered model) or `import` (package.module:factory)")
        return self


class DataLimit(Spec):
    """Use only the first N examples of a split (after a fixed shuffle), for quick runs."""

    train: PositiveInt | None = None
    val: PositiveInt | None = None
    test: PositiveInt | None = None


class DataSpec(Spec):
    name: str
    batch_size: PositiveInt = 128
    eval_batch_size: PositiveInt = 1000
    limit: DataLimit = DataLimit()
    args: dict[str, Any] = {}


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


class Recipe(Spec):
    name: Slug
    description: str = ""
    seed: Seed = 0
    seeds: Annotated[list[Seed], Field(min_length=1)] | None = None  # one run per seed, reported as mean ± std
    expect: Expect | None = None
    model: ModelSpec
    data: DataSpec
    trainer: TrainerSpec = TrainerSpec()
    stages: Annotated[list[Stage], Field(min_length=1)]

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds):
        if seeds is not None and len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be distinct: a repeated seed repeats the same run")
        return seeds
