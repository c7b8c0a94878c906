"""Specs read from a recipe file that point outside it: a model (architecture, user code, weights file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field, PrivateAttr, model_validator

from runner.errors import Issue
from runner.recipe.base import Spec
from runner.recipe.locate import dotted, located_issue


class FromRecipeFile(Spec):
    """A spec that knows the recipe file it was read from (validation context `source`): for paths
    relative to the recipe, modules next to it, and errors found at run time located in it. None for
    a spec read back from an artifact."""

    _source: Any = PrivateAttr(default=None)

    def model_post_init(self, context: Any) -> None:
        if isinstance(context, dict):
            self._source = context.get("source")

    @property
    def recipe_dir(self) -> Path | None:
        return Path(self._source.file).resolve().parent if self._source is not None else None

    def relative_path(self, value: str) -> Path:
        """`value` as written in the recipe: `~` expanded, relative to the recipe file's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() or self.recipe_dir is None else self.recipe_dir / path


class ModelSpec(FromRecipeFile):
    """The architecture (one of `name`, `import`, `torchvision`, `timm`) with its `args`, and optionally
    the trained `weights` the run starts from."""

    _where: tuple = PrivateAttr(default=("model",))  # its place in the recipe, for errors found at run time
    teaches: ClassVar[bool] = False  # a distillation teacher (TeacherModel): its class-count errors say so

    name: str | None = None  # a model of nnopt's registry (`nnopt list`)
    import_: Annotated[str | None, Field(alias="import", pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")] = None
    torchvision: str | None = None  # a torchvision.models builder: resnet18, mobilenet_v3_small, ...
    timm: str | None = None  # a timm model name (needs the `timm` extra)
    args: dict[str, Any] = {}
    # A state dict file, a Lightning checkpoint (.ckpt) or an nnopt stage folder; relative to the recipe file.
    weights: Annotated[str, Field(min_length=1)] | None = None
    strict: bool = True  # false: load the tensors whose names and shapes match, keep the rest as built

    @model_validator(mode="after")
    def _one_source(self):
        given = [key for key in ("name", "import_", "torchvision", "timm") if getattr(self, key) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of `name` (a registered model), `import` (package.module:factory), "
                             "`torchvision` (a torchvision.models builder) or `timm` (a timm model name)")
        if not self.strict and self.weights is None:
            raise ValueError("`strict` applies to `weights`; give `weights: PATH` or drop `strict`")
        return self

    def weights_path(self) -> Path | None:
        return None if self.weights is None else self.relative_path(self.weights)

    def issue(self, field: tuple, message: str, hint: str | None = None) -> Issue:
        """A problem with `<where>.<field>` found after validation (at run start), located in the recipe."""
        path = self._where + tuple(field)
        if self._source is None:
            return Issue("model spec", None, None, dotted(path), message, hint)
        return located_issue(self._source, path, message, hint)

    def architecture(self) -> dict:
        """The spec as data that rebuilds the module tree: without the weights it started from
        (an artifact carries its own state dict)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"weights", "strict"})


class TeacherModel(ModelSpec):
    """A distillation teacher given as a model: its architecture and the trained `weights` it runs with."""

    teaches: ClassVar[bool] = True

    @model_validator(mode="after")
    def _trained(self):
        if self.weights is None:
            raise ValueError("a teacher model needs `weights:` (a file or an nnopt stage folder): with the weights "
                             "it was built with it would teach noise")
        return self
