"""`extends:`: a recipe built on another recipe file, merged into one tree whose every node keeps its file and line."""

from __future__ import annotations

import copy
import dataclasses
import os
import typing
from pathlib import Path
from types import UnionType
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from runner.errors import RecipeError
from runner.recipe.base import Spec
from runner.recipe.locate import issues_from_validation, located_issue
from runner.recipe.overrides import child_types, fits
from runner.recipe.schema import Extends, Recipe
from runner.recipe.source import Path_, Source, read_source, shorten
from runner.registry import did_you_mean

# A child's own fields: `name` names the output folder (two recipes in one folder would replace each other's
# stages), `description` and `expect` describe what this recipe measures; `extends` was the parent's own link.
OWN_FIELDS = ("extends", "name", "description", "expect")
REPLACE, REMOVE, AFTER, BEFORE = "_replace_", "_remove_", "_after_", "_before_"  # merge instructions, never fields
_ABSENT = object()  # the parent has nothing at this path
MAX_CHAIN = 32  # recipes extending recipes: a real project has two or three; each level is a recursion


class _Head(Spec):
    """The one field read before the merge."""

    extends: Extends


def read_recipe(path: str | Path) -> Source:
    """A recipe file with what it extends merged in: the tree that is validated, run and recorded."""
    return resolve_extends(read_source(path))


def resolve_extends(source: Source, chain: tuple[tuple[str, str], ...] = ()) -> Source:
    """`source` merged over the recipe its `extends:` names (itself resolved first); `source` if it extends none."""
    if source.data.get("extends") is None:  # `extends: null` too: a recipe of its own
        return source
    try:
        head = _Head.model_validate({"extends": source.data["extends"]}).extends
    except ValidationError as err:
        issues = issues_from_validation(err, Source(source.file, {"extends": source.data["extends"]},
                                                    grafts={(): (source, ())}), _Head)
        form = "write `extends: parent.yaml` or `extends: {file: parent.yaml, inherit: [expect]}`"
        raise RecipeError([dataclasses.replace(issue, hint=issue.hint or form) for issue in issues]) from None
    chain = chain + ((_identity(source.file), source.file),)  # (the file, as shown) of each recipe read so far
    folder = Path.cwd() if source.file.startswith("<") else Path(source.file).parent  # a dict recipe: the cwd
    parent_file = os.path.normpath(folder / Path(head.file).expanduser())
    reached = [identity for identity, _ in chain]
    if len(chain) >= MAX_CHAIN:
        raise _error(source, ("extends", "file"), f"more than {MAX_CHAIN} recipes extend one another here",
                     "extend a recipe that holds what the chain shares instead")
    if _identity(parent_file) in reached:
        loop = " extends ".join([shown for _, shown in chain[reached.index(_identity(parent_file)):]] + [parent_file])
        raise _error(source, ("extends", "file"), f"the recipes extend each other in a loop: {loop}",
                     "a recipe extends a more general one, which must not extend it back")
    if not Path(parent_file).is_file():
        what = ("does not exist" if not Path(parent_file).exists()
                else "is a folder" if Path(parent_file).is_dir() else "is not a regular file")
        raise _error(source, ("extends", "file"), f"the recipe it extends, {shorten(parent_file)}, {what}",
                     f"the path is relative to this recipe's folder ({folder}); give a .yaml recipe file")
    parent = resolve_extends(read_source(parent_file), chain)
    if "name" not in source.data:
        raise _error(source, ("extends",), "a recipe that extends another needs its own `name:`",
                     f"the name is its output folder; `{shorten(parent.data.get('name'), 60)}` is the parent's")
    inherited = {key: value for key, value in parent.data.items()
                 if key not in OWN_FIELDS or key in head.inherit}
    data, grafts = _Merge(parent, source).value(inherited, source.data, (), (), [Recipe])
    return Source(source.file, copy.deepcopy(data), grafts=grafts)  # overrides then edit it, never the files' trees


def _identity(file: str) -> str:
    """The file as one name whatever path reached it; a dict recipe's label as it is."""
    return file if file.startswith("<") else str(Path(file).resolve())


def _error(source: Source, path: Path_, message: str, hint: str | None = None) -> RecipeError:
    return RecipeError([located_issue(source, path, message, hint)])


def _discriminators(types: list[Any], field: FieldInfo | None, parent: dict) -> set[str]:
    """The keys that pick the variant of a union `parent` is: an optimizer's `name` (on its field), a stage's
    `kind`, then a quantize stage's `method` (only when the parent is one of that inner union's variants)."""
    keys = {field.discriminator} if field is not None and isinstance(field.discriminator, str) else set()

    def visit(annotation: Any) -> bool:  # whether some variant of `annotation` fits the parent
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            inner, *extras = typing.get_args(annotation)
            fitting = visit(inner)
            if fitting:
                keys.update(extra.discriminator for extra in extras
                            if isinstance(getattr(extra, "discriminator", None), str))
            return fitting
        if origin in (typing.Union, UnionType):
            return any([visit(arg) for arg in typing.get_args(annotation)])  # a list: every member visited
        return isinstance(annotation, type) and issubclass(annotation, BaseModel) and fits(annotation, parent)

    for annotation in types:
        visit(annotation)
    return keys


class _Merge:
    """The child's tree over the parent's, with each merged node's origin (Source.grafts) relative to the node."""

    def __init__(self, parent: Source, child: Source):
        self.parent, self.child = parent, child

    def value(self, parent: Any, child: Any, parent_path: Path_, child_path: Path_, types: list[Any],
              field: FieldInfo | None = None) -> tuple[Any, dict]:
        """The merged value at one node and the grafts under it (paths relative to the node)."""
        grafts: dict = {(): (self.child, child_path)}
        if not isinstance(child, dict):
            if child_path == ("stages",) and isinstance(parent, list) and isinstance(child, list):
                return self._stages(parent, child, types)
            return child, grafts  # a scalar or list replaces the parent's whole
        replace = child.get(REPLACE, False)
        if replace is not False and replace is not True:
            raise _error(self.child, child_path + (REPLACE,), f"`{REPLACE}` takes true, got {shorten(replace, 40)}",
                         "`_replace_: true` puts this block in place of the parent's instead of merging into it")
        if isinstance(parent, dict) and any(key in child and key in parent and child[key] != parent[key]
                                            for key in _discriminators(types, field, parent)):
            replace = True  # another variant: the parent's fields belong to the variant it had
        if not isinstance(parent, dict) or replace:
            parent = {}
        merged = {}
        for key, parent_value in parent.items():
            if key not in child:
                merged[key] = parent_value
                grafts[(key,)] = (self.parent, parent_path + (key,))
        for key, child_value in child.items():
            if key == REPLACE:
                continue
            inner_types, inner_field = child_types(types, {**parent, **child}, key)
            merged[key], inner = self.value(parent.get(key, _ABSENT), child_value, parent_path + (key,),
                                            child_path + (key,), inner_types, inner_field)
            grafts.update({(key,) + path: graft for path, graft in inner.items()})
        return _in_parent_order(merged, parent), grafts

    def _stages(self, parent: list, child: list, types: list[Any]) -> tuple[list, dict]:
        """`stages` merged by name: a parent's stage keeps its place unless moved; a new one is appended or placed."""
        slots = [(item.get("name") if isinstance(item, dict) else None, item, (self.parent, ("stages", i)), {})
                 for i, item in enumerate(parent)]  # name, value, its origin, grafts inside it
        item_types, _ = child_types(types, parent, 0)
        seen: set[str] = set()
        for k, item in enumerate(child):
            path = ("stages", k)
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str):
                raise _error(self.child, path, "a stage of a recipe that extends another needs a `name`",
                             "the name says which of the parent's stages it changes, or names a new one")
            if name in seen:
                raise _error(self.child, path + ("name",), f"stage `{shorten(name, 40)}` is listed twice",
                             "give each stage once, with every field it changes")
            seen.add(name)
            names = [slot[0] for slot in slots]
            if REMOVE in item:
                slots.pop(self._index(names, name, path + ("name",), "remove"))
                if item[REMOVE] is not True or set(item) != {"name", REMOVE}:
                    raise _error(self.child, path + (REMOVE,), f"`{REMOVE}` takes true and no other field but `name`",
                                 f"`{{name: {shorten(name, 40)}, {REMOVE}: true}}` drops the parent's stage")
                continue
            place = [key for key in (AFTER, BEFORE) if key in item]
            if len(place) > 1:
                raise _error(self.child, path + (BEFORE,), f"give `{AFTER}` or `{BEFORE}`, not both")
            fields = {key: value for key, value in item.items() if key not in (AFTER, BEFORE)}
            if name in names:
                index = names.index(name)
                _, parent_item, (_, parent_path), _ = slots[index]
                value, grafts = self.value(parent_item, fields, parent_path, path, item_types)
                slots[index] = (name, value, (self.child, path), grafts)
            else:
                value, grafts = self.value(_ABSENT, fields, path, path, item_types)
                index = len(slots)
                slots.append((name, value, (self.child, path), grafts))
            if place:
                target = item[place[0]]
                moved = slots.pop(index)
                others = [slot[0] for slot in slots]
                at = self._index(others, target, path + (place[0],), "place it " + place[0].strip("_"))
                slots.insert(at + (place[0] == AFTER), moved)
        stages, grafts = [], {(): (self.child, ("stages",))}
        for i, (_, value, origin, inner) in enumerate(slots):
            stages.append(value)
            grafts[(i,)] = origin
            grafts.update({(i,) + path: graft for path, graft in inner.items() if path})
        return stages, grafts

    def _index(self, names: list, name: Any, path: Path_, doing: str) -> int:
        if name in names:
            return names.index(name)
        known = [str(n) for n in names if isinstance(n, str)]
        guess = did_you_mean(str(name), known)
        raise _error(self.child, path, f"no stage `{shorten(name, 40)}` to {doing}",
                     (guess + " " if guess else "") + "the stages so far: " + ", ".join(known))


def _in_parent_order(merged: dict, parent: dict) -> dict:
    """The parent's keys first, in its order, then the child's new ones: in a pattern map (`sparsity: {"fc*": 0.9}`,
    `bits`) a later pattern wins, so one the child adds wins over the parent's where both match."""
    return {**{key: merged[key] for key in parent if key in merged}, **merged}


__all__ = ["read_recipe", "resolve_extends", "OWN_FIELDS"]
