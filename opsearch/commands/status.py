"""`opsearch status RUN`: who is working on a search, how fast it goes, how long it has left.

Read-only: everything comes from the study (each RUNNING trial carries its worker's identity and
heartbeat, each finished one its completion time), so it works for any executor and from any
machine that reaches the storage.
"""
from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from opsearch.commands.common import run_parent

WINDOW_S = 600.0  # candidates per minute over the last 10 minutes


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "status", parents=[run_parent()], help="live and lost workers, speed, time left",
        description="Show the workers of a run (live and lost), candidates per minute over the "
                    "last 10 minutes, candidates left and an estimate of the time left.")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=run)


def _worker_entry(worker, trial, now: float, beat: Any) -> dict[str, Any]:
    return {"host": worker.host, "pid": worker.pid, "job": worker.job or None,
            "device": worker.device or None, "candidate": trial.number,
            "formula": trial.user_attrs.get("formula") or trial.user_attrs.get("layer"),
            "last_heartbeat_s": round(now - beat, 1) if isinstance(beat, (int, float)) else None}


def collect(study, now: float | None = None) -> dict[str, Any]:
    """The status of a run as plain data (the --json output)."""
    from optuna.trial import TrialState

    from opsearch.study import HEARTBEAT_KEY, LOST, WORKER_KEY, WorkerId

    now = time.time() if now is None else now
    config = {}
    try:
        config = json.loads(study.user_attrs.get("config", "{}"))
    except (TypeError, ValueError):
        pass
    budget = config.get("budget")
    grace = float(config.get("grace_s", 120.0))
    from opsearch.study import run_trials

    trials = run_trials(study)  # workers on rerank items and promotions too

    live: dict[tuple, dict] = {}
    lost: dict[tuple, dict] = {}
    for t in trials:
        worker = WorkerId.from_json(t.system_attrs.get(WORKER_KEY))
        if worker is None:
            continue
        key = (worker.host, worker.pid, worker.started)
        if t.state == TrialState.RUNNING:
            beat = t.system_attrs.get(HEARTBEAT_KEY)
            entry = _worker_entry(worker, t, now, beat)
            silent = isinstance(beat, (int, float)) and now - beat > grace
            if worker.is_dead_here() or silent:
                entry["reason"] = "process gone" if not silent else f"no heartbeat for {now - beat:.0f} s"
                lost[key] = entry
            else:
                live[key] = entry
    for t in trials:  # workers whose candidates were reaped, and workers between candidates
        worker = WorkerId.from_json(t.system_attrs.get(WORKER_KEY))
        if worker is None:
            continue
        key = (worker.host, worker.pid, worker.started)
        if key in live or key in lost:
            continue
        if t.user_attrs.get("verdict") == LOST:
            entry = _worker_entry(worker, t, now, t.system_attrs.get(HEARTBEAT_KEY))
            entry["reason"] = t.user_attrs.get("reason")
            lost[key] = entry
    recent_owners = {}
    for t in trials:
        worker = WorkerId.from_json(t.system_attrs.get(WORKER_KEY))
        if worker is None or t.datetime_complete is None:
            continue
        key = (worker.host, worker.pid, worker.started)
        if key in live or key in lost or worker.is_dead_here():
            continue
        age = now - t.datetime_complete.timestamp()
        if age <= grace and (key not in recent_owners or recent_owners[key][1] > age):
            recent_owners[key] = (worker, age, t)
    for key, (worker, age, t) in recent_owners.items():
        entry = _worker_entry(worker, t, now, None)
        entry["candidate"] = None  # between candidates
        entry["last_heartbeat_s"] = round(age, 1)
        live[key] = entry

    def counted(t) -> bool:
        return t.user_attrs.get("kind", "candidate") == "candidate" and t.user_attrs.get("verdict") != LOST

    finished = [t for t in trials if counted(t) and t.state.is_finished()]
    running = [t for t in trials if counted(t) and t.state in (TrialState.RUNNING, TrialState.WAITING)]
    starts = [t.datetime_start.timestamp() for t in trials if t.datetime_start is not None]
    window = min(WINDOW_S, now - min(starts)) if starts else 0.0
    recent = [t for t in finished if t.datetime_complete is not None
              and now - t.datetime_complete.timestamp() <= WINDOW_S]
    per_minute = len(recent) / (window / 60.0) if window > 0 else 0.0
    left = max(0, budget - len(finished)) if isinstance(budget, int) else None
    if left == 0:
        eta = 0.0
    elif left is not None and per_minute > 0:
        eta = round(left / per_minute * 60.0, 1)
    else:
        eta = None
    return {"run": study.study_name, "budget": budget, "candidates_finished": len(finished),
            "candidates_in_flight": len(running),
            "live_workers": sorted(live.values(), key=lambda e: (e["host"], e["pid"])),
            "lost_workers": sorted(lost.values(), key=lambda e: (e["host"], e["pid"])),
            "candidates_per_minute": round(per_minute, 2), "candidates_left": left, "eta_s": eta,
            "as_of": datetime.fromtimestamp(now).isoformat(timespec="seconds")}


def _who(e: dict) -> str:
    return f"{e['host']} pid {e['pid']}" + (f" job {e['job']}" if e.get("job") else "")


def run(args) -> int:
    from opsearch.commands.common import open_study

    status = collect(open_study(args))
    if args.json:
        print(json.dumps(status))
        return 0
    budget = status["budget"] if status["budget"] is not None else "?"
    print(f"run {status['run']}: {status['candidates_finished']}/{budget} candidates finished, "
          f"{status['candidates_in_flight']} in flight or queued")
    print(f"live workers: {len(status['live_workers'])}")
    for e in status["live_workers"]:
        doing = (f"candidate #{e['candidate']} {str(e.get('formula') or '')[:60]}"
                 if e["candidate"] is not None else "between candidates")
        beat = f"{e['last_heartbeat_s']:.0f} s ago" if e["last_heartbeat_s"] is not None else "?"
        print(f"  {_who(e)}  {e.get('device') or 'cpu'}  {doing}  (last sign {beat})")
    if status["lost_workers"]:
        print(f"lost workers: {len(status['lost_workers'])}")
        for e in status["lost_workers"]:
            print(f"  {_who(e)}  candidate #{e['candidate']}: {e.get('reason') or 'lost'}")
    eta = status["eta_s"]
    eta_text = "unknown (no candidate finished in the last 10 minutes)" if eta is None else (
        "done" if eta == 0 else f"about {eta / 60:.1f} min")
    print(f"speed: {status['candidates_per_minute']:.2f} candidates/min over the last 10 minutes; "
          f"{status['candidates_left'] if status['candidates_left'] is not None else '?'} left; "
          f"time left: {eta_text}")
    return 0
