"""`opsearch export RUN [--trial N] [-o FILE.py] [--class-name NAME]`: a found layer as code.

Writes standalone PyTorch source (no opsearch import) with one ``nn.Module`` whose constructor
takes ``num_channels``. Default: the best candidate after re-ranking when the run has a re-ranking
stage (said on stderr), else the best candidate (best mean accuracy over the architectures,
evaluated or duplicate). The graph is read back from the study through our own schema
(`opsearch.graph.from_dict`: known ops, index bounds, sizes) and the code is generated from the
op table only, so a tampered study cannot inject code.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from opsearch import report
from opsearch import trials as report_trials
from opsearch.errors import InvalidCandidate, UserError

LAYER_OPTION_KEYS = ("eps", "groups", "momentum")


def add_parser(subparsers) -> None:
    from opsearch.commands.common import run_parent

    p = subparsers.add_parser("export", parents=[run_parent()],
                              help="write a found layer as standalone PyTorch code")
    p.add_argument("--trial", type=int, default=None, metavar="N",
                   help="trial number (default: the best mean accuracy over the architectures)")
    p.add_argument("-o", "--output", default=None, metavar="FILE.py", help="write here (default: stdout)")
    p.add_argument("--class-name", default="SearchedLayer", metavar="NAME",
                   help="name of the nn.Module class (default SearchedLayer)")
    p.add_argument("--compile", action="store_true",
                   help="the class runs through torch.compile (inductor), falling back to plain "
                        "PyTorch with one warning where the compiler cannot run")
    p.set_defaults(func=run)


def select_trial(trials: list[Any], archs: list[str], number: int | None) -> Any:
    """The trial to export; UserError for one that does not exist or has no result."""
    if number is None:
        from opsearch.rerank_stats import reranked_best

        picked = reranked_best(trials, archs)  # a re-ranked run: its held-out best, said on stderr
        if picked is not None:
            print(f"export: trial {picked[0]}, {picked[1]}", file=sys.stderr)
            return report_trials.by_number(trials)[picked[0]]
        best = report.best_trial(trials, archs)
        if best is None:
            raise UserError("the run has no evaluated candidate to export yet")
        return best
    by_number = report_trials.by_number(trials)  # stage studies' trials have numbers of their own
    if number not in by_number:
        last = max(by_number) if by_number else None
        raise UserError(f"no trial {number} in this run"
                        + (f" (trials 0..{last})" if last is not None else " (it has no trials)"))
    trial = by_number[number]
    if report.kind(trial) != "baseline" and report.category(trial) not in ("evaluated", "duplicate"):
        best = report.best_trial(trials, archs)
        hint = f"; the best is trial {best.number}" if best is not None else ""
        raise UserError(f"trial {number} was {report.verdict(trial)}, only evaluated or duplicate "
                        f"trials can be exported{hint}")
    return trial


def layer_options(study_attrs: dict[str, Any]) -> dict[str, Any]:
    """Compile options the run used (eps, groups, momentum), where its stored config has them:
    ``config.evaluator.layer_options`` (the search config) or ``config.layer_options``."""
    try:
        config = json.loads(study_attrs.get("config") or "{}")
    except (TypeError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    evaluator = config.get("evaluator") if isinstance(config.get("evaluator"), dict) else {}
    for found in (evaluator.get("layer_options"), config.get("layer_options")):
        if isinstance(found, dict):
            return {k: found[k] for k in LAYER_OPTION_KEYS
                    if isinstance(found.get(k), (int, float)) and not isinstance(found.get(k), bool)}
    return {}


def trial_surround(trial: Any, study_attrs: dict[str, Any]) -> str:
    """What surrounds the trial's graph (opsearch/surround.py): a baseline's known layer keeps its
    own; a candidate has the run's (stored with the run)."""
    from opsearch import layers, surround

    name = trial.user_attrs.get("layer")
    if report.kind(trial) == "baseline" and isinstance(name, str):
        try:
            return layers.surround_of(name)
        except UserError:
            pass  # a layer from a plugin not loaded here: the graph as stored
    return surround.of_run(study_attrs)


def trial_graph(trial: Any):
    """The trial's LayerGraph, through our schema check (never pyglove's from_json)."""
    from opsearch import graph

    text = trial.user_attrs.get("graph")
    if not isinstance(text, str):
        raise UserError(f"trial {trial.number} has no stored graph")
    try:
        return graph.from_dict(json.loads(text))
    except (ValueError, TypeError, InvalidCandidate) as e:
        raise UserError(f"trial {trial.number}: stored graph is invalid: {e}") from None


def run(args) -> int:
    from opsearch.commands.common import run_target
    from opsearch.commands.show import load_run
    from opsearch.compile import export_source

    if not args.class_name.isidentifier():
        raise UserError(f"--class-name must be a Python identifier, got {args.class_name!r}")
    trials, attrs, _ = load_run(*run_target(args))
    archs = report.archs_of(trials, attrs)
    trial = select_trial(trials, archs, args.trial)
    g = trial_graph(trial)
    source = export_source(g, class_name=args.class_name, torch_compile=getattr(args, "compile", False),
                           surround=trial_surround(trial, attrs), **layer_options(attrs))
    accs = report.accuracies(trial, archs)
    from opsearch import graph

    # Only validated or generated text goes into the header: stored attrs could hold newlines.
    run_name = " ".join(str(args.run).split())
    header = (f"# Exported by `opsearch export` from run {run_name}, trial {trial.number}\n"
              f"# formula: {' '.join(graph.formula(g).split())}\n")
    if accs:
        header += "# accuracy: " + ", ".join(f"{'_'.join(a.split())} {v:.4f}" for a, v in zip(archs, accs)) + "\n"
    source = header + source
    if args.output:
        from opsearch.files import write_atomically

        write_atomically(args.output, lambda f: f.write(source))  # a full disk: exit 4
        print(f"wrote {args.output} (trial {trial.number}, class {args.class_name})", file=sys.stderr)
    else:
        sys.stdout.write(source)
    return 0
