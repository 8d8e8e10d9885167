"""Running a search on this machine: the worker processes, their start line, their devices.

The engine (engine.py) is what one worker does; this module is how many of them run here:
worker 0 in the calling process, the others spawned, each pinned to its device, all starting
together, and a worker that dies or meets a fault of the environment reported once. Workers on
other machines are started by a scheduler instead (launch.py) and meet only in the storage.
"""
from __future__ import annotations

import multiprocessing
import signal
import sys
import time
from typing import Callable

from opsearch import devices
from opsearch.config import SearchConfig
from opsearch.engine import Setup, Worker, enqueue_baselines
from opsearch.errors import EnvironmentFault
from opsearch.study import Run, WorkerId, share_outage_notice


class StartLine:
    """Local workers start taking candidates together, once all have started up.

    Why: a worker's start-up (imports, data, the evaluator) takes seconds; without a start line
    the first one ready takes every candidate of a short search while the others still import,
    and `--workers N` silently means one. Shared counter, polled; the parent releases everyone
    when a worker died before reaching the line (`give_up`), and nobody waits past `timeout_s`."""

    def __init__(self, ready, expected: int, give_up: Callable[[], bool] | None = None,
                 timeout_s: float = 600.0):
        self.ready, self.expected, self.give_up, self.timeout_s = ready, expected, give_up, timeout_s

    def wait(self) -> None:
        with self.ready.get_lock():
            self.ready.value += 1
        deadline = time.time() + self.timeout_s
        while self.ready.value < self.expected and time.time() < deadline:
            if self.give_up is not None and self.give_up():
                with self.ready.get_lock():
                    self.ready.value = max(self.ready.value, self.expected)
                break
            time.sleep(0.05)


def _worker_process(config_dict: dict, index: int, lock, device_index, ready, expected: int,
                    faults=None, outage_notice=None) -> None:
    """Entry point of a local worker process (its environment pins its device and threads).
    A fault of the environment (EnvironmentFault: the storage unreachable, a full disk) goes to
    the parent through `faults`, which says it once, and sets the exit status; no traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    share_outage_notice(outage_notice)
    try:
        config = SearchConfig.from_dict(config_dict)
        setup = Setup.from_config(config)
        Worker(setup, lock=lock, device_index=device_index, worker_index=index,
               start_line=StartLine(ready, expected)).run_loop()
    except EnvironmentFault as e:
        if faults is not None:
            faults.put((type(e).__name__, str(e)))
        sys.exit(e.exit_code)


def run_search(config: SearchConfig, progress=None, worker_index: int = 0,
               enqueue_missing_baselines: bool = True) -> Run:
    """Run (or resume) a search to its budget, then its re-ranking stage (unless switched off);
    returns the run with every trial synced.

    `worker_index` numbers this process among workers started together (a launched job's task):
    it shifts the worker's seed so that workers do not propose the same genomes."""
    setup = Setup.from_config(config)
    run = setup.open_run()
    run.sync()
    run.reap_lost(config.grace_s, me=WorkerId.current())
    run.requeue_orphans()  # a reaper stopped between failing a trial and enqueueing its copy
    if enqueue_missing_baselines:
        enqueue_baselines(run, setup)
    if progress is not None:
        progress.start(run)
    if resolved_workers(config) == 1:
        device = _device_for(config, 0)
        worker = Worker(setup, run=run, device_index=device, worker_index=worker_index,
                        on_result=(progress.on_result if progress is not None else None))
        worker.run_loop()
    else:
        _run_local_workers(setup, run, progress)
    run.sync()
    return run


def device_ids(config: SearchConfig) -> list[int] | None:
    """The GPUs a search may use (None on CPU); devices that do not exist are a UserError."""
    return devices.gpu_ids(config.accelerator, config.devices)


def _device_for(config: SearchConfig, index: int) -> int | None:
    return devices.device_for_worker(device_ids(config), index)


def resolved_workers(config: SearchConfig) -> int:
    """--workers, or --workers-per-device workers on each device on GPUs (1 on CPU)."""
    if config.workers is not None:
        return config.workers
    ids = device_ids(config)
    return len(ids) * config.workers_per_device if ids else 1


def pinned_config(config: SearchConfig, device: int | None) -> SearchConfig:
    """The config of a worker pinned to one GPU: it sees that GPU alone, as device 0."""
    if device is None:
        return config
    import dataclasses
    return dataclasses.replace(config, devices=[0], workers=1)


def _run_local_workers(setup: Setup, run: Run, progress) -> None:
    """Workers 1..N-1 as spawned processes, worker 0 in this process.

    Why this process works too: it has already imported torch and Lightning and set the search
    up; a spawned worker 0 would pay that start-up again on a machine whose cores the workers
    share (2 workers on 2 cores: three processes importing torch at once, one of them idle
    afterwards). One torch thread per worker (make_eval_config). Each child is pinned through
    its environment, which a spawned child reads before any of its code (and so CUDA) runs."""
    config = setup.config
    ctx = multiprocessing.get_context("spawn")
    lock = ctx.Lock()
    workers = resolved_workers(config)
    ready = ctx.Value("i", 0)
    faults = ctx.SimpleQueue()  # (class name, message) of a child's EnvironmentFault
    outage_notice = ctx.Value("d", 0.0)  # a storage outage is said once, by one worker
    share_outage_notice(outage_notice)
    procs = []
    for i in range(1, workers):
        device = _device_for(config, i)
        child = pinned_config(config, device)
        p = ctx.Process(target=_worker_process, name=f"opsearch-worker-{i}",
                        args=(child.to_dict(), i, lock, None if device is None else 0, ready, workers,
                              faults, outage_notice))
        with devices.environment(devices.worker_environment(device)):
            p.start()
        procs.append(p)
    start_line = StartLine(ready, workers, give_up=lambda: any(p.exitcode is not None for p in procs))
    worker = Worker(setup, run=run, lock=lock, device_index=_device_for(config, 0), worker_index=0,
                    on_result=(progress.on_result if progress is not None else None),
                    on_other=(progress.on_record if progress is not None else None),
                    start_line=start_line)
    try:
        worker.run_loop()
        for p in procs:  # at the budget: the others end with their last candidate
            while p.is_alive():
                p.join(timeout=1.0)
                if progress is not None:
                    for record in run.sync():
                        progress.on_record(record)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    except EnvironmentFault:
        for p in procs:  # the others meet the same fault at their next write, or finish first
            p.join()
        raise
    finally:
        for p in procs:
            p.join(timeout=30)
        share_outage_notice(None)
    failed = [p for p in procs if p.exitcode not in (0, None)]
    run.sync()
    if failed and (run.candidates_counted() < config.budget or run.unfinished()):
        # A worker that died (killed, out of memory) leaves its candidate RUNNING: reap it here
        # so that a resume, or the workers still alive, hand it out again.
        run.sync()
        run.reap_lost(config.grace_s)
        if not faults.empty() and run.candidates_counted() < config.budget:
            from opsearch import errors
            name, message = faults.get()
            fault = getattr(errors, name, errors.EnvironmentFault)
            raise (fault if isinstance(fault, type) and issubclass(fault, errors.EnvironmentFault)
                   else errors.EnvironmentFault)(message)
