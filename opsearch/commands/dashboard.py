"""`opsearch dashboard RUN`: optuna-dashboard on a run's study.

Each candidate is one trial: its values are the accuracies per architecture (named after the
architectures in the dashboard), and its user attributes, which the dashboard lists per trial,
hold the formula, the verdict and the rest (README, "Stored results"). optuna-dashboard is an
optional dependency: ``pip install 'opsearch[dashboard]'``.
"""
from __future__ import annotations

import sys
import warnings

from opsearch.commands.common import run_parent, run_target
from opsearch.errors import UserError

INSTALL_HINT = "opsearch dashboard needs optuna-dashboard: pip install 'opsearch[dashboard]'"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "dashboard", parents=[run_parent()], help="optuna-dashboard on a run's study",
        description="Serve optuna-dashboard on RUN's study (trials with their formula, verdict and "
                    "accuracy per architecture) until interrupted with Ctrl-C.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    p.set_defaults(func=run)


def name_objectives(study) -> None:
    """Name the study's objectives after its architectures (the dashboard's axis and column
    titles) when the run recorded them and nothing named them yet."""
    archs = study.user_attrs.get("archs")
    if study.metric_names is None and isinstance(archs, list) and len(archs) == len(study.directions):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # set_metric_names is marked experimental
            study.set_metric_names([str(a) for a in archs])


def run(args) -> int:
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    try:
        import optuna_dashboard
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    from opsearch.commands.common import open_study
    from opsearch.study import open_storage, resolve

    study = open_study(args)  # one line if there is no such run
    name_objectives(study)
    run_or_url, name = run_target(args)
    url, _ = resolve(run_or_url, name)
    storage = open_storage(url, create=False)
    study_id = storage.get_study_id_from_name(study.study_name)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"optuna-dashboard on http://{host}:{args.port}/dashboard/studies/{study_id} "
          f"(study {study.study_name!r}, {len(study.trials)} trials); Ctrl-C to stop",
          file=sys.stderr, flush=True)
    try:
        optuna_dashboard.run_server(storage, host=args.host, port=args.port)
    except OSError as e:  # the port is taken, the address is not this machine's, ...
        raise UserError(f"cannot serve on {args.host}:{args.port}: {e.strerror or e}") from None
    except KeyboardInterrupt:
        pass
    return 0
