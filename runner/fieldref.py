"""The recipe field reference, generated from the schema: `nnopt docs KIND`, `nnopt list --args` and runner/docs/reference.md.

Types, defaults and constraints come from the pydantic specs; each field's meaning is the comment
written next to it in the spec's source (or above it), and each section's text is the spec's
docstring. The reference therefore cannot drift from what `nnopt validate` accepts.
"""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from runner.recipe.base import Spec, variants


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    default: str  # "required", or the default as YAML-ish text
    meaning: str


@dataclass(frozen=True)
class Section:
    key: str  # what `nnopt docs KEY` takes: `trainer`, `prune`, `quantize.static_int8`, `sgd`, ...
    title: str
    spec: type[Spec]

    @property
    def summary(self) -> str:
        return inspect.cleandoc(self.spec.__doc__ or "").split("\n\n")[0].replace("\n", " ")


@cache
def _comments(cls: type) -> dict[str, str]:
    """Field name -> the comment on its line (or the comment block right above it) in `cls`'s source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    by_line: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            by_line[token.start[0]] = token.string.lstrip("#").strip()
    found = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            trailing = [by_line[n] for n in range(node.lineno, node.end_lineno + 1) if n in by_line]
            above, n = [], node.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, by_line.get(n, ""))
                n -= 1
            found[node.target.id] = " ".join(above + trailing)
    return found


def _meaning(spec: type[BaseModel], name: str) -> str:
    info = spec.model_fields[name]
    if info.description:
        return info.description
    for cls in spec.__mro__:  # a subclass may inherit the field and its comment
        if isinstance(cls, type) and issubclass(cls, BaseModel) and name in _comments(cls):
            return _comments(cls)[name]
    return ""


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "length >=", "max_length": "length <="}


def type_text(annotation: Any) -> str:
    """A short, human form of a field's type: `float > 0`, `sgd | adam`, `list[str]`, `Moment`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        # `Field(gt=0)` inside a union stays a FieldInfo holding annotated_types constraints (Gt, MinLen, ...)
        metas = [m for meta in args[1:] for m in ([meta, *meta.metadata] if isinstance(meta, FieldInfo) else [meta])]
        bounds = [f"{_BOUNDS[key]} {getattr(meta, key)}" for meta in metas for key in _BOUNDS
                  if getattr(meta, key, None) is not None]
        discriminated = any(getattr(meta, "discriminator", None) for meta in metas)
        inner = " | ".join(cls.__name__ for cls in variants(annotation)) if discriminated else type_text(args[0])
        return f"{inner} {' '.join(bounds)}".strip() if bounds else inner
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is Union or str(origin) == "<class 'types.UnionType'>" or type(annotation).__name__ == "UnionType":
        return " | ".join("null" if a is type(None) else type_text(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_text(a) for a in args if a is not Ellipsis)}]"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(info) -> str:
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if value is PydanticUndefined:
        return ""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip().removesuffix("\n...").strip()


def fields(spec: type[BaseModel]) -> list[Field]:
    return [Field(info.alias or name, type_text(info.rebuild_annotation() if hasattr(info, "rebuild_annotation")
                                                 else info.annotation),
                  _default_text(info), _meaning(spec, name))
            for name, info in spec.model_fields.items()]


def _tag(spec: type[BaseModel], field: str) -> str | None:
    """The one value a discriminator field takes in this variant (`kind: prune`), else None."""
    info = spec.model_fields.get(field)
    if info is not None and typing.get_origin(info.annotation) is Literal and len(typing.get_args(info.annotation)) == 1:
        return str(typing.get_args(info.annotation)[0])
    return None


@cache
def sections() -> tuple[Section, ...]:
    """Every documented spec, in reading order: the recipe, its blocks, the stage kinds, then the variants."""
    from runner.recipe import schema, training
    from runner.recipe.expect import Expect
    from runner.recipe.stages import Stage

    found = [Section("recipe", "The recipe (top level)", schema.Recipe), Section("model", "model", schema.ModelSpec),
             Section("data", "data", schema.DataSpec), Section("trainer", "trainer", schema.TrainerSpec),
             Section("expect", "expect", Expect)]
    for stage in variants(Stage):
        kind, method = _tag(stage, "kind"), _tag(stage, "method")
        key = f"{kind}.{method}" if method else kind
        found.append(Section(key, f"stage `{kind}`" + (f", method `{method}`" if method else ""), stage))
    for union, what in ((training.Optimizer, "optimizer"), (training.Schedule, "schedule"), (training.Loss, "loss")):
        found += [Section(_tag(cls, "name"), f"{what} `{_tag(cls, 'name')}`", cls) for cls in variants(union)]
    # The blocks nested in the sections above, once each, under the path where they first appear
    # (`trainer.checkpoint`, `train.gradual_pruning`, `train.gradual_pruning.start`, ...).
    seen = {section.spec for section in found}
    queue = list(found)
    while queue:
        parent = queue.pop(0)
        for name, info in parent.spec.model_fields.items():
            for nested in _specs_in(info.annotation):
                if nested not in seen:
                    seen.add(nested)
                    key = f"{parent.key}.{info.alias or name}"
                    queue.append(Section(key, f"`{key}` ({nested.__name__})", nested))
                    found.append(queue[-1])
    return tuple(found)


def _specs_in(annotation: Any) -> list[type[Spec]]:
    if isinstance(annotation, type) and issubclass(annotation, Spec):
        return [annotation]
    return [spec for arg in typing.get_args(annotation) for spec in _specs_in(arg)]


def find(key: str) -> list[Section]:
    """The sections `nnopt docs KEY` shows: an exact key, or every method of a stage kind (`quantize`)."""
    matches = [s for s in sections() if s.key == key] or [s for s in sections() if s.key.startswith(key + ".")]
    return matches


def markdown(section: Section) -> str:
    doc = inspect.cleandoc(section.spec.__doc__ or "")
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{f.name}` | {_cell(f.type)} | {_cell(f.default)} | {_cell(f.meaning)} |" for f in fields(section.spec)]
    return "\n".join([f"### {section.title}", "", f"`nnopt docs {section.key}`" + (f": {doc}" if doc else ""), "",
                      *rows, ""])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_page() -> str:
    """runner/docs/reference.md: every section, as `nnopt docs --all` prints it."""
    head = ["# Recipe field reference", "",
            "Generated by `nnopt docs --all > runner/docs/reference.md` from the recipe schema; "
            "tests/test_docs.py fails when this page and the schema disagree. Every block rejects unknown keys.", ""]
    return "\n".join(head + [markdown(section) for section in sections()])


def signature_text(factory) -> str:
    """A registered factory's arguments as a recipe's `args` takes them: `hidden, in_features=784, ...`."""
    parts = []
    for parameter in inspect.signature(factory).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        default = parameter.default
        parts.append(parameter.name if default is inspect.Parameter.empty else f"{parameter.name}={default!r}")
    return ", ".join(parts)


def spec_arguments(spec: type[BaseModel], tag: str) -> str:
    """A spec's fields besides its tag and name, `required` ones marked: `lr (required), momentum=0.0, ...`."""
    shown = []
    for field in fields(spec):
        if field.name in (tag, "name", "kind"):
            continue
        shown.append(f"{field.name} (required)" if field.default == "required" else f"{field.name}={field.default}")
    return ", ".join(shown)


def registry_rows() -> list[tuple[str, str, str]]:
    """(registry, name, arguments) for `nnopt list --args`: models and data sets from their factories'
    signatures, stage kinds, optimizers, schedules and losses from their specs."""
    from runner.data import DATASETS
    from runner.models import MODELS

    rows = [("model", name, signature_text(MODELS.get(name))) for name in MODELS.names()]
    rows += [("data set", name, signature_text(DATASETS.get(name))) for name in DATASETS.names()]
    for section in sections():
        what = section.title.split(" ")[0]
        if what in ("stage", "optimizer", "schedule", "loss"):
            rows.append((what, section.key, spec_arguments(section.spec, "method" if "." in section.key else "name")))
    return rows
