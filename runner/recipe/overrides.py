"""`-o key.path=value` overrides, applied to the raw recipe before validation."""

from __future__ import annotations

import typing
from types import NoneType, UnionType
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from runner.errors import Issue, RecipeError
from runner.recipe.schema import Recipe
from runner.recipe.source import Source, parse_value, shorten


def _override_error(file: str, text: str, message: str, hint: str | None = None) -> RecipeError:
    return RecipeError([Issue(file, None, None, "", f"override `{shorten(text)}`: {message}", hint)])


def _step(node: Any, part: str, text: str, file: str) -> Any:
    """Resolve one path part: a mapping key, a list index, or a stage's name inside `stages`."""
    if isinstance(node, list):
        if part.lstrip("-").isdigit():
            if len(part) > 9:  # no recipe has a billion stages; converting a huge digit string is itself hostile
                raise _override_error(file, text, f"index {shorten(part, 20)} is out of range")
            return int(part)
        for i, item in enumerate(node):
            if isinstance(item, dict) and item.get("name") == part:
                return i
        names = [shorten(item.get("name"), 40) for item in node if isinstance(item, dict)]
        raise _override_error(file, text, f"no list item named `{shorten(part, 40)}`",
                              f"use an index or one of: {', '.join(names)}")
    if isinstance(node, dict):
        return part
    raise _override_error(file, text, f"`{shorten(part, 40)}` is inside a value, not a mapping")


def _members(annotation: Any) -> list[Any]:
    """The types a value of `annotation` may take: unions flattened, `Annotated` and None dropped."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, UnionType):
        return [member for arg in typing.get_args(annotation) for member in _members(arg)]
    return [] if annotation is NoneType else [annotation]


def fits(model: type[BaseModel], node: dict) -> bool:
    """Whether `node`'s values agree with every Literal field of `model` it sets: the discriminators that pick
    a union's variant (`kind: quantize`, then `method: qat` inside it)."""
    return all(node[name] in typing.get_args(info.annotation) for name, info in model.model_fields.items()
               if typing.get_origin(info.annotation) is Literal and name in node)


def child_types(types: list[Any], node: Any, key: Any) -> tuple[list[Any], FieldInfo | None]:
    """The types `node[key]` may take, given those `node` may take, and its field when one model holds it."""
    members = [member for annotation in types for member in _members(annotation)]
    if isinstance(node, list):
        return [typing.get_args(m)[0] for m in members if typing.get_origin(m) is list], None
    models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel) and fits(m, node)]
    if len(models) == 1:
        field = next((info for name, info in models[0].model_fields.items() if key in (name, info.alias)), None)
        return ([field.annotation] if field else []), field
    return [typing.get_args(m)[1] for m in members if typing.get_origin(m) is dict], None


def _new_block(field: FieldInfo | None) -> dict:
    """What a block the recipe leaves out starts from when an override sets a field inside it: a discriminated
    union's default as written in the schema (`loss` is `{name: cross_entropy}`), so `-o ...loss.label_smoothing=0.1`
    changes one field of it; any other block starts empty, its fields taking their defaults at validation."""
    if field is None or field.discriminator is None or not isinstance(field.default, BaseModel):
        return {}
    block = field.default.model_dump(mode="json", by_alias=True, exclude_unset=True)
    if isinstance(field.discriminator, str):
        block[field.discriminator] = getattr(field.default, field.discriminator)
    return block


def apply_overrides(source: Source, overrides: list[str]) -> Source:
    """Set each `a.b.c=value` (value parsed as YAML) and remember it, for error messages."""
    for text in overrides:
        key, sep, raw_value = text.partition("=")
        if not sep or not key.strip():
            raise RecipeError([Issue(source.file, None, None, "", f"override `{shorten(text)}` is not `key.path=value`",
                                     "example: -o stages.train.epochs=3")])
        try:
            value = parse_value(raw_value, f"override `{shorten(text)}`") if raw_value.strip() else ""
        except RecipeError as err:  # the value's own problem, located in the override rather than in a file
            raise _override_error(source.file, text, err.issues[0].message, err.issues[0].hint) from None
        parts = key.strip().split(".")
        if parts[0] == "extends":
            raise _override_error(source.file, text, "`extends` is read with the file, before overrides apply",
                                  "edit the recipe file, or run the recipe it extends with these overrides")
        node: Any = source.data
        node_types: list[Any] = [Recipe]  # what `node` may be, to start a missing block from its default
        path: tuple = ()
        for part in parts[:-1]:
            step = _step(node, part, text, source.file)
            if isinstance(node, list) and not -len(node) <= step < len(node):
                raise _override_error(source.file, text, f"index {step} is out of range")
            node_types, field = child_types(node_types, node, step)
            if isinstance(node, dict) and step not in node:
                node[step] = _new_block(field)
            node = node[step]
            path += (step,)
        last = _step(node, parts[-1], text, source.file)
        if isinstance(node, list) and not -len(node) <= last < len(node):
            raise _override_error(source.file, text, f"index {last} is out of range")
        node[last] = value
        source.overridden[path + (last,)] = shorten(text)
    return source
