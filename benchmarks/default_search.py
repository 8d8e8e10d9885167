"""The default search as a new user runs it: `opsearch search` with no flags, timed as a whole
process, then its outcome read back with `opsearch show --json`.

    python benchmarks/default_search.py [--dir /tmp/default-search] [-- extra search flags]

Runs in a fresh directory (so runs/default/ starts empty) and prints the figures of
BENCHMARKS.md's "Default search" table: wall time of the whole command, verdict counts, the
best candidate by mean accuracy beside EvoNorm-B0 and BN-ReLU, and the mean time per candidate.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/opsearch-default-search")
    parser.add_argument("extra", nargs="*", help="extra `opsearch search` flags, after --")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "opsearch", "search", *args.extra], cwd=args.dir, check=True)
    wall = time.perf_counter() - start
    shown = subprocess.run([sys.executable, "-m", "opsearch", "show", "default", "--json"], cwd=args.dir,
                           check=True, capture_output=True, text=True)
    trials = json.loads(shown.stdout)["trials"]
    archs = json.loads(shown.stdout)["summary"]["archs"]
    candidates = [t["user_attrs"] for t in trials if t["user_attrs"].get("kind") == "candidate"]
    verdicts = Counter(a["verdict"].split(":")[0] if not a["verdict"].startswith("rejected:") else a["verdict"]
                       for a in candidates)

    def mean_acc(attrs):
        return sum(attrs[f"acc/{a}"] for a in archs) / len(archs)

    scored = [a for a in candidates if all(isinstance(a.get(f"acc/{x}"), float) for x in archs)]
    baselines = {t["user_attrs"]["layer"]: t["user_attrs"] for t in trials
                 if t["user_attrs"].get("kind") == "baseline" and t["user_attrs"].get("verdict") == "evaluated"}
    print(f"| wall time, whole command | {wall / 60:.0f} min {wall % 60:.0f} s |")
    print(f"| candidates | {len(candidates)}: " + ", ".join(f"{k} {v}" for k, v in verdicts.most_common()) + " |")
    if scored:
        best = max(scored, key=mean_acc)
        refs = ", ".join(f"{name} {mean_acc(baselines[name]):.3f}" for name in ("evonorm_b0", "bn_relu")
                         if name in baselines)
        print(f"| best candidate by mean accuracy | `{best['formula']}`: "
              + ", ".join(f"{a} {best[f'acc/{a}']:.3f}" for a in archs)
              + f" (mean {mean_acc(best):.3f}; {refs}) |")
    elapsed = [a["elapsed_s"] for a in candidates if isinstance(a.get("elapsed_s"), (int, float))]
    full = [a["elapsed_s"] for a in candidates if a["verdict"] == "evaluated"]
    if elapsed:
        print(f"| time per candidate | mean {sum(elapsed) / len(elapsed):.1f} s; a full evaluation "
              f"{min(full, default=0):.1f}-{max(full, default=0):.1f} s |")


if __name__ == "__main__":
    main()
