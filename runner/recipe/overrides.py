"""`-o key.path=value` overrides, applied to the raw recipe before validation."""

from __future__ import annotations

from typing import Any

import yaml

from runner.errors import Issue, RecipeError
from runner.recipe.source import Source


def _step(node: Any, part: str, text: str, file: str) -> Any:
    """Resolve one path part: a mapping key, a list index, or a stage's name inside `stages`."""
    if isinstance(node, list):
        if part.lstrip("-").isdigit():
            return int(part)
        for i, item in enumerate(node):
            if isinstance(item, dict) and item.get("name") == part:
                return i
        names = [str(item.get("name")) for item in node if isinstance(item, dict)]
        raise RecipeError([Issue(file, None, None, "", f"override `{text}`: no list item named `{part}`",
                                 f"use an index or one of: {', '.join(names)}")])
    if isinstance(node, dict):
        return part
    raise RecipeError([Issue(file, None, None, "", f"override `{text}`: `{part}` is inside a value, not a mapping")])


def apply_overrides(source: Source, overrides: list[str]) -> Source:
    """Set each `a.b.c=value` (value parsed as YAML) and remember it, for error messages."""
    for text in overrides:
        key, sep, raw_value = text.partition("=")
        if not sep or not key.strip():
            raise RecipeError([Issue(source.file, None, None, "", f"override `{text}` is not `key.path=value`",
                                     "example: -o stages.train.epochs=3")])
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else ""
        except yaml.YAMLError as err:
            raise RecipeError([Issue(source.file, None, None, "", f"override `{text}`: cannot parse value: {err}")]) from None
        parts = key.strip().split(".")
        node: Any = source.data
        path: tuple = ()
        for part in parts[:-1]:
            step = _step(node, part, text, source.file)
            if isinstance(node, list) and not -len(node) <= step < len(node):
                raise RecipeError([Issue(source.file, None, None, "", f"override `{text}`: index {step} is out of range")])
            if isinstance(node, dict) and step not in node:
                node[step] = {}
            node = node[step]
            path += (step,)
        last = _step(node, parts[-1], text, source.file)
        if isinstance(node, list) and not -len(node) <= last < len(node):
            raise RecipeError([Issue(source.file, None, None, "", f"override `{text}`: index {last} is out of range")])
        node[last] = value
        source.overridden[path + (last,)] = text
    return source
