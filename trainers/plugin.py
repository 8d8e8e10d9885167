"""The built-in ``lightning`` evaluator: `trainers.evaluator.Evaluator` behind the evaluator
interface of opsearch/evaluation.py (registry `evaluators`, the default ``evaluator_plugin``).

Its options (the ``[evaluator]`` table of a search) are the fields of `EvalConfig`; the search
fixes the dataset, architectures, seed, accelerator and devices, and the table can override any.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from opsearch.errors import UserError
from opsearch.evaluation import Evaluator as EvaluatorPlugin
from opsearch.registry import register_evaluator
from opsearch.trainers.evaluator import EvalConfig, Evaluator, load_data


def _defaults() -> dict[str, Any]:
    return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(EvalConfig)}


@register_evaluator("lightning")
class LightningEvaluator(Evaluator, EvaluatorPlugin):
    """Trains the layer inside each proxy architecture with Lightning; K validation accuracies."""

    OPTIONS = _defaults()
    MACHINE_KEYS = ("accelerator", "devices", "strategy", "precision", "num_nodes", "threads", "seed")

    @classmethod
    def configure(cls, search: Any, device_index: int | None = None) -> EvalConfig:
        # One torch thread per worker: the proxies are too small to gain from more (bn_relu on
        # the three architectures, quiet 2-core box: 11.7 s with 1 or 2 threads), and spinning
        # OpenMP threads make a busy machine 5-25x slower. More cores: more --workers.
        values = {"dataset": search.dataset, "archs": tuple(search.archs), "seed": search.seed,
                  "accelerator": search.accelerator, "strategy": search.strategy, "threads": 1}
        if search.data_dir is not None:
            values["data_dir"] = search.data_dir
        if search.precision is not None:
            values["precision"] = search.precision
        if device_index is not None:
            values["devices"] = [device_index]
        values.update(search.evaluator)
        try:
            return EvalConfig(**values)
        except (TypeError, ValueError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"evaluator options: {e}") from None

    @classmethod
    def check(cls, config: EvalConfig) -> None:
        load_data(config)  # a missing or unreadable data directory: say so now

    @classmethod
    def config_from_dict(cls, values: dict[str, Any]) -> EvalConfig:
        fields = {f.name for f in dataclasses.fields(EvalConfig)}
        try:
            return EvalConfig(**{k: v for k, v in values.items() if k in fields})
        except (TypeError, ValueError) as e:
            if isinstance(e, UserError):
                raise
            raise UserError(f"evaluator options: {e}") from None

    def resume(self, session) -> Any:
        session.train_until(self.config.steps)
        return session.result()

    def only(self, arch: str) -> "LightningEvaluator":
        return type(self)(dataclasses.replace(self.config, archs=(arch,)))
