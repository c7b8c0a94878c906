"""Hostile recipes: mutated at random (wrong types, missing or unknown fields, huge and negative numbers,
unicode, deep nesting), `nnopt validate` answers with success or a clean located error, never a traceback."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.cli import main

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
BASES = [yaml.safe_load(path.read_text()) for path in RECIPES]

# Lone surrogates cannot be written as UTF-8 at all, so they never reach nnopt from a file.
text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
# Names that look like ours, climb folders, or carry a terminal escape sequence (retitle, recolour).
words = st.one_of(text, st.sampled_from(["stages", "name", "kind", "train", "..", "../../etc", "a/b", "ünïcödé",
                                         "\u202e", "\x00", "~", "\x1b]0;pwned\x07\x1b[31m"]))
scalars = st.one_of(
    st.none(), st.booleans(), words,
    st.integers(min_value=-2**80, max_value=2**80),
    st.sampled_from([0, -1, 2**31, 2**63, -2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(words, inner, max_size=4)), max_leaves=12)


def nested(depth: int, leaf):
    for _ in range(depth):
        leaf = [leaf] if depth % 2 else {"x": leaf}
    return leaf


@st.composite
def mutated_recipe(draw):
    recipe = draw(st.sampled_from(BASES))
    recipe = yaml.safe_load(yaml.safe_dump(recipe))  # a private copy
    for _ in range(draw(st.integers(1, 4))):
        # Walk to a random container, then break one thing in it.
        node = recipe
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if not isinstance(child, (dict, list)) or not child or draw(st.booleans()):
                break
            node = child
        if not keys:
            continue
        action = draw(st.sampled_from(["replace", "delete", "add", "nest"]))
        if action == "replace":
            node[key] = draw(values)
        elif action == "delete":
            del node[key]
        elif action == "add" and isinstance(node, dict):
            node[draw(words)] = draw(values)
        elif action == "nest":
            node[key] = nested(draw(st.integers(1, 80)), node[key])
    return recipe


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(recipe=mutated_recipe(), overrides=st.lists(st.tuples(st.sampled_from(
    ["name", "seed", "stages.train.epochs", "data.batch_size", "stages.0.optimizer.lr", "model.args.hidden", "x.y"]),
    words), max_size=2))
def test_validate_never_crashes_on_mutated_recipes(tmp_path_factory, capsys, recipe, overrides):
    path = tmp_path_factory.mktemp("hostile") / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    args = ["validate", str(path)] + [f"-o{key}={value}" for key, value in overrides]
    code = main(args)  # an unexpected exception fails the test with its traceback
    out, err = capsys.readouterr()
    assert code in (0, 2)
    assert "Traceback" not in out + err
    assert "\x1b" not in out + err and "\x07" not in out + err  # a recipe cannot drive the terminal
    assert ("ok" in out) if code == 0 else ("error" in err)
