"""StageOutcome: what one stage of a run did (ran, reused or skipped), how long it took and what it measured."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ran", "reused", "skipped"]


@dataclass(frozen=True)
class StageOutcome:
    name: str
    kind: str
    status: Status
    folder: str
    fingerprint: str
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, Any] | None = None  # a reused artifact finished in another recipe's store: where (runner.store.ORIGIN)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
