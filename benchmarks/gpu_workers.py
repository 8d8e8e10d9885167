"""GPU workers: a short search with 1, 2, 4 and 8 workers sharing one GPU.

The proxies are small (8x8 digits, width 8): one worker leaves most of a GPU idle, so several
workers per device (`--workers-per-device K`, each pinned with CUDA_VISIBLE_DEVICES) should raise
candidates per minute until the GPU, or the host's CPUs feeding it, saturate. For each K: the
default search (default proxy, default filters, real training, no baselines) on a fresh SQLite
study, candidates per minute (first start to last end, and while all workers were busy, as in
benchmarks/scale.py), and the GPU's utilisation and memory sampled once a second with nvidia-smi.

    python benchmarks/gpu_workers.py                          # K = 1 2 4 8, budget 24, GPU 0
    python benchmarks/gpu_workers.py --workers 1 2 --budget 12 --precision 16-mixed

Needs a CUDA GPU and nvidia-smi; prints why and exits 2 without one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

CONFIG = """
name = "gpu"
budget = {budget}
baselines = []
storage = "{storage}"
plots = false
seed = 0
accelerator = "gpu"
devices = "{device}"
workers_per_device = {workers}
{precision}
"""


class GpuSampler:
    """nvidia-smi once a second in a thread: utilisation (%) and memory used (MiB)."""

    def __init__(self, device: int):
        self.device = device
        self.util: list[float] = []
        self.mem: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            out = subprocess.run(["nvidia-smi", "-i", str(self.device), "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True)
            try:
                util, mem = (float(v) for v in out.stdout.strip().split(","))
            except ValueError:
                continue
            self.util.append(util)
            self.mem.append(mem)

    def __enter__(self) -> "GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def run_once(tmp: str, workers: int, budget: int, device: int, precision: str | None) -> dict:
    from opsearch.study import open_run

    storage = f"sqlite:///{tmp}/gpu-w{workers}.db"
    path = os.path.join(tmp, f"gpu-w{workers}.toml")
    with open(path, "w") as f:
        f.write(CONFIG.format(budget=budget, storage=storage, device=device, workers=workers,
                              precision=f'precision = "{precision}"' if precision else ""))
    start = time.time()
    with GpuSampler(device) as gpu:
        done = subprocess.run([sys.executable, "-m", "opsearch", "search", "--config", path, "--quiet"],
                              capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"search with {workers} workers failed:\n{done.stderr[-3000:]}")
    trials = [t for t in open_run(storage, "gpu").get_trials() if t.datetime_complete is not None]
    first = min(t.datetime_start for t in trials).timestamp()
    last = max(t.datetime_complete for t in trials).timestamp()
    by_worker: dict = {}
    for t in trials:
        by_worker.setdefault((t.system_attrs.get("opsearch:worker") or {}).get("pid"), []).append(t)
    busy_from = max(min(t.datetime_start for t in ts).timestamp() for ts in by_worker.values())
    busy_to = min(max(t.datetime_complete for t in ts).timestamp() for ts in by_worker.values())
    in_busy = [t for t in trials if busy_from <= t.datetime_complete.timestamp() <= busy_to]
    devices = sorted({(t.system_attrs.get("opsearch:worker") or {}).get("device") or "?" for t in trials})
    return {"rate": len(trials) / ((last - first) / 60.0),
            "busy_rate": (len(in_busy) / ((busy_to - busy_from) / 60.0)
                          if busy_to - busy_from > 1.0 and len(in_busy) >= 2 else float("nan")),
            "wall": time.time() - start, "startup": first - start,
            "util": statistics.mean(gpu.util) if gpu.util else float("nan"),
            "util_max": max(gpu.util) if gpu.util else float("nan"),
            "mem": max(gpu.mem) if gpu.mem else float("nan"), "devices": devices,
            "evaluated": sum(1 for t in trials if t.user_attrs.get("verdict") == "evaluated"),
            "oom": sum(1 for t in trials if t.user_attrs.get("verdict") == "failed:oom")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--budget", type=int, default=24)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--precision", default=None)
    args = parser.parse_args()
    if shutil.which("nvidia-smi") is None:
        print("gpu_workers: no nvidia-smi on this machine; run it where a CUDA GPU is", file=sys.stderr)
        return 2
    from opsearch.devices import cuda_device_count

    if cuda_device_count() <= args.device:
        print(f"gpu_workers: no CUDA device {args.device} visible", file=sys.stderr)
        return 2
    name = subprocess.run(["nvidia-smi", "-i", str(args.device), "--query-gpu=name", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()
    print(f"{name}, {os.cpu_count()} CPU cores, budget {args.budget}, default proxy"
          + (f", precision {args.precision}" if args.precision else ""))
    print(f"{'workers':>7} {'cand/min':>9} {'busy/min':>9} {'ratio':>6} {'gpu util %':>10} "
          f"{'max %':>6} {'mem MiB':>8} {'start-up s':>10} {'wall s':>7} {'evaluated':>9} {'oom':>4}")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workers:
            r = run_once(tmp, w, args.budget, args.device, args.precision)
            base = base or r["rate"]
            print(f"{w:>7} {r['rate']:>9.1f} {r['busy_rate']:>9.1f} {r['rate'] / base:>6.2f} "
                  f"{r['util']:>10.0f} {r['util_max']:>6.0f} {r['mem']:>8.0f} {r['startup']:>10.1f} "
                  f"{r['wall']:>7.1f} {r['evaluated']:>9} {r['oom']:>4}   {', '.join(r['devices'])}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
