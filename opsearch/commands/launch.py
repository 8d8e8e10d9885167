"""`opsearch launch RUN`: start N workers of one search (locally or as a SLURM job array), print
where they are and return; `opsearch status RUN` then follows them."""
from __future__ import annotations

import os

from opsearch.commands.search import add_search_arguments, config_from_args
from opsearch.errors import UserError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "launch", help="start N workers of a search (local processes or a SLURM job array)",
        description="Start N workers that run the same search against the run's storage, print "
                    "their job ids and logs, and return. Workers coordinate through the study: "
                    "use PostgreSQL or a journal file on a shared filesystem for SLURM.")
    p.add_argument("run", metavar="RUN", help="the run (study) name; with --storage, its name in "
                                              "that storage")
    p.add_argument("--executor", required=True, choices=("local", "slurm"),
                   help="local: detached processes on this machine; slurm: a job array")
    add_search_arguments(p, workers_help="number of workers to start (default 1; local with GPUs: "
                                         "devices x --workers-per-device)")
    p.add_argument("--gpus-per-worker", dest="gpus_per_worker", type=int, default=0,
                   help="GPUs SLURM gives each worker (slurm only)")
    p.add_argument("--cpus-per-worker", dest="cpus_per_worker", type=int, default=1,
                   help="CPUs SLURM gives each worker (default 1: one torch thread per worker)")
    p.add_argument("--slurm-partition", dest="slurm_partition", help="SLURM partition")
    p.add_argument("--slurm-time", dest="slurm_time",
                   help="time limit per job (minutes, H:MM:SS or D-HH:MM:SS; default 60); at its "
                        "end the worker is requeued and carries on")
    p.add_argument("--slurm-option", dest="slurm_option", action="append", default=[],
                   metavar="KEY=VALUE", help="any other sbatch option (repeatable), e.g. account=x")
    p.add_argument("--log-dir", dest="log_dir",
                   help="where the workers' logs go (default: the run's folder, workers/)")
    p.set_defaults(func=run)


def run(args) -> int:
    from opsearch.commands.common import run_dir, run_hint
    from opsearch.launch import (LaunchSpec, check_spec, launch_local, launch_slurm,
                                 parse_slurm_options, parse_time)
    from opsearch.study import resolve, run_url

    if args.name is not None and args.name != args.run:
        raise UserError(f"--name {args.name!r} differs from RUN {args.run!r}; give the run once")
    args.name = args.run
    if args.workers is not None and args.workers < 1:  # before the config's own 1..512 check
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    config = config_from_args(args)
    url, study_name = (config.storage, config.name) if config.storage else resolve(config.name)
    spec = LaunchSpec(executor=args.executor, workers=args.workers, log_dir="",
                      gpus_per_worker=args.gpus_per_worker, partition=args.slurm_partition,
                      time_min=parse_time(args.slurm_time), cpus_per_worker=args.cpus_per_worker,
                      slurm_options=parse_slurm_options(args.slurm_option))
    check_spec(spec, config, url)
    spec.log_dir = os.path.abspath(args.log_dir or os.path.join(run_dir(url, study_name), "workers"))

    # Everything a worker would refuse, refused here; the study and its baselines are created
    # once, here, so that N workers starting at the same instant find them.
    from opsearch.engine import Setup, enqueue_baselines

    setup = Setup.from_config(config)
    run_ = setup.open_run()
    run_.sync()
    enqueue_baselines(run_, setup)

    launched = launch_slurm(spec, config) if spec.executor == "slurm" else launch_local(spec, config)
    what = "job" if spec.executor == "slurm" else "pid"
    print(f"launched {len(launched)} worker(s) ({spec.executor}) on run {study_name} "
          f"[{url if '@' not in url else url.split('@', 1)[1]}], budget {config.budget}")
    for w in launched:
        print(f"  worker {w.index}: {what} {w.job_id}  {w.device}  log {w.log}")
    hint = run_hint(url, study_name, run_url(study_name))
    print(f"follow it: opsearch status {hint}")
    return 0
