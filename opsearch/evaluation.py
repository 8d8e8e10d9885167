"""The evaluator interface: how the engine and the quality filter score a layer.

An evaluator is a plugin (registry `evaluators`, config key ``evaluator_plugin``); the built-in
``lightning`` one trains the layer inside K proxy architectures (trainers/plugin.py). Another
way of scoring candidates (a surrogate, another framework) subclasses `Evaluator`:

    from opsearch import register_evaluator
    from opsearch.evaluation import Evaluation, Evaluator

    @register_evaluator("my_scorer")
    class MyScorer(Evaluator):
        def evaluate(self, layer):               # a plain graph or a known layer's name
            return Evaluation({arch: score(layer, arch) for arch in self.archs})

and a search selects it with ``evaluator_plugin = "my_scorer"`` (its options come from the
``[evaluator]`` table, checked against `OPTIONS`). What the engine calls, in order:
`configure` (the search config -> the evaluator's config, bad options fail before anything is
written), `check` (data and devices, also up front), then in each worker ``cls(config)`` on
first use, `evaluate` for baselines and candidates, and `resume` for a candidate whose quality
filter already trained it part of the way (`start` / `only` give those staged sessions).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Mapping, Protocol


class Result(Protocol):
    """What an evaluation returns: one accuracy per architecture (objective order = the run's
    archs) and extra trial attributes to store (``train_s/<arch>``, ``diverged/<arch>``...)."""

    accuracies: Mapping[str, float]

    def trial_attrs(self) -> dict[str, Any]: ...


class Session(Protocol):
    """A staged evaluation: trained step by step (the quality filter's early look), then resumed."""

    def train_until(self, step: int) -> dict[str, float]: ...

    def result(self) -> Result: ...


@dataclass
class Evaluation:
    """A plain `Result`: accuracies per architecture plus trial attributes."""

    accuracies: dict[str, float]
    attrs: dict[str, Any] = field(default_factory=dict)

    def trial_attrs(self) -> dict[str, Any]:
        return dict(self.attrs)

    @classmethod
    def merge(cls, results: Iterable[Result]) -> "Evaluation":
        """One result from several (one per architecture), in the order given. ``v0_range`` (the
        [min, max] v0 took in training, which the equivalence filter's band rule reads) is the
        union of theirs, and unknown unless every result knows it: taking the last one's, as for
        other attributes, recorded one architecture's range for the whole evaluation (the quality
        filter's staged sessions, one per architecture, until round 10)."""
        accuracies: dict[str, float] = {}
        attrs: dict[str, Any] = {}
        ranges = []
        for r in results:
            accuracies.update(r.accuracies)
            own = r.trial_attrs()
            ranges.append(own.pop("v0_range", None))
            attrs.update(own)
        if (union := v0_range_union(ranges)) is not None:
            attrs["v0_range"] = union
        return cls(accuracies, attrs)


def v0_range_union(ranges: Iterable[Any]) -> list[float] | None:
    """The [min, max] over several trainings' v0 ranges (the architectures of one evaluation);
    None when there are none or one is unknown: the band rule must see every training."""
    ranges = list(ranges)
    if not ranges or not all(isinstance(v, (list, tuple)) and len(v) == 2 for v in ranges):
        return None
    return [min(float(v[0]) for v in ranges), max(float(v[1]) for v in ranges)]


class OneShotSession:
    """The staged session of an evaluator that cannot stop half way: the first look evaluates
    the layer fully and later steps return the same result."""

    def __init__(self, evaluator: "Evaluator", layer: Any):
        self.evaluator, self.layer = evaluator, layer
        self._result: Result | None = None

    def train_until(self, step: int) -> dict[str, float]:
        return dict(self.result().accuracies)

    def result(self) -> Result:
        if self._result is None:
            self._result = self.evaluator.evaluate(self.layer)
        return self._result


class Evaluator:
    """Base class of evaluator plugins; ``name`` is set by the registry."""

    name: ClassVar[str] = "evaluator"
    #: option name -> default, the keys the ``[evaluator]`` table may hold (shown by `opsearch list`)
    OPTIONS: ClassVar[dict[str, Any]] = {}
    #: config keys that describe the machine a worker runs on, not the task it scores: a
    #: re-ranking stage stores its task without them and each worker adds its own (``seed`` is
    #: set per item by the stage); keys named here cannot be set in the ``[rerank]`` table
    MACHINE_KEYS: ClassVar[tuple[str, ...]] = ("seed",)

    def __init__(self, config: Any):
        self.config = config

    # -- from a search config, before anything is written ----------------------------------

    @classmethod
    def configure(cls, search: Any, device_index: int | None = None) -> Any:
        """This evaluator's config for a search (`opsearch.config.SearchConfig`): the
        ``[evaluator]`` table (already checked against `OPTIONS`) plus what the search fixes
        (``archs``, ``dataset``, ``seed``...). Default: a dict. May expose ``threads`` (torch
        threads per worker) and ``layer_options`` (eps, groups...), which the engine reads."""
        return {"archs": tuple(search.archs), "dataset": search.dataset, "seed": search.seed,
                **search.evaluator}

    @classmethod
    def check(cls, config: Any) -> None:
        """Fail now, with a UserError, on what would fail later (missing data, no device)."""

    @classmethod
    def config_to_dict(cls, config: Any) -> dict[str, Any]:
        """The config as plain JSON-able values (stored with a study, e.g. a re-ranking task)."""
        return dict(config) if isinstance(config, dict) else dict(config.to_dict())

    @classmethod
    def config_from_dict(cls, values: dict[str, Any]) -> Any:
        """The inverse of `config_to_dict`; bad values are a UserError."""
        return dict(values)

    # -- what the engine and the filters read from a config (all of it: nothing else) --------

    @classmethod
    def threads(cls, config: Any) -> int | None:
        """Torch threads per worker process (the filters train too); None: torch's default.
        Default: the config's ``threads``."""
        value = _read(config, "threads")
        return int(value) if value else None

    @classmethod
    def layer_options(cls, config: Any) -> dict[str, Any]:
        """The options candidate layers are built with (`opsearch.layers.OPTIONS`: eps, groups,
        momentum, no_act, surround), so that the filters probe the layer that is scored.
        Default: the config's ``layer_options``."""
        value = _read(config, "layer_options")
        return dict(value) if isinstance(value, dict) else {}

    # -- scoring ----------------------------------------------------------------------------

    @property
    def archs(self) -> tuple[str, ...]:
        return tuple(_read(self.config, "archs"))

    def evaluate(self, layer: Any) -> Result:
        """Score `layer` (a plain graph tuple or a known layer's name) on every architecture."""
        raise NotImplementedError

    def start(self, layer: Any) -> Session:
        """A staged evaluation of `layer` (the quality filter trains its first steps)."""
        return OneShotSession(self, layer)

    def resume(self, session: Session) -> Result:
        """Finish a staged evaluation: what `evaluate` would have returned."""
        return session.result()

    def only(self, arch: str) -> "Evaluator | None":
        """An evaluator of the same setup on one architecture (so that the quality filter can
        stop at the first architecture below its bar), or None when that saves nothing."""
        return None



def _read(config: Any, key: str) -> Any:
    """``key`` of a config that is a dict (the default) or an object with attributes."""
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

def make_eval_config(config: Any, device_index: int | None = None) -> Any:
    """The evaluator plugin's config for a search config (its `[evaluator]` table plus the
    flags); unknown or bad options are a UserError. The engine, the funnel and the re-ranking
    stage build their evaluators from it."""
    from opsearch import registry

    registry.evaluators.check_options(config.evaluator_plugin, config.evaluator)
    return registry.evaluators.get(config.evaluator_plugin).configure(config, device_index)
