"""Experiment tracking in a recipe: the loggers a training stage writes to, user callbacks, and the epoch it keeps."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, PrivateAttr, ValidationInfo, model_validator

from runner.recipe.base import Spec

# The package each logger writes through (Lightning's loggers import them lazily), and how to get it.
LOGGER_PACKAGES = {"tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard  (or nnopt's extra: "
                                   "pip install -e '.[tensorboard]')"),
                   "mlflow": (("mlflow",), "pip install mlflow"),
                   "wandb": (("wandb",), "pip install wandb")}


def _installed(name: str) -> str:
    packages, install = LOGGER_PACKAGES.get(name, ((), ""))
    if packages and not any(importlib.util.find_spec(package) for package in packages):
        raise ValueError(f"the `{name}` logger needs the {packages[0]} package, which is not installed: {install}")
    return name


# csv: logs/metrics.csv (always written: the report draws its curves from it); tensorboard: logs/tensorboard/;
# mlflow: a file store in logs/mlruns/ (experiment = the stage name); wandb: offline, logs/wandb/ (`wandb sync` uploads)
LoggerName = Annotated[Literal["csv", "tensorboard", "mlflow", "wandb"], AfterValidator(_installed)]


class CallbackSpec(Spec):
    """A Lightning callback of your own, added to every training stage's Trainer: `import:
    package.module:Class` (trusted code, imported at validate) called with `args`."""

    import_: Annotated[str, Field(alias="import", pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")]
    args: dict[str, Any] = {}
    _recipe_dir: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _importable(self, info: ValidationInfo):
        from runner import imports

        source = (info.context or {}).get("source")
        recipe_dir = Path(source.file).resolve().parent if source is not None and source.file[:1] != "<" else None
        try:
            factory = imports.resolve(self.import_, recipe_dir)
        except imports.ImportFailed as error:
            raise ValueError(f"{error.message}" + (f" ({error.hint})" if error.hint else "")) from None
        if not callable(factory):
            raise ValueError(f"`{self.import_}` is not a class or function")
        if isinstance(factory, type) and not _is_callback_class(factory):
            raise ValueError(f"`{self.import_}` is a class but not a pytorch_lightning Callback")
        self._recipe_dir = recipe_dir
        return self

    def build(self):
        """A fresh callback (each Trainer gets its own: callbacks keep state)."""
        import pytorch_lightning as pl

        from runner import imports

        callback = imports.resolve(self.import_, self._recipe_dir)(**self.args)
        if not isinstance(callback, pl.Callback):
            from runner.errors import Issue, RecipeError

            raise RecipeError([Issue("the recipe", None, None, "trainer.callbacks", f"`{self.import_}` returned a "
                                     f"{type(callback).__name__}, not a pytorch_lightning Callback",
                                     "name a Callback subclass, or a function that returns an instance of one")])
        return callback


def _is_callback_class(cls: type) -> bool:
    """A subclass of Lightning's Callback, told from its bases' names: validate does not import Lightning."""
    return any(base.__name__ == "Callback" and base.__module__.split(".")[0] in ("pytorch_lightning", "lightning")
               for base in cls.__mro__)


class Keep(Spec):
    """Which weights a training stage hands to the next stage: the last epoch's (default) or the best
    validated epoch's by `monitor` (`keep: best` is `{epoch: best}`)."""

    epoch: Literal["last", "best"] = "last"
    monitor: Literal["val_loss", "val_acc"] = "val_loss"
    mode: Literal["min", "max"] | None = None  # default: min for val_loss, max for val_acc

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        return {"epoch": value} if isinstance(value, str) else value

    @property
    def direction(self) -> str:
        return self.mode or ("min" if self.monitor == "val_loss" else "max")
