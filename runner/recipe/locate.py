"""Turn pydantic's errors into located, readable issues with did-you-mean hints."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pydantic import BaseModel, ValidationError

from runner.errors import Issue
from runner.recipe.source import Source, shorten
from runner.registry import did_you_mean


def data_path(data: Any, loc: tuple) -> tuple:
    """Drop the discriminator tags pydantic puts in `loc` (`stages.1.train.lr` -> `stages.1.lr`)."""
    path: tuple = ()
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
            path += (part,)
        elif isinstance(node, list) and isinstance(part, int) and -len(node) <= part < len(node):
            node = node[part]
            path += (part,)
        elif isinstance(node, dict) and part in (node.get("kind"), node.get("name"), node.get("method")):
            continue  # a union tag, not a key
        elif isinstance(part, str) and " " in part:
            continue  # a callable discriminator's tag ("teacher model"): field names have no spaces
        else:
            path += (part,)  # a missing or extra key: keep it so the message names it
            node = None
    return path


def dotted(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def allowed_fields(root: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at `loc` (pydantic's loc, tags included), for did-you-mean."""
    models = [root]
    for part in loc:
        if isinstance(part, int):
            continue
        step = []
        for model in models:
            if part in model.model_fields:
                step += _models_in(model.model_fields[part].annotation)
        if not step:  # a discriminator tag selects the union member whose Literal matches it
            step = [m for m in models if any(
                typing.get_origin(f.annotation) is typing.Literal and part in typing.get_args(f.annotation)
                for f in m.model_fields.values())]
        models = step
    names = []
    for model in models:
        for name, info in model.model_fields.items():
            names.append(info.alias or name)
    return sorted(set(names))


def _message(error: dict, root: type[BaseModel], loc: tuple) -> tuple[str, str | None]:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "extra_forbidden":
        key = shorten(loc[-1], 60)
        choices = allowed_fields(root, loc[:-1])
        guess = did_you_mean(key, choices)
        return f"unknown field `{key}`", (guess + " " if guess else "") + "allowed: " + ", ".join(choices)
    if kind == "union_tag_invalid":
        expected = [t.strip().strip("'") for t in str(ctx.get("expected_tags", "")).split(",")]
        tag = shorten(ctx.get("tag"), 60)
        field = ctx.get("discriminator", "").strip("'")
        guess = did_you_mean(str(tag), expected)
        return f"unknown {field} `{tag}`", (guess + " " if guess else "") + "known: " + ", ".join(expected)
    if kind == "union_tag_not_found":
        field = ctx.get("discriminator", "").strip("'")
        return f"missing `{field}`", f"set `{field}` to choose the variant"
    if kind == "literal_error":
        expected = [e.strip().strip("'") for e in str(ctx.get("expected", "")).replace(" or ", ",").split(",") if e.strip()]
        given = shorten(error.get("input"), 60)
        return f"`{given}` is not allowed; expected one of: {', '.join(expected)}", did_you_mean(given, expected)
    if kind == "missing":
        return f"missing required field `{loc[-1]}`", None
    if kind == "value_error":
        return str(ctx.get("error", error["msg"])), None
    return error["msg"], None


def issues_from_validation(err: ValidationError, source: Source, root: type[BaseModel]) -> list[Issue]:
    issues = []
    for error in err.errors():
        loc = tuple(error["loc"])
        path = data_path(source.data, loc)
        message, hint = _message(error, root, loc)
        if error["type"] == "union_tag_invalid":
            path += (str(error.get("ctx", {}).get("discriminator", "")).strip("'"),)
        issues.append(located_issue(source, path, message, hint))
    return issues


__all__ = ["issues_from_validation", "data_path", "dotted", "allowed_fields"]


def issue_at(source: Source, path: tuple, message: str, hint: str | None = None) -> Issue:
    """An Issue at `path`, placed at the file and line that wrote it (the recipe, or a file it extends), its hint
    noting the override that set it, if one did."""
    file, line, column = source.where(path)
    if path in source.overridden:
        hint = f"set by override `{source.overridden[path]}`" + (f"; {hint}" if hint else "")
    return Issue(file, line, column, dotted(path), message, hint)


def located_issue(source: Source, path: tuple, message: str, hint: str | None = None) -> Issue:
    """`issue_at` with the field and message shortened: they may quote what a user wrote (pydantic's messages
    hold the input value)."""
    issue = issue_at(source, path, message, hint)
    return dataclasses.replace(issue, field=shorten(issue.field), message=shorten(message, 400))
