"""`-o key.path=value` overrides, applied to the raw recipe before validation."""

from __future__ import annotations

from typing import Any

from runner.errors import Issue, RecipeError
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
        node: Any = source.data
        path: tuple = ()
        for part in parts[:-1]:
            step = _step(node, part, text, source.file)
            if isinstance(node, list) and not -len(node) <= step < len(node):
                raise _override_error(source.file, text, f"index {step} is out of range")
            if isinstance(node, dict) and step not in node:
                node[step] = {}
            node = node[step]
            path += (step,)
        last = _step(node, parts[-1], text, source.file)
        if isinstance(node, list) and not -len(node) <= last < len(node):
            raise _override_error(source.file, text, f"index {last} is out of range")
        node[last] = value
        source.overridden[path + (last,)] = shorten(text)
    return source
