"""`opsearch launch`: bad input refused before anything starts, each worker's device environment,
a local launch that finishes its budget, and workers started at the same instant on a new study."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from opsearch import devices
from opsearch.cli import main
from opsearch.config import SearchConfig
from opsearch.errors import UserError

import resources
from studies import TINY_PROXY_TOML, release_together

TINY = """
space = "evonorm"
budget = {budget}
dataset = "synthetic"
archs = ["resnet"]
filters = ["validity", "numerics", "equivalence"]
baselines = {baselines}
plots = false
seed = 1
heartbeat_s = 2
grace_s = 30
""" + TINY_PROXY_TOML


def tiny_config(tmp_path, budget=6, baselines='["bn_relu"]'):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY.format(budget=budget, baselines=baselines))
    return path


def trials_of(url, name):
    from opsearch.study import open_run, run_trials
    return run_trials(open_run(url, name))


def assert_accounted(trials, budget):
    """Every candidate finished, none left RUNNING or WAITING, numbers unique, budget reached."""
    from optuna.trial import TrialState

    def study_of(t):  # numbers count per study: the run's, its stage studies'
        kind = t.user_attrs.get("kind")
        return kind if kind in ("rerank", "promotion") else "run"

    numbers = [(study_of(t), t.number) for t in trials]
    assert len(numbers) == len(set(numbers))
    stuck = [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert not stuck, f"trials left unfinished: {stuck}"
    counted = [t for t in trials if t.user_attrs.get("kind") == "candidate"
               and t.user_attrs.get("verdict") != "failed:worker_lost"]
    assert len(counted) >= budget
    assert all(t.user_attrs.get("verdict") for t in trials)
    # a lost candidate came back: its retry is in the study
    retried = {(study_of(t), t.user_attrs.get("retry_of")) for t in trials}
    for t in trials:
        if t.user_attrs.get("verdict") == "failed:worker_lost":
            assert (study_of(t), t.number) in retried, f"lost trial {t.number} was never handed out again"


# --------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing launched


@pytest.mark.parametrize("argv, message", [
    (["launch", "r", "--executor", "slurm"], "SQLite file"),
    (["launch", "r", "--executor", "local", "--workers", "0"], "--workers must be at least 1"),
    (["launch", "r", "--executor", "local", "--gpus-per-worker", "1"], "--gpus-per-worker"),
    (["launch", "r", "--executor", "local", "--slurm-partition", "p"], "need --executor slurm"),
    (["launch", "r", "--executor", "slurm", "--storage", "postgresql://nobody@127.0.0.1:1/x",
      "--slurm-time", "soon"], "--slurm-time"),
    (["status", "nothing_here"], "no study database"),
])
def test_bad_input_is_one_line_and_launches_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPSEARCH_RUNS_DIR", str(tmp_path / "runs"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()  # no study, no logs


def test_unknown_executor_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["launch", "r", "--executor", "kubernetes"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "invalid choice: 'kubernetes'" in err
    assert not (tmp_path / "runs").exists()


def test_unknown_partition_is_refused(tmp_path, monkeypatch):
    from opsearch import launch

    monkeypatch.setattr(launch, "slurm_partitions", lambda: ["debug", "gpu"])
    with pytest.raises(UserError, match="no partition 'bigmem'; it has: debug, gpu"):
        launch.check_partition("bigmem")
    launch.check_partition("gpu")


def test_slurm_time_parsing():
    from opsearch.launch import parse_time

    assert parse_time(None) == 60
    assert parse_time("30") == 30
    assert parse_time("1:30:00") == 90
    assert parse_time("1-00:00:00") == 1440
    assert parse_time("10:30") == 11
    with pytest.raises(UserError):
        parse_time("0")


# --------------------------------------------------------------------------------------------
# Devices: one parser, one pinning rule


def test_one_devices_parser():
    assert devices.parse_devices("2") == 2
    assert devices.parse_devices("0,1") == [0, 1]
    assert devices.parse_devices("auto") == "auto"
    assert devices.parse_devices(-1) == "auto"
    assert devices.parse_devices([1, "3"]) == [1, 3]
    for bad in ("zero", "0,x", "-2,1", True):
        with pytest.raises(UserError):
            devices.parse_devices(bad)
    assert devices.gpu_ids("cpu", "0,1", count=4) is None
    assert devices.gpu_ids("gpu", "auto", count=3) == [0, 1, 2]
    assert devices.gpu_ids("gpu", "2", count=3) == [0, 1]
    assert devices.gpu_ids("gpu", "1,2", count=3) == [1, 2]
    assert devices.gpu_ids("auto", 1, count=0) is None
    with pytest.raises(UserError, match="no CUDA device 5"):
        devices.gpu_ids("gpu", "0,5", count=2)
    with pytest.raises(UserError, match="no CUDA device is visible"):
        devices.gpu_ids("gpu", "1", count=0)


def test_every_caller_uses_the_one_parser():
    """engine and `opsearch evaluate` agree because they share the code."""
    import inspect

    from opsearch import local_run
    from opsearch.commands import evaluate

    assert not hasattr(evaluate, "parse_devices") or evaluate.parse_devices is devices.parse_devices
    assert "devices.gpu_ids(" in inspect.getsource(local_run.device_ids)


def test_worker_environment_pins_one_device_and_one_thread():
    env = devices.worker_environment(1, {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "4,6"})
    assert env["CUDA_VISIBLE_DEVICES"] == "6"  # index 1 of what this process sees
    assert env["OMP_NUM_THREADS"] == "1" and env["PATH"] == "/bin"
    env = devices.worker_environment(2, {})
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
    cpu = devices.worker_environment(None, {"CUDA_VISIBLE_DEVICES": "0"})
    assert cpu["CUDA_VISIBLE_DEVICES"] == "0"  # a CPU worker's environment is left alone
    with pytest.raises(UserError):
        devices.physical_id(2, {"CUDA_VISIBLE_DEVICES": "0,1"})
    assert devices.describe(0, {"CUDA_VISIBLE_DEVICES": "3"}) == "cuda:0 (CUDA_VISIBLE_DEVICES=3)"
    assert devices.describe(None) == "cpu"


def _report_env(queue) -> None:
    queue.put((os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("OMP_NUM_THREADS")))


def test_a_spawned_worker_starts_with_its_device_environment():
    """The engine's local workers are spawned inside devices.environment(...): the child has
    CUDA_VISIBLE_DEVICES from its first instruction, and the parent's environment is restored."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    before = dict(os.environ)
    with devices.environment(devices.worker_environment(3, {k: v for k, v in os.environ.items()
                                                            if k != "CUDA_VISIBLE_DEVICES"})):
        p = ctx.Process(target=_report_env, args=(queue,))
        p.start()
    assert dict(os.environ) == before
    assert queue.get(timeout=120) == ("3", "1")
    p.join(timeout=60)


def test_local_launch_pins_each_worker(tmp_path, monkeypatch):
    """--accelerator gpu --devices 1,3 --workers-per-device 2: four workers, two per device, each
    seeing only its device (as device 0)."""
    from opsearch import launch

    monkeypatch.setattr(devices, "cuda_device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    started = []

    class FakePopen:
        def __init__(self, cmd, env, **kwargs):
            started.append((cmd, env))
            self.pid = 1000 + len(started)

    monkeypatch.setattr(launch.subprocess, "Popen", FakePopen)
    config = SearchConfig(accelerator="gpu", devices="1,3", workers_per_device=2)
    spec = launch.LaunchSpec(executor="local", workers=None, log_dir=str(tmp_path))
    launched = launch.launch_local(spec, config)
    assert [w.job_id for w in launched] == ["1001", "1002", "1003", "1004"]
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["1", "3", "1", "3"]
    for i, (cmd, _) in enumerate(started):
        child = json.loads(open(cmd[-2]).read())
        assert child["devices"] == [0] and child["workers"] == 1 and cmd[-1] == str(i)


def test_strategy_and_precision_reach_the_evaluator():
    from opsearch.engine import make_eval_config

    config = SearchConfig(strategy="ddp_spawn", precision="bf16-mixed", archs=["resnet"])
    ec = make_eval_config(config)
    assert ec.strategy == "ddp_spawn" and ec.precision == "bf16-mixed" and ec.threads == 1


# --------------------------------------------------------------------------------------------
# Real workers


def wait_done(url, name, budget, timeout=400):
    from opsearch.commands.status import collect
    from opsearch.study import open_run

    deadline = time.time() + timeout
    while time.time() < deadline:
        s = collect(open_run(url, name))
        if s["candidates_left"] == 0 and not s["live_workers"] and s["candidates_in_flight"] == 0:
            return s
        time.sleep(2)
    raise AssertionError(f"not finished in {timeout} s: {s}")


@pytest.mark.slow
def test_local_launch_finishes_the_budget(tmp_path):
    config = tiny_config(tmp_path, budget=6)
    url = f"sqlite:///{tmp_path}/study.db"
    out = subprocess.run([sys.executable, "-m", "opsearch", "launch", "loc", "--executor", "local",
                          "--workers", "2", "--config", str(config), "--storage", url],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("pid ") == 2 and "worker-1.log" in out.stdout, out.stdout
    status = wait_done(url, "loc", 6)
    assert status["eta_s"] == 0.0
    assert_accounted(trials_of(url, "loc"), 6)
    logs = sorted((tmp_path / "loc" / "workers").glob("worker-*.log"))
    assert len(logs) == 2 and all("budget reached" in p.read_text() for p in logs)


def storage_url(tmp_path, kind: str) -> str:
    if kind == "postgres":
        return resources.postgres_url()
    return {"sqlite": f"sqlite:///{tmp_path}/new.db", "journal": f"journal:///{tmp_path}/new.journal"}[kind]


GO = """
import os, sys, time
import opsearch.cli, opsearch.engine, opsearch.trainers.evaluator  # the slow imports, before the start line
open(sys.argv[1] + ".ready", "w").close()
while not os.path.exists(sys.argv[2]):
    time.sleep(0.005)
sys.exit(opsearch.cli.main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_four_workers_start_at_the_same_instant_on_a_new_study(tmp_path, kind):
    """A job array starts like this: the storage and the study are created by all at once."""
    url = storage_url(tmp_path, kind)
    name = f"same_instant_{os.getpid()}_{int(time.time() * 1000)}"
    config = tiny_config(tmp_path, budget=8, baselines="[]")
    go = tmp_path / "go"
    procs = []
    for i in range(4):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", GO, str(tmp_path / f"w{i}"), str(go), "search", "--config",
             str(config), "--storage", url, "--name", name, "--quiet", "--seed", str(i)],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    release_together(procs, [tmp_path / f"w{i}.ready" for i in range(4)], go)
    results = [p.communicate(timeout=400) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert_accounted(trials_of(url, name), 8)


def test_inside_a_slurm_job_lightning_gets_a_plain_cluster_environment(monkeypatch):
    """submitit owns requeue in a worker's job: Lightning must not pick SLURMEnvironment (which
    installs its own requeue signal handler) nor wait for srun tasks that are not there."""
    from lightning_fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

    from opsearch.trainers import evaluator as ev

    for key in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert ev._cluster_plugins() == []
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_JOB_NAME", "opsearch-x")
    monkeypatch.setenv("SLURM_NODELIST", "vm")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert not ev._launched_externally()
    # DDP across 2 processes in one job (opsearch evaluate --devices 2 --strategy ddp under sbatch)
    trainer = ev.Evaluator(ev.EvalConfig(archs=("resnet",), dataset="synthetic", steps=1,
                                         accelerator="cpu", devices=2, strategy="ddp")).trainer(1)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, LightningEnvironment) and not isinstance(env, SLURMEnvironment)
    monkeypatch.setenv("SLURM_NTASKS", "2")  # a user's multi-task srun: Lightning's own way
    assert ev._launched_externally() and ev._cluster_plugins() == []


@pytest.mark.slow
def test_cuda_out_of_memory_fails_the_candidate_not_the_worker(tmp_path):
    import torch

    from opsearch import registry
    from opsearch.local_run import run_search
    from opsearch.rejection import Filter

    calls = []

    @registry.register_filter("oom_once_t11", replace=True)
    class OomOnce(Filter):
        name = "oom_once_t11"
        cost = 0.0

        def check(self, candidate, context):
            calls.append(1)
            if len(calls) == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return self.accept()

    config = SearchConfig(name="oom", storage=f"sqlite:///{tmp_path}/s.db", budget=4,
                          dataset="synthetic", archs=["resnet"], baselines=[],
                          filters=["oom_once_t11", "validity"], plots=False,
                          space_options={"num_nodes": 4}, rerank={"enabled": False},
                          evaluator={"steps": 2, "batch_size": 16, "val_batch_size": 64,
                                     "warmup_steps": 1, "arch_options": {"width": 4, "depth": 1}})
    run = run_search(config)
    verdicts = [r.verdict for r in run.trials()]
    assert verdicts[0] == "failed:oom" and "out of memory" in run.trials()[0].user_attrs["reason"]
    assert len(verdicts) == 4 and all(v and v != "failed:oom" for v in verdicts[1:])
