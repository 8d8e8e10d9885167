"""Hand-made studies for tests that read a run without searching."""
from __future__ import annotations

from datetime import datetime

from optuna.trial import FrozenTrial


def add_finished(run, user_attrs, state, values) -> None:
    """A finished trial written in one go, as a worker's last write leaves it."""
    now = datetime.now()
    run.storage.create_new_trial(run.study_id, template_trial=FrozenTrial(
        number=-1, state=state, value=None, values=values, datetime_start=now, datetime_complete=now,
        params={}, distributions={}, user_attrs=user_attrs, system_attrs={}, intermediate_values={},
        trial_id=-1))
