"""Search configuration: defaults < config file (TOML) < command-line flags.

The TOML file's keys mirror the flags (`budget = 100`, `archs = ["resnet", ...]`) plus option
tables for the pluggable parts:

    [space_options]      num_nodes = 8
    [algorithm_options]  population_size = 20
    evaluator_plugin = "lightning"            # registry `evaluators` (the default)
    [evaluator]          steps = 300          # its options (lightning: EvalConfig fields)
    [filter_options.quality]  min_accuracy = 0.2
    [rerank]             top_k = 10, seeds = 3, dataset = "fashion_mnist", steps = 900
    [funnel]             enabled = true, eta = 3, steps = [100, 300, 900]

`-O section.key=value` on the command line sets one option. Every command reads ``-O`` with
`parse_assignment` (the value is a TOML value, as in the config file: ``3``, ``0.1``, ``true``,
``[1, 2]``, ``"text"``; anything else is kept as a string) and `set_option`.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from opsearch.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_ARCHS = ("resnet", "mobilenetv2", "efficientnet")
DEFAULT_EVALUATOR = "lightning"  # registry `evaluators`; trainers/plugin.py
DEFAULT_BASELINES = ("bn_relu", "gn_relu", "ln_relu", "evonorm_b0", "evonorm_s0", "relu_only",
                     "identity")
OPTION_SECTIONS = {"space": "space_options", "algorithm": "algorithm_options",
                   "evaluator": "evaluator", "filter": "filter_options", "rerank": "rerank",
                   "funnel": "funnel"}


@dataclass
class SearchConfig:
    name: str = "default"
    space: str = "evonorm"
    space_options: dict[str, Any] = field(default_factory=dict)
    algorithm: str = "regularized_evolution"
    algorithm_options: dict[str, Any] = field(default_factory=dict)
    budget: int = 60
    dataset: str = "digits"
    data_dir: str | None = None
    archs: list[str] = field(default_factory=lambda: list(DEFAULT_ARCHS))
    filters: list[str] | None = None  # None: the default pipeline
    filter_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluator: dict[str, Any] = field(default_factory=dict)  # the evaluator plugin's options
    evaluator_plugin: str = DEFAULT_EVALUATOR
    baselines: list[str] = field(default_factory=lambda: list(DEFAULT_BASELINES))
    # Feed the evaluated baselines that the space can express to the algorithm as its first
    # history: evolution then starts from known layers. Our choice for small budgets (the
    # paper's initial population is not documented); false starts from random graphs only.
    seed_with_baselines: bool = True
    workers: int | None = None  # None: 1 on CPU, workers_per_device per device on GPUs
    workers_per_device: int = 1  # several small proxies share one GPU
    accelerator: str = "cpu"
    devices: str = "auto"
    strategy: str = "auto"
    precision: str | None = None
    storage: str | None = None
    seed: int = 0
    plugins: list[str] = field(default_factory=list)
    timeout_s: float = 900.0  # per candidate; past it the candidate is failed:timeout
    heartbeat_s: float = 10.0
    grace_s: float = 120.0  # a remote worker silent this long is taken for dead
    # how long a storage call waits out an outage (a database restart) before the command
    # stops with exit status 3; None: $OPSEARCH_STORAGE_GRACE_S, else 300 s
    storage_grace_s: float | None = None
    plots: bool = True
    # The re-ranking stage after the budget (opsearch/rerank.py): enabled, top_k, seeds,
    # baselines, dataset, data_dir, stage, plus any [evaluator] key for the held-out task.
    rerank: dict[str, Any] = field(default_factory=dict)
    # Successive halving over training length inside the search (opsearch/funnel.py): enabled
    # (default false), eta, steps (rung 0 = the quality filter's), min_candidates.
    funnel: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "SearchConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            import difflib
            close = difflib.get_close_matches(unknown[0], list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{source}: unknown key {unknown[0]!r}{hint}; known keys: "
                            f"{', '.join(sorted(known))}")
        config = cls(**{k: v for k, v in data.items()})
        config.validate(source)
        return config

    def validate(self, source: str = "config") -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(f"{source}: {message}")

        need(isinstance(self.name, str) and self.name.replace("-", "").replace("_", "").replace(
            ".", "").isalnum(), f"name must be letters, digits, '-', '_' or '.', got {self.name!r}")
        for key in ("space", "algorithm", "dataset", "accelerator", "strategy", "evaluator_plugin"):
            need(isinstance(getattr(self, key), str) and getattr(self, key),
                 f"{key} must be a non-empty string")
        need(isinstance(self.budget, int) and not isinstance(self.budget, bool) and self.budget > 0,
             f"budget must be a positive integer, got {self.budget!r}")
        need(self.workers is None or (isinstance(self.workers, int) and not isinstance(self.workers, bool)
             and 1 <= self.workers <= 512), f"workers must be an integer in 1..512, got {self.workers!r}")
        need(isinstance(self.workers_per_device, int) and not isinstance(self.workers_per_device, bool)
             and 1 <= self.workers_per_device <= 64,
             f"workers_per_device must be an integer in 1..64, got {self.workers_per_device!r}")
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool),
             f"seed must be an integer, got {self.seed!r}")
        need(isinstance(self.archs, list) and self.archs and all(isinstance(a, str) and a for a in self.archs),
             "archs must be a non-empty list of architecture names")
        need(len(set(self.archs)) == len(self.archs), f"archs has a repeated name: {self.archs}")
        need(self.filters is None or (isinstance(self.filters, list)
                                      and all(isinstance(f, str) for f in self.filters)),
             "filters must be a list of filter names")
        need(isinstance(self.seed_with_baselines, bool), "seed_with_baselines must be true or false")
        need(isinstance(self.baselines, list) and all(isinstance(b, str) for b in self.baselines),
             "baselines must be a list of layer names")
        for key in ("space_options", "algorithm_options", "evaluator", "filter_options", "rerank", "funnel"):
            need(isinstance(getattr(self, key), dict), f"{key} must be a table")
        for fname, opts in self.filter_options.items():
            need(isinstance(opts, dict), f"filter_options.{fname} must be a table")
        for key in ("timeout_s", "heartbeat_s", "grace_s"):
            value = getattr(self, key)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
                 f"{key} must be a positive number, got {value!r}")
        need(self.grace_s > 2 * self.heartbeat_s, "grace_s must exceed twice heartbeat_s")
        need(self.storage_grace_s is None or (isinstance(self.storage_grace_s, (int, float))
                                              and not isinstance(self.storage_grace_s, bool)
                                              and self.storage_grace_s >= 0),
             f"storage_grace_s must be a number of seconds >= 0, got {self.storage_grace_s!r}")
        need(isinstance(self.plugins, list) and all(isinstance(p, str) for p in self.plugins),
             "plugins must be a list of file paths")
        need(isinstance(self.devices, (str, int, list)), "devices must be a string, int or list")
        check_rerank_options(self.rerank, source)
        check_funnel_options(self.funnel, source)


# --------------------------------------------------------------------------------------------
# The [rerank] and [funnel] tables: their own keys, defaults and types (the stages read them
# from here; the evaluator keys of a re-ranking task are checked when the task is built)

# The stage's own keys in the [rerank] table; every other key is an [evaluator] key of the task.
RERANK_DEFAULTS: dict[str, Any] = {"enabled": True, "top_k": 5, "seeds": 3, "max_seeds": 8,
                                   "correction": "holm", "baselines": "all", "dataset": None,
                                   "data_dir": None, "stage": None}
# The re-ranking table's multiple-comparison corrections (opsearch/rerank_stats.py)
CORRECTIONS = {"holm": "Holm step-down (family-wise error rate)",
               "bh": "Benjamini-Hochberg (false discovery rate)",
               "none": "none"}
FUNNEL_DEFAULTS: dict[str, Any] = {"enabled": False, "eta": 3, "steps": None, "min_candidates": 3,
                                   "baselines": "top"}
FUNNEL_BASELINE_RUNGS = ("top", "first")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_rerank_options(options: dict[str, Any], source: str = "config") -> None:
    """Types of the stage's own keys (the evaluator keys are checked when the task is built)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(f"{source}: rerank.{message}")

    if "enabled" in options:
        need(isinstance(options["enabled"], bool), f"enabled must be true or false, got {options['enabled']!r}")
    for key in ("top_k", "seeds", "max_seeds"):
        if key in options:
            need(_positive_int(options[key]), f"{key} must be a positive integer, got {options[key]!r}")
    if "baselines" in options:
        b = options["baselines"]
        need(b == "all" or (isinstance(b, list) and all(isinstance(x, str) for x in b)),
             f"baselines must be \"all\" or a list of layer names, got {b!r}")
    if "correction" in options:
        need(options["correction"] in CORRECTIONS,
             f"correction must be one of {', '.join(CORRECTIONS)}, got {options['correction']!r}")
    for key in ("dataset", "data_dir", "stage"):
        if options.get(key) is not None:
            need(isinstance(options[key], str) and options[key], f"{key} must be a non-empty string")
    if "archs" in options:
        need(False, "archs cannot differ from the search's architectures (the paired tests "
                    "compare the same architectures)")


def check_funnel_options(options: dict[str, Any], source: str = "config") -> None:
    """Types of the [funnel] table (the steps are checked against the evaluator at setup)."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UserError(f"{source}: funnel.{message}")

    unknown = sorted(set(options) - set(FUNNEL_DEFAULTS))
    need(not unknown, f"{unknown[0] if unknown else ''} is not a funnel option; known: "
                      f"{', '.join(sorted(FUNNEL_DEFAULTS))}")
    if "enabled" in options:
        need(isinstance(options["enabled"], bool), f"enabled must be true or false, got {options['enabled']!r}")
    if "eta" in options:
        need(_int(options["eta"], 2), f"eta must be an integer >= 2, got {options['eta']!r}")
    if "min_candidates" in options:
        need(_int(options["min_candidates"], 1),
             f"min_candidates must be a positive integer, got {options['min_candidates']!r}")
    if "baselines" in options:
        need(options["baselines"] in FUNNEL_BASELINE_RUNGS,
             f"baselines must be one of {', '.join(map(repr, FUNNEL_BASELINE_RUNGS))} (the rung baselines are "
             f"evaluated at), got {options['baselines']!r}")
    steps = options.get("steps")
    if steps is not None:
        need(isinstance(steps, list) and len(steps) >= 2 and all(_int(s, 1) for s in steps)
             and all(a < b for a, b in zip(steps, steps[1:])),
             f"steps must be a list of at least 2 increasing positive integers (rung 0 = the "
             f"quality filter's steps, the last = the top rung), got {steps!r}")


def load_toml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config file {path}: {e}") from e


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value): the value as a TOML value (what the same
    setting would be in a config file), else the raw text as a string."""
    key, sep, raw = text.partition("=")
    path = [p.strip() for p in key.split(".")]
    if not sep or not all(path):
        raise UserError(f"option {text!r} must look like key=value or table.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def set_option(data: dict[str, Any], path: list[str], value: Any, source: str = "options") -> None:
    """``data[path[0]][path[1]]... = value``, creating tables on the way."""
    table = data
    for part in path[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise UserError(f"{source}: {'.'.join(path[:-1])} must be a table")
    table[path[-1]] = value


def parse_option(text: str) -> tuple[list[str], Any]:
    """A search's ``section.key=value`` -> (path, value), the section one of OPTION_SECTIONS."""
    path, value = parse_assignment(text)
    if len(path) < 2 or path[0] not in OPTION_SECTIONS:
        raise UserError(f"option {text!r}: the key must start with one of "
                        f"{', '.join(s + '.' for s in OPTION_SECTIONS)} (e.g. algorithm.population_size=20)")
    if path[0] == "filter" and len(path) != 3:
        raise UserError(f"option {text!r}: filter options look like filter.<name>.<key>=value")
    return path, value


def build_config(file: str | None, overrides: dict[str, Any], options: list[str]) -> SearchConfig:
    """Merge defaults, the config file, flags (`overrides`, None = unset) and -O options."""
    data: dict[str, Any] = load_toml(file) if file else {}
    source = f"config file {file}" if file else "options"
    for key, value in overrides.items():
        if value is not None:
            data[key] = value
    for text in options:
        path, value = parse_option(text)
        set_option(data, [OPTION_SECTIONS[path[0]]] + path[1:], value, source)
    return SearchConfig.from_dict(data, source)
