"""`opsearch dashboard RUN`: optuna-dashboard on a run's study.

Each candidate is one trial: its values are the accuracies per architecture (named after the
architectures in the dashboard), and its user attributes hold the formula, the verdict and the
rest (README, "Stored results"). The dashboard lists user attributes in a small scrolling box,
where a candidate's formula and verdict sit below its fingerprints, so each finished trial also
gets a dashboard note (the box at the top of a trial's page) with its verdict, formula, accuracies
or rejection reason: written once per trial, in the background, for trials that finish while the
dashboard runs too (``--no-notes`` writes nothing into the study). optuna-dashboard is an optional
dependency: ``pip install 'opsearch[dashboard]'``.
"""
from __future__ import annotations

import signal
import sys
import threading
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
    p.add_argument("--no-notes", dest="notes", action="store_false",
                   help="do not add a note (verdict, formula, accuracies) to each trial")
    p.set_defaults(func=run)


NOTE_INTERVAL_S = 15.0  # how often trials that finished meanwhile get their note


def trial_note(attrs: dict, archs: list | None = None) -> str | None:
    """The Markdown note of one trial: verdict and formula, then accuracies (in the run's order of
    architectures) or the reason."""
    verdict, formula = attrs.get("verdict"), attrs.get("formula")
    if verdict is None and formula is None:
        return None
    lines = [f"**{verdict or 'no verdict'}** · `{formula or '(no formula)'}`"]
    names = [f"acc/{a}" for a in archs or []]
    names += sorted(k for k in attrs if k.startswith("acc/") and k not in names)
    accs = [f"{k[len('acc/'):]} {attrs[k]:.4f}" for k in names
            if isinstance(attrs.get(k), (int, float)) and not isinstance(attrs.get(k), bool)]
    if accs:
        lines.append(" · ".join(accs))
    if attrs.get("reason"):
        lines.append(str(attrs["reason"]))
    return "\n\n".join(lines)


def add_notes(storage, study_id: int) -> int:
    """Give every finished trial without a dashboard note its `trial_note`; how many were added.

    Written with optuna-dashboard's own note layout (its `_note` helpers), two writes per trial,
    instead of its `save_note`, which re-reads every note of the study for each trial."""
    import optuna
    from optuna_dashboard._note import note_ver_key, split_body

    from opsearch.study import trial_id

    existing = storage.get_study_system_attrs(study_id)
    archs = storage.get_study_user_attrs(study_id).get("archs")
    archs = archs if isinstance(archs, list) else None
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                optuna.trial.TrialState.FAIL)
    added = 0
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=finished):
        key = note_ver_key(trial_id(trial))
        body = trial_note(trial.user_attrs, archs)
        if key in existing or body is None:
            continue
        for k, v in split_body(body, trial_id(trial)).items():
            storage.set_study_system_attr(study_id, k, v)
        storage.set_study_system_attr(study_id, key, 1)  # (last: a note counts once complete)
        added += 1
    return added


def _keep_noting(storage, study_id: int, stop: threading.Event) -> None:
    while True:
        try:
            add_notes(storage, study_id)
        except Exception as e:  # notes are a convenience: never take the dashboard down
            print(f"opsearch dashboard: trial notes stopped: {type(e).__name__}: {e}", file=sys.stderr)
            return
        if stop.wait(NOTE_INTERVAL_S):
            return


def name_stage_objectives(storage, run_study: str) -> None:
    """The stage studies beside the run (re-ranking items, promotions: opsearch/trials.py) get
    their objectives named too; the dashboard lists them beside the run."""
    import optuna

    from opsearch.trials import STAGE_KINDS, stage_study_name

    for kind in STAGE_KINDS:
        try:
            name_objectives(optuna.load_study(study_name=stage_study_name(run_study, kind),
                                              storage=storage))
        except KeyError:  # no such stage in this run
            continue


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
    name_stage_objectives(storage, study.study_name)
    server = _listen(optuna_dashboard.wsgi(storage), args.host, args.port)
    stop = threading.Event()
    if args.notes:
        threading.Thread(target=_keep_noting, args=(storage, study_id, stop), daemon=True,
                         name="trial-notes").start()

    def shut_down(signum, frame) -> None:  # (serve_forever returns once shutdown, from a thread)
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, shut_down) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(f"optuna-dashboard on http://{args.host}:{args.port}/dashboard/studies/{study_id} "
          f"(study {study.study_name!r}, {len(study.trials)} trials); Ctrl-C to stop",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        stop.set()
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _listen(app, host: str, port: int):
    """A WSGI server for `app` bound to host:port (optuna-dashboard's own runner has no clean
    stop: Ctrl-C during a request is swallowed by wsgiref's error handler)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format, *args) -> None:  # no line per request on the terminal
            pass

    try:
        return make_server(host, port, app, handler_class=QuietHandler)
    except OSError as e:  # the port is taken, the address is not this machine's, ...
        raise UserError(f"cannot serve on {host}:{port}: {e.strerror or e}") from None
