"""Lineage (opsearch/lineage.py) and the quality filter's `parent_margin`: a mutant that learns
clearly slower than its trained parent by the quality step is stopped there."""
from __future__ import annotations

import pytest

from opsearch import layers, registry
from opsearch.errors import UserError
from opsearch.lineage import Lineage
from opsearch.rejection import Candidate


def test_lineage_indexes_finished_candidates_and_the_early_accuracies_of_trained_ones():
    lineage = Lineage()
    trained = {"kind": "candidate", "verdict": "evaluated", "metric/quality/acc/resnet": 0.8,
               "metric/quality/acc/mobilenetv2": 0.6, "acc/resnet": 0.9}
    lineage.add(4, (1, 2, 3), trained)
    lineage.add(9, (1, 2, 3), {**trained, "metric/quality/acc/resnet": 0.1})  # a later repeat
    lineage.add(5, (7, 7), {"kind": "candidate", "verdict": "rejected:quality",
                            "metric/quality/acc/resnet": 0.1})
    lineage.add(6, (8,), {"kind": "baseline", "verdict": "evaluated"})
    lineage.add(7, None, trained)
    assert lineage.trial_of([1, 2, 3]) == 4 and lineage.trial_of((7, 7)) == 5
    assert lineage.trial_of((8,)) is None and lineage.trial_of(None) is None
    assert lineage.early_accuracies(4) == {"resnet": 0.8, "mobilenetv2": 0.6}
    assert lineage.early_accuracies(5) is None  # rejected: no parent's bar to set
    assert lineage.early_accuracies(None) is None


def _child(parent_early):
    candidate = Candidate(layers.resolve("evonorm_b0"))
    candidate.parent, candidate.parent_early = 12, parent_early
    return candidate


def test_parent_margin_stops_a_child_below_its_parent_by_more_than_the_margin():
    quality = registry.rejection_filters.create("quality", parent_margin=0.05)
    parent = {"resnet": 0.80, "mobilenetv2": 0.90}  # mean 0.85
    reason = quality._slower_than_parent(_child(parent), {"resnet": 0.75, "mobilenetv2": 0.84})
    assert reason is not None and "trial 12" in reason and "0.795" in reason and "0.850" in reason
    assert quality._slower_than_parent(_child(parent), {"resnet": 0.70, "mobilenetv2": 0.95}) is None
    assert quality._slower_than_parent(_child(None), {"resnet": 0.1, "mobilenetv2": 0.1}) is None
    # measured on other architectures: not the same measurement, no bar
    assert quality._slower_than_parent(_child({"resnet": 0.9}), {"resnet": 0.1, "mobilenetv2": 0.1}) is None
    assert registry.rejection_filters.create("quality", parent_margin="0.02").parent_margin == 0.02
    off = registry.rejection_filters.create("quality")
    assert off._slower_than_parent(_child(parent), {"resnet": 0.1, "mobilenetv2": 0.1}) is None


@pytest.mark.parametrize("bad", [-0.1, 1.5, "wide", True, [0.1]])
def test_parent_margin_must_be_a_fraction(bad):
    with pytest.raises(UserError, match="parent_margin"):
        registry.rejection_filters.create("quality", parent_margin=bad)
