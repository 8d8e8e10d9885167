"""Torch/OpenMP threads per worker: `opsearch evaluate LAYER` as a whole process under each
thread setting, on a quiet machine and beside a busy process.

    python benchmarks/threads.py [--layer bn_relu] [--busy] [--settings 1,2,2-passive]

Each setting runs `opsearch evaluate LAYER --json --quiet` in a fresh process with
OMP_NUM_THREADS set (and OMP_WAIT_POLICY=PASSIVE for "-passive"), interleaved over --repeats
rounds; prints the best wall seconds per setting. --busy runs one CPU-bound Python process
beside them (what another worker or another user's job does to spinning OpenMP threads).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def run_once(layer: str, setting: str, extra: list[str]) -> float:
    threads, _, policy = setting.partition("-")
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    if policy:
        env["OMP_WAIT_POLICY"] = policy.upper()
    else:
        env.pop("OMP_WAIT_POLICY", None)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "opsearch", "evaluate", layer, "--json", "--quiet", *extra],
                   env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="bn_relu")
    parser.add_argument("--settings", default="1,2,2-passive")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--busy", action="store_true")
    parser.add_argument("extra", nargs="*", help="more `opsearch evaluate` flags (after --)")
    args = parser.parse_args()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            for setting in args.settings.split(","):
                wall = run_once(args.layer, setting, args.extra)
                best[setting] = min(best.get(setting, float("inf")), wall)
                print(f"  {setting}: {wall:.1f} s", flush=True)
    finally:
        if busy is not None:
            busy.kill()
    print(f"opsearch evaluate {args.layer}, whole process, best of {args.repeats}"
          f"{' beside a busy process' if args.busy else ''}:")
    for setting, wall in best.items():
        print(f"| {setting} | {wall:.1f} s |")


if __name__ == "__main__":
    main()
