"""The base every recipe spec derives from: strict, immutable data with no torch in sight."""

from __future__ import annotations

import typing
from typing import Annotated, ClassVar, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

import runner.recipe.states as states


class Spec(BaseModel):
    """Unknown keys are errors (a typo must never be silently ignored); so are infinite and NaN numbers,
    which no field means (`lr: .inf` would train to NaN)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    # A stage spec that trains sets this: under a multi-process strategy every rank runs it, while
    # any other stage runs on global rank 0 and its resulting model is sent to the others.
    runs_on_every_rank: ClassVar[bool] = False
    # A stage spec lists the metrics its stage writes (runner.recipe.metrics); `expect` and the report read them.
    stage_metrics: ClassVar[tuple] = ()

    # A stage spec says which model forms (runner.recipe.states) it can take, and the form it hands on
    # (None: the form it was given); `validate` walks the recipe through them.
    model_accepts: ClassVar[frozenset[str]] = states.ANY
    model_produces: ClassVar[str | None] = None

    def declared_metrics(self) -> tuple:
        return type(self).stage_metrics

    def accepted_models(self) -> frozenset[str]:
        return type(self).model_accepts


def variants(union) -> list[type]:
    """The spec classes of an `Annotated[Union[...], Field(discriminator=...)]` (or of a single class)."""
    inner = typing.get_args(union)[0] if typing.get_origin(union) is Annotated else union
    if typing.get_origin(inner) is Union:
        return [cls for member in typing.get_args(inner) for cls in variants(member)]
    return [inner]


def tag_values(union, field: str) -> list[str]:
    """The values the discriminator `field` takes across a union's variants, in declaration order."""
    values: list[str] = []
    for cls in variants(union):
        annotation = cls.model_fields[field].annotation
        values += [v for v in typing.get_args(annotation) if typing.get_origin(annotation) is Literal and v not in values]
    return values


# A name that is safe as a folder name: it can never climb out of the output folder.
Slug = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", min_length=1)]


def _addressable(name: str) -> str:
    if "." in name:
        raise ValueError(f"a stage name cannot contain `.`: `expect` names a stage's metric as `stage.metric` and "
                         f"`-o` a field as `stages.stage.field`, so `{name}` could not be addressed; use `_` or `-`")
    return name


StageName = Annotated[Slug, AfterValidator(_addressable)]
PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]


def check_sparsity(value: float | dict[str, float]) -> float | dict[str, float]:
    """One message for both forms (a union's per-branch errors would confuse)."""
    for key, target in (value.items() if isinstance(value, dict) else [("", value)]):
        if not 0 <= target < 1:
            raise ValueError(f"sparsity{f' of `{key}`' if key else ''} must be in [0, 1) (the fraction removed), "
                             f"got {target}")
    if isinstance(value, dict) and not value:
        raise ValueError("give at least one `pattern: sparsity` entry")
    return value


Sparsity = Annotated[float | dict[str, float], AfterValidator(check_sparsity)]
