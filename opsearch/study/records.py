"""What the engine needs of a stored trial: a light view of Optuna's FrozenTrial."""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from optuna.trial import FrozenTrial, TrialState

from opsearch.trials import LOST


@dataclass
class TrialRecord:
    """What the engine needs of a stored trial (a light view of a FrozenTrial)."""

    number: int
    trial_id: int
    state: TrialState
    values: tuple[float, ...] | None
    user_attrs: dict[str, Any]
    system_attrs: dict[str, Any]
    datetime_start: datetime | None = None
    study_id: int = -1  # the run's study or one of its stage studies

    @property
    def kind(self) -> str:
        return self.user_attrs.get("kind", "candidate")

    @property
    def verdict(self) -> str | None:
        return self.user_attrs.get("verdict")

    @property
    def genome(self) -> tuple[int, ...] | None:
        g = self.user_attrs.get("genome")
        return tuple(int(v) for v in json.loads(g)) if isinstance(g, str) else None

    @property
    def counts_toward_budget(self) -> bool:
        return self.kind == "candidate" and self.verdict != LOST

    @classmethod
    def from_frozen(cls, t: FrozenTrial, study_id: int = -1) -> "TrialRecord":
        return cls(t.number, t._trial_id, t.state, tuple(t.values) if t.values else None,
                   dict(t.user_attrs), dict(t.system_attrs), t.datetime_start, study_id)
