"""The error types users see: one per layer, each caught once in the CLI."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Issue:
    """One problem in a recipe, located in its source file."""

    file: str
    line: int | None  # 1-based; None when the problem is not tied to a place in the file
    column: int | None
    field: str  # dotted path such as `stages[1].optimizer.lr`; empty for the whole file
    message: str
    hint: str | None = None

    def location(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        return where

    def __str__(self) -> str:
        text = f"{self.location()}: "
        if self.field:
            text += f"{self.field}: "
        text += self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class RecipeError(Exception):
    """The recipe cannot be run as written; nothing has started. Exit code 2."""

    def __init__(self, issues: list[Issue]):
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


class StageError(Exception):
    """A stage started but could not deliver what it promised. Exit code 1.

    Earlier stages' artifacts are complete and kept; the failing stage leaves no DONE marker.
    """

    def __init__(self, stage: str, message: str, hint: str | None = None):
        self.stage = stage
        self.message = message
        self.hint = hint
        super().__init__(f"stage `{stage}`: {message}")


class RunError(Exception):
    """The run cannot start or go on for a reason outside the recipe (folder locked or unwritable,
    disk full). Exit code 1; finished stages are kept."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message)
