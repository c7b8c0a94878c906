"""A name -> factory mapping with helpful misses: models, data sets, stages."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def did_you_mean(word: str, choices: list[str]) -> str | None:
    """A hint naming the closest choice, or None when nothing is close."""
    close = difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f"did you mean `{close[0]}`?" if close else None


def closest_names(word: str, choices: list[str], kind: str, shown: int = 20) -> str:
    """The hint for a name (or glob pattern) that names none of `choices`: the close ones, else the choices
    themselves (the first `shown`), introduced by `kind` ("layers", "parameters")."""
    close = difflib.get_close_matches(str(word), choices, n=3, cutoff=0.6)
    if close:
        quoted = [f"`{name}`" for name in close]
        return "did you mean " + (quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]) + "?"
    more = f", ... ({len(choices)} in all)" if len(choices) > shown else ""
    return f"{kind}: " + ", ".join(choices[:shown]) + more


class UnknownName(KeyError):
    def __init__(self, kind: str, name: str, choices: list[str]):
        self.kind, self.name, self.choices = kind, name, choices
        self.message = f"unknown {kind} `{name}`"
        super().__init__(self.message)

    @property
    def hint(self) -> str:
        known = ", ".join(f"`{c}`" for c in self.choices)
        guess = did_you_mean(self.name, self.choices)
        return f"{guess + ' ' if guess else ''}known: {known}"


class Registry(Generic[T]):
    """Explicit registration (no package scanning): `@REG.register("name")`."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} `{name}` is registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownName(self.kind, name, self.names()) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
