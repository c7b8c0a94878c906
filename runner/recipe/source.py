"""Read a recipe file into plain data plus a map from each field path to its line and column."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from runner.errors import Issue, RecipeError

Path_ = tuple  # a field path such as ("stages", 1, "optimizer", "lr")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that also refuses duplicate keys (PyYAML silently keeps the last one)."""


MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_NUMBER_CHARS = 100  # a longer number is hostile; Python refuses to convert over 4300 digits, with a traceback


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == MERGE_TAG:  # `<<: *base`: its keys are defaults that the mapping's own keys override
            continue
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key `{shorten(key)}` (first at line {seen[key].start_mark.line + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)  # SafeLoader flattens the merge keys here


def _bounded(construct):
    """A number constructor that refuses absurdly long digit strings before converting them."""
    def bounded(loader: _StrictLoader, node: yaml.ScalarNode):
        if len(node.value) > MAX_NUMBER_CHARS:
            raise yaml.constructor.ConstructorError(
                None, None, f"a number of {len(node.value)} characters; numbers in a recipe have at most "
                f"{MAX_NUMBER_CHARS}", node.start_mark)
        return construct(loader, node)
    return bounded


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_StrictLoader.add_constructor("tag:yaml.org,2002:int", _bounded(yaml.SafeLoader.construct_yaml_int))
_StrictLoader.add_constructor("tag:yaml.org,2002:float", _bounded(yaml.SafeLoader.construct_yaml_float))

MAX_SHOWN = 120  # characters of a user's value shown in a message: a 5 MB value is cut, not echoed


def shorten(value: Any, limit: int = MAX_SHOWN) -> str:
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass
class Source:
    """A loaded recipe: its data, where it came from, and the position of every node. A recipe built on
    another (`extends:`, runner/recipe/inherit.py) holds nodes of several files: `grafts` maps a node's path
    to the file's Source and the path it has there."""

    file: str
    data: Any
    marks: dict[Path_, tuple[int, int]] = field(default_factory=dict)  # 1-based line, column
    overridden: dict[Path_, str] = field(default_factory=dict)  # path -> the `-o` text that set it
    grafts: dict[Path_, tuple["Source", Path_]] = field(default_factory=dict)

    def where(self, path: Path_) -> tuple[str, int | None, int | None]:
        """The file, line and column of the longest prefix of `path` present in the recipe."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.grafts:
                source, there = self.grafts[path[:end]]
                return source.where(there + path[end:])
            if path[:end] in self.marks:
                return (self.file, *self.marks[path[:end]])
        return self.file, None, None


def _index_marks(node: yaml.Node, path: Path_, out: dict) -> None:
    out.setdefault(path, (node.start_mark.line + 1, node.start_mark.column + 1))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = path + (key_node.value,)
            # The key's position is where a user looks for the field, so it wins over the value's.
            out[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _index_marks(value_node, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index_marks(item, path + (i,), out)


MAX_DEPTH = 64  # a real recipe nests about 6 levels; anything near Python's recursion limit is hostile
MAX_NODES = 200_000  # counted with aliases expanded: `&a [*b, *b, ...]` chains grow exponentially


def _check_shape(node: yaml.Node, file: str) -> None:
    """Refuse absurd nesting and alias bombs before anything walks the tree recursively."""
    stack, visited = [(node, 1)], 0
    while stack:
        current, depth = stack.pop()
        visited += 1
        if depth > MAX_DEPTH:
            raise _file_issue(file, f"the recipe nests more than {MAX_DEPTH} levels deep", None, current.start_mark)
        if visited > MAX_NODES:
            raise _file_issue(file, f"the recipe has more than {MAX_NODES} values (counting YAML aliases expanded)",
                              "write values out instead of nesting aliases", current.start_mark)
        if isinstance(current, yaml.MappingNode):
            stack.extend((child, depth + 1) for pair in current.value for child in pair)
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((child, depth + 1) for child in current.value)


def _file_issue(file: str, message: str, hint: str | None = None, mark=None) -> RecipeError:
    line = mark.line + 1 if mark is not None else None
    column = mark.column + 1 if mark is not None else None
    return RecipeError([Issue(file, line, column, "", message, hint)])


def _parse(text: str, file: str, empty: RecipeError | None) -> tuple[Any, yaml.Node | None]:
    """YAML text as data and its root node, with the same limits for a file and for an `-o` value."""
    try:
        loader = _StrictLoader(text)
    except yaml.YAMLError as err:  # the reader refuses control characters before parsing starts
        raise _file_issue(file, f"cannot read YAML: {err}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            if empty is not None:
                raise empty
            return None, None
        _check_shape(node, file)
        return loader.construct_document(node), node
    except yaml.constructor.ConstructorError as err:
        message = err.problem or str(err)
        hint = None
        if "could not determine a constructor" in message:
            quoted = re.search(r"'([^']*)'", message)
            tag = (quoted.group(1) if quoted else message).replace("tag:yaml.org,2002:", "!!")
            message = f"YAML tag `{tag}` refused"
            hint = "recipes are plain data; Python object tags are never executed"
        raise _file_issue(file, message, hint, err.problem_mark) from None
    except RecursionError:  # the parser itself recurses per level of nesting
        raise _file_issue(file, f"the recipe nests deeper than Python can parse (a recipe needs under {MAX_DEPTH} levels)") from None
    except yaml.MarkedYAMLError as err:
        raise _file_issue(file, f"YAML syntax error: {err.problem}", err.context, err.problem_mark) from None
    except yaml.YAMLError as err:
        raise _file_issue(file, f"cannot read YAML: {err}") from None
    finally:
        loader.dispose()


def parse_value(text: str, file: str) -> Any:
    """An `-o` value, parsed as YAML under the same limits (aliases, depth, tags, number length) as a file."""
    return _parse(text, file, None)[0]


def parse_text(text: str, file: str) -> Source:
    """Parse YAML text safely; every failure becomes a located RecipeError."""
    data, node = _parse(text, file, _file_issue(file, "the recipe is empty", "start from `recipes/train_lenet300.yaml`"))
    if not isinstance(data, dict):
        raise _file_issue(
            file, f"a recipe must be a mapping of fields, got {type(data).__name__}",
            "a recipe starts with `name:`, `model:`, `data:` and `stages:`", node.start_mark,
        )
    marks: dict[Path_, tuple[int, int]] = {}
    _index_marks(node, (), marks)
    return Source(file, data, marks)


def read_source(path: str | Path) -> Source:
    """Read and parse a recipe file, refusing anything that is not a readable text file."""
    path = Path(path)
    file = str(path)
    if not path.exists():
        raise _file_issue(file, "no such file", "check the path; recipes shipped with nnopt are in `recipes/`")
    if path.is_dir():
        raise _file_issue(file, "this is a directory, not a recipe file", "pass a `.yaml` file inside it")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _file_issue(file, "the file is not UTF-8 text") from None
    except OSError as err:
        raise _file_issue(file, f"cannot read the file: {err.strerror}") from None
    return parse_text(text, file)
