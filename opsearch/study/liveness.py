"""Worker identity and liveness: who holds a trial (host, pid, start time, scheduler job), a
heartbeat while it works, and a note when it stopped on purpose, so that a reaper can tell a
lost worker from a live or a stopped one."""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from optuna.storages import BaseStorage


from opsearch.study.guard import no_retry


WORKER_KEY = "opsearch:worker"
HEARTBEAT_KEY = "opsearch:heartbeat"


# --------------------------------------------------------------------------------------------
# Worker identity and liveness


@dataclass(frozen=True)
class WorkerId:
    host: str
    pid: int
    started: str  # the process's start time as the kernel counts it: guards against pid reuse
    job: str = ""  # the scheduler's job ("1234_5": SLURM array job 1234, task 5); "" if none
    device: str = ""  # what the worker trains on ("cpu", "cuda:0 (CUDA_VISIBLE_DEVICES=3)")

    @classmethod
    def current(cls, device: str = "") -> "WorkerId":
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()) or "",
                   scheduler_job(), device)

    @classmethod
    def from_json(cls, data: Any) -> "WorkerId | None":
        if not isinstance(data, dict):
            return None
        try:
            pid = int(data.get("pid", -1))
        except (TypeError, ValueError):
            pid = -1
        return cls(str(data.get("host", "")), pid, str(data.get("started", "")),
                   str(data.get("job", "") or ""), str(data.get("device", "") or ""))

    def to_json(self) -> dict:
        out: dict[str, Any] = {"host": self.host, "pid": self.pid, "started": self.started}
        if self.job:
            out["job"] = self.job
        if self.device:
            out["device"] = self.device
        return out

    def same_process(self, other: "WorkerId") -> bool:
        return (self.host, self.pid, self.started) == (other.host, other.pid, other.started)

    def is_dead_here(self) -> bool:
        """True when this worker ran on this host and its process is gone."""
        if self.host != socket.gethostname():
            return False
        started = _process_start(self.pid)
        return started is None or (bool(self.started) and started != self.started)

    def supersedes(self, other: "WorkerId") -> bool:
        """True when `other` is an earlier run of this worker's own scheduler job (a requeued
        SLURM job keeps its job id; one job runs one worker): `other` is then certainly gone,
        wherever it ran, even though its job id is alive again."""
        return bool(self.job) and self.job == other.job and not self.same_process(other)


def scheduler_job() -> str:
    """This process's scheduler job: SLURM's array job and task ('1234_5'), or its job id."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "")


def _process_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return ""
        return ""
    fields = stat.rsplit(")", 1)[1].split()
    if fields and fields[0] == "Z":  # a zombie has finished running
        return None
    return fields[19] if len(fields) > 19 else ""


HUNG_KEY = "opsearch:hung"
HANDED_BACK_KEY = "opsearch:handed_back"  # why a RUNNING trial went back to WAITING


def _stopped_path(worker: WorkerId) -> str:
    import tempfile

    name = f"{worker.host}_{worker.pid}_{worker.started}".replace(os.sep, "_")
    return os.path.join(tempfile.gettempdir(), f"opsearch-stopped-{os.getuid()}", name)


def mark_stopped(worker: WorkerId, reason: str) -> None:
    """Note on this host that `worker` stopped on purpose (its storage unreachable past the
    grace period, a full disk), which it cannot write into the storage: a reaper here then hands
    its candidate back as it was (WAITING again), instead of failing it as lost by a crash and
    counting that against the candidate."""
    path = _stopped_path(worker)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(" ".join(reason.split())[:500])
    except OSError:  # no room here either: the candidate is then taken for lost, as before
        pass


def stopped_reason(worker: WorkerId | None) -> str | None:
    """Why a gone worker of this host stopped on purpose (mark_stopped), or None."""
    if worker is None or worker.host != socket.gethostname():
        return None
    try:
        with open(_stopped_path(worker)) as f:
            return f.read() or "stopped"
    except OSError:
        return None
HANG_MARGIN_S = 60.0  # past the time limit by this much, a candidate that is still running hangs


class Heartbeat:
    """Writes a timestamp on a RUNNING trial every `interval` seconds from a daemon thread.

    Past `hang_after` seconds (the time limit and a margin: the limit's alarm did not get
    through, the candidate is stuck where no signal reaches) it marks the trial hung and stops
    beating, so that reapers take the worker for lost after the grace period, instead of a live
    heartbeat holding the candidate, and the end of the search, forever."""

    def __init__(self, storage: BaseStorage, trial_id: int, interval: float,
                 hang_after: float | None = None):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.hang_after = hang_after
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="opsearch-heartbeat")

    def __enter__(self) -> "Heartbeat":
        if self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            if self.hang_after is not None and time.monotonic() - self._started > self.hang_after:
                with contextlib.suppress(Exception), no_retry():
                    self.storage.set_trial_system_attr(self.trial_id, HUNG_KEY, time.time())
                return
            try:
                with no_retry():  # an outage: the next beat is the retry
                    self.storage.set_trial_system_attr(self.trial_id, HEARTBEAT_KEY, time.time())
            except Exception:  # finished meanwhile, or the database hiccuped: try next beat
                pass
