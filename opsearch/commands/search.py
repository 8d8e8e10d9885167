"""`opsearch search`: run (or resume) a search and end with a leaderboard and plots."""
from __future__ import annotations

import json
import time

from opsearch.config import build_config
from opsearch.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "search", help="evolve layers (resumes the run if it exists)",
        description="Evolve normalization-activation layers. Flags override the --config file; "
                    "the same command run again resumes the study and stops at --budget.")
    add_search_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def add_search_arguments(p, workers_help: str = "local worker processes (default 1)") -> None:
    """The flags that define a search (shared by `search` and `launch`)."""
    p.add_argument("--space", help="search space (default evonorm)")
    p.add_argument("--algorithm", help="search algorithm (default regularized_evolution)")
    p.add_argument("--budget", type=int, help="total number of candidates in the study (default 60)")
    p.add_argument("--dataset", help="proxy dataset (default digits)")
    p.add_argument("--data-dir", dest="data_dir", help="directory holding the dataset's files")
    p.add_argument("--archs", help="comma-separated proxy architectures "
                                   "(default resnet,mobilenetv2,efficientnet)")
    p.add_argument("--filters", help="comma-separated rejection filters, cheapest first "
                                     "(default validity,numerics,equivalence,stability,quality; "
                                     "'none' for no filter)")
    p.add_argument("--baselines", help="comma-separated known layers evaluated beside the search "
                                       "('none' for no baseline)")
    p.add_argument("--steps", type=int, help="training steps per architecture (evaluator.steps)")
    p.add_argument("--workers", type=int, help=workers_help)
    p.add_argument("--accelerator", help="Lightning accelerator: cpu (default), gpu, auto")
    p.add_argument("--devices", help="GPUs the workers use (a count, '0,1', auto); each worker "
                                     "is pinned to one of them")
    p.add_argument("--workers-per-device", dest="workers_per_device", type=int,
                   help="workers sharing each GPU (default 1; the proxies are small)")
    p.add_argument("--strategy", help="Lightning strategy (auto, ddp, ...)")
    p.add_argument("--precision", help="Lightning precision (32-true, 16-mixed, bf16-mixed)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///runs/NAME/study.db); "
                                     "postgresql://..., journal:///FILE")
    p.add_argument("--name", help="run name (default 'default')")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="import a Python file that registers plugins (repeatable)")
    p.add_argument("--config", help="TOML file whose keys mirror these flags")
    p.add_argument("-O", "--option", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="set an option: space.*, algorithm.*, evaluator.*, filter.NAME.* "
                        "(e.g. -O algorithm.population_size=20)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--timeout", dest="timeout_s", type=float,
                   help="per-candidate time limit in seconds (default 900)")
    p.add_argument("--storage-grace", dest="storage_grace_s", type=float, metavar="SECONDS",
                   help="how long to wait out a storage outage (a database restart) before "
                        "stopping with exit status 3 (default $OPSEARCH_STORAGE_GRACE_S or 300)")
    p.add_argument("--no-plots", dest="plots", action="store_false", default=None,
                   help="do not write PNG plots at the end")
    p.add_argument("--no-rerank", dest="rerank", action="store_false", default=None,
                   help="no re-ranking stage after the budget (rerank.enabled=false)")
    p.add_argument("--rerank-dataset", metavar="D",
                   help="re-rank on this dataset (default: the held-out split of --dataset)")
    p.add_argument("--rerank-top", type=int, metavar="K",
                   help="candidates to re-rank after the budget (rerank.top_k, default 5)")
    p.add_argument("--rerank-seeds", type=int, metavar="S",
                   help="seeds per re-ranked layer (rerank.seeds, default 3)")


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    if text.strip().lower() == "none":
        return []
    return [t.strip() for t in text.split(",") if t.strip()]


def _rerank_options(args) -> list[str]:
    """The --rerank-* / --no-rerank flags as rerank.* options (they override the config file)."""
    out = []
    if args.rerank is False:
        out.append("rerank.enabled=false")
    for flag, key in (("rerank_top", "top_k"), ("rerank_seeds", "seeds")):
        value = getattr(args, flag)
        if value is not None:
            if value <= 0:
                raise UserError(f"--{flag.replace('_', '-')} must be positive, got {value}")
            out.append(f"rerank.{key}={value}")
    if args.rerank_dataset is not None:
        out.append(f"rerank.dataset={json.dumps(args.rerank_dataset)}")
    return out


def config_from_args(args):
    """The SearchConfig the search flags describe (defaults < --config file < flags < -O)."""
    overrides = {
        "space": args.space, "algorithm": args.algorithm, "budget": args.budget,
        "dataset": args.dataset, "data_dir": args.data_dir, "archs": _split(args.archs),
        "filters": _split(args.filters), "baselines": _split(args.baselines),
        "workers": args.workers, "workers_per_device": args.workers_per_device,
        "accelerator": args.accelerator, "devices": args.devices,
        "strategy": args.strategy, "precision": args.precision, "storage": args.storage,
        "name": args.name, "seed": args.seed, "timeout_s": args.timeout_s, "plots": args.plots,
        "storage_grace_s": args.storage_grace_s,
        "plugins": (args.plugin or None),
    }
    options = list(args.option)
    if args.steps is not None:
        if args.steps <= 0:
            raise UserError(f"--steps must be positive, got {args.steps}")
        options.append(f"evaluator.steps={args.steps}")
    options += _rerank_options(args)
    return build_config(args.config, overrides, options)


def run(args) -> int:
    from opsearch.progress import SearchProgress

    config = config_from_args(args)
    search_and_report(config, SearchProgress(config, quiet=args.quiet))
    return 0


def search_and_report(config, progress):
    """Run (or resume) the search, then the summary: leaderboard, counts, PNG plots, hints.
    The one path of `opsearch search` and `opsearch.search` (opsearch/api.py); returns the run."""
    from opsearch.commands.plot import write_plots
    from opsearch.commands.show import print_summary
    from opsearch.local_run import run_search

    start = time.time()
    run_ = run_search(config, progress=progress)
    progress.summary(run_, time.time() - start, print_summary=print_summary, write_plots=write_plots)
    return run_
