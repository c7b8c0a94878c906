"""The recipes shipped with nnopt as templates: list them (`nnopt recipes`) and copy one (`nnopt new`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml

from runner.errors import RunError

PACKAGE = "nnopt.recipes"  # recipes/ of the source tree, installed as package data (pyproject.toml)
_NAME_LINE = re.compile(r"^name:.*$", re.MULTILINE)
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Template:
    name: str  # the file name without .yaml, which is also the recipe's `name`
    description: str
    text: str


def shipped() -> list[Template]:
    """Every shipped recipe, by name."""
    found = []
    for entry in sorted(resources.files(PACKAGE).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            text = entry.read_text(encoding="utf-8")
            found.append(Template(entry.name.removesuffix(".yaml"), yaml.safe_load(text).get("description", ""), text))
    return found


def find(name: str) -> Template:
    by_name = {t.name: t for t in shipped()}
    if name.removesuffix(".yaml") not in by_name:
        import difflib

        close = difflib.get_close_matches(name, list(by_name), n=1)
        raise RunError(f"no shipped recipe `{name}`",
                       (f"did you mean `{close[0]}`? " if close else "") + "`nnopt recipes` lists them")
    return by_name[name.removesuffix(".yaml")]


def extended_by(template: Template) -> list[Template]:
    """The shipped recipes `template` extends (`extends:`), nearest first: a shipped recipe extends a sibling file."""
    chain: list[Template] = []
    current = template
    while (extends := yaml.safe_load(current.text).get("extends")) is not None:
        current = find(Path(extends["file"] if isinstance(extends, dict) else extends).name)
        if current in chain or current == template:  # a loop: `nnopt validate` of the copy says where
            break
        chain.append(current)
    return chain


def new_recipe(name: str, source: str, folder: Path = Path(".")) -> tuple[Path, list[Path]]:
    """Copy the shipped recipe `source` to `folder/NAME.yaml` with its `name:` set to NAME (its comments kept),
    and the shipped recipes it extends under their own names, so the copy is whole; never overwrites a file
    (a parent already there with the shipped text is used as it is). Returns the copy and the parents written."""
    if not _SLUG.match(name):
        raise RunError(f"`{name}` cannot be a recipe name", "use letters, digits, `.`, `_` and `-` (it names the "
                       "output folder), starting with a letter or digit")
    template = find(source)
    target = Path(folder) / f"{name}.yaml"
    if target.exists():
        raise RunError(f"{target} already exists", "choose another name or remove the file")
    parents = []
    for parent in extended_by(template):
        path = Path(folder) / f"{parent.name}.yaml"
        if not path.exists():
            parents.append((path, parent.text))
        elif path.read_text(encoding="utf-8") != parent.text:
            raise RunError(f"{path} already exists and is not the shipped `{parent.name}` that `{template.name}` "
                           "extends", "copy into another --dir, or remove the file")
    # Its "Run: nnopt run recipes/X.yaml" comment now names the copy.
    text = template.text.replace(f"recipes/{template.name}.yaml", target.name)
    text, count = _NAME_LINE.subn(f"name: {name}", text, count=1)
    if count != 1:
        raise RunError(f"the shipped recipe `{source}` has no top-level `name:` line to rename")
    for path, parent_text in parents:
        path.write_text(parent_text, encoding="utf-8")
    target.write_text(text, encoding="utf-8")
    return target, [path for path, _ in parents]
