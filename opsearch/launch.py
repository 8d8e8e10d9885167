"""Launching workers: N copies of one search, started by an executor, coordinated by the study.

Why no scheduler of our own: the study's storage already hands out candidates (a worker records
each one RUNNING before it starts, a lost worker's candidate is enqueued again), so a worker is
just `run_search` in a process; starting, requeuing and placing those processes is a scheduler's
job. Two executors:

  slurm  a SLURM job array through submitit (`SlurmExecutor`). A worker that SLURM preempts or
         times out gets submitit's USR2 signal: it hands its candidate back to the study
         (`Run.release`) and submitit requeues the same worker (`SearchJob.checkpoint`); a worker
         killed outright (scancel, a node failure) leaves its candidate RUNNING until a live
         worker reaps it (dead pid on the same host at once, silent heartbeat after grace_s on
         another, and at once when its own job comes back requeued: `WorkerId.supersedes`).
  local  detached processes on this machine (a new session each, logs under the run's folder).
         Not submitit's LocalExecutor: that is a debugging stand-in for a cluster whose jobs are
         killed at `timeout_min` and whose requeue needs the submitting Python session to keep
         watching; `opsearch launch` returns at once and its workers must outlive it. A local
         worker that dies is not restarted (no scheduler): the others reap its candidate, and the
         same launch command adds workers again.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

from opsearch import devices
from opsearch.config import SearchConfig
from opsearch.errors import UserError

EXECUTORS = ("local", "slurm")


@dataclass
class LaunchSpec:
    """What `opsearch launch` was asked for, beside the search itself."""

    executor: str
    workers: int | None
    log_dir: str
    gpus_per_worker: int = 0
    partition: str | None = None
    time_min: int = 60
    cpus_per_worker: int = 1
    slurm_options: dict[str, str] = field(default_factory=dict)


@dataclass
class LaunchedWorker:
    index: int
    job_id: str  # SLURM "1234_0", or the local process id
    log: str
    device: str = "cpu"


# --------------------------------------------------------------------------------------------
# Checks (all before anything is submitted)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite:")


def check_storage(url: str, executor: str) -> None:
    """One study file on one machine's disk cannot be shared by a cluster's nodes."""
    if executor == "slurm" and is_sqlite(url):
        raise UserError(f"{url} is an SQLite file, which workers on several machines cannot share: "
                        "use PostgreSQL (--storage postgresql://...) or a journal file on a shared "
                        "filesystem (--storage journal:///shared/path/study.journal)")


def parse_time(text: str | None, default: int = 60) -> int:
    """SLURM's time limit in minutes: 'M', 'H:MM:SS', 'D-HH[:MM[:SS]]' or 'MM:SS'."""
    if text is None:
        return default
    s = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise UserError(f"--slurm-time {text!r}: expected minutes, H:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is None and b is None:
        minutes = a  # "M"
    elif days is None and c is None:
        minutes = a + (1 if b else 0)  # "MM:SS", rounded up
    elif days is None:
        minutes = a * 60 + b + (1 if c else 0)  # "H:MM:SS"
    else:
        minutes = days * 1440 + a * 60 + (b or 0) + (1 if c else 0)  # "D-HH[:MM[:SS]]"
    if minutes < 1:
        raise UserError(f"--slurm-time {text!r}: at least one minute")
    return minutes


def parse_slurm_options(items: list[str]) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise UserError(f"--slurm-option {item!r}: expected KEY=VALUE (an sbatch option, "
                            "e.g. account=myproject or qos=high)")
        options[key.replace("-", "_")] = value.strip()
    return options


def slurm_partitions() -> list[str]:
    """The partitions this SLURM knows (UserError when there is no SLURM to ask)."""
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise UserError("--executor slurm: SLURM's sbatch/sinfo are not on PATH on this machine "
                        "(run opsearch launch where you submit jobs)")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"--executor slurm: sinfo failed: {e}") from None
    if out.returncode != 0:
        raise UserError(f"--executor slurm: sinfo failed: {out.stderr.strip().splitlines()[-1:] or out.returncode}")
    return [p.strip().rstrip("*") for p in out.stdout.split() if p.strip()]


def check_partition(partition: str | None) -> None:
    known = slurm_partitions()
    if partition is not None and partition not in known:
        raise UserError(f"SLURM knows no partition {partition!r}; it has: {', '.join(known) or 'none'}")


def check_spec(spec: LaunchSpec, config: SearchConfig, url: str) -> None:
    if spec.executor not in EXECUTORS:
        raise UserError(f"unknown executor {spec.executor!r}; known: {', '.join(EXECUTORS)}")
    if spec.workers is not None and spec.workers < 1:
        raise UserError(f"--workers must be at least 1, got {spec.workers}")
    if spec.gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker must be >= 0, got {spec.gpus_per_worker}")
    if spec.gpus_per_worker and spec.executor != "slurm":
        raise UserError("--gpus-per-worker asks a scheduler for GPUs; the local executor uses this "
                        "machine's: --accelerator gpu --devices 0,1 --workers-per-device K")
    if spec.executor != "slurm" and (spec.partition or spec.slurm_options):
        raise UserError("--slurm-partition/--slurm-option need --executor slurm")
    check_storage(url, spec.executor)
    if spec.executor == "slurm":
        check_partition(spec.partition)


# --------------------------------------------------------------------------------------------
# The worker (what each launched process runs)


class SearchJob:
    """One launched worker: the search, with this worker's index. Picklable (submitit sends it
    to the node); `checkpoint` makes SLURM's preemption/timeout requeue the same worker."""

    def __init__(self, config: dict[str, Any], index: int):
        self.config = config
        self.index = index

    def __call__(self) -> int:
        return run_worker(self.config, self.index)

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on USR2 (preemption, time limit): resubmit this same worker.
        Its in-flight candidate was handed back by the worker loop as it stopped."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(SearchJob(self.config, self.index))


def run_worker(config_dict: dict[str, Any], index: int) -> int:
    """Run one worker of a launched search to the budget (in the launched process)."""
    from opsearch.local_run import run_search
    from opsearch.study import WorkerId

    config = SearchConfig.from_dict({**config_dict, "workers": 1})
    me = WorkerId.current()
    print(f"opsearch worker {index}: host {me.host} pid {me.pid}"
          + (f" job {me.job}" if me.job else "")
          + (f" {devices.VISIBLE}={os.environ[devices.VISIBLE]}" if devices.VISIBLE in os.environ else ""),
          flush=True)
    from opsearch.progress import SearchProgress

    run = run_search(config, progress=SearchProgress(config), worker_index=index)
    print(f"opsearch worker {index}: budget reached ({run.candidates_counted()} candidates)",
          flush=True)
    return 0


# --------------------------------------------------------------------------------------------
# Executors


def worker_count(spec: LaunchSpec, config: SearchConfig) -> int:
    if spec.workers is not None:
        return spec.workers
    if spec.executor == "local":
        ids = devices.gpu_ids(config.accelerator, config.devices)
        if ids:
            return len(ids) * config.workers_per_device
    return 1


def launch_local(spec: LaunchSpec, config: SearchConfig) -> list[LaunchedWorker]:
    """Detached worker processes on this machine, each pinned to its device (if any)."""
    from opsearch.local_run import pinned_config

    os.makedirs(spec.log_dir, exist_ok=True)
    ids = devices.gpu_ids(config.accelerator, config.devices)
    launched = []
    for i in range(worker_count(spec, config)):
        device = devices.device_for_worker(ids, i)
        child = pinned_config(config, device)
        path = os.path.join(spec.log_dir, f"worker-{i}.config.json")
        with open(path, "w") as f:
            json.dump(child.to_dict(), f)
        log = os.path.join(spec.log_dir, f"worker-{i}.log")
        env = devices.worker_environment(device)
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "opsearch.launch", path, str(i)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        launched.append(LaunchedWorker(i, str(proc.pid), log, devices.describe(device, env)))
    return launched


def launch_slurm(spec: LaunchSpec, config: SearchConfig) -> list[LaunchedWorker]:
    """A SLURM job array of workers through submitit; GPUs, if asked, are SLURM's to assign."""
    try:
        import submitit
    except ImportError:
        raise UserError("--executor slurm needs submitit: pip install 'opsearch[slurm]'") from None
    import dataclasses

    if spec.gpus_per_worker:
        accelerator = config.accelerator if config.accelerator != "cpu" else "gpu"
        config = dataclasses.replace(config, accelerator=accelerator, devices=spec.gpus_per_worker,
                                     workers=1)
    n = worker_count(spec, config)
    os.makedirs(spec.log_dir, exist_ok=True)
    executor = submitit.SlurmExecutor(folder=os.path.join(spec.log_dir, "%j"),
                                      max_num_timeout=1000)
    params: dict[str, Any] = dict(job_name=f"opsearch-{config.name}", time=spec.time_min,
                                  cpus_per_task=spec.cpus_per_worker, array_parallelism=n,
                                  stderr_to_stdout=True, signal_delay_s=min(90, 30 * spec.time_min))
    if spec.partition:
        params["partition"] = spec.partition
    if spec.gpus_per_worker:
        params["gpus_per_node"] = spec.gpus_per_worker
    if spec.slurm_options:
        params["additional_parameters"] = dict(spec.slurm_options)
    try:
        executor.update_parameters(**params)
        with executor.batch():
            jobs = [executor.submit(SearchJob(config.to_dict(), i)) for i in range(n)]
    except UserError:
        raise
    except Exception as e:  # sbatch refused (an unknown option, account, qos...)
        text = " ".join(str(e).split())
        raise UserError(f"sbatch refused the job array: {text[-400:]}") from None
    device = f"{spec.gpus_per_worker} GPU(s) from SLURM" if spec.gpus_per_worker else "cpu"
    return [LaunchedWorker(i, job.job_id, str(job.paths.stdout), device)
            for i, job in enumerate(jobs)]


def main(argv: list[str] | None = None) -> int:
    """`python -m opsearch.launch CONFIG.json INDEX`: a local launched worker."""
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        config = json.load(f)
    try:
        return run_worker(config, int(argv[1]))
    except UserError as e:
        print(f"opsearch worker: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
