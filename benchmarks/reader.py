"""Reading and writing a study: Optuna's ORM reader against opsearch's plain-SQL reader, and
writing a finished candidate's attributes one by one against opsearch's one-transaction write.

    python benchmarks/reader.py [--trials 10000] [--writes 50]

Builds an SQLite study of N finished candidates (benchmarks/scale.py's `big_study`: the
contract attributes, 80% rejected), then, side by side in one process:
- read every trial: `storage.get_all_trials` (Optuna's ORM) and `study._read_rdb_trials`
  (what `Run.sync` uses), best of 3 each;
- finish a RUNNING trial with ~12 user attributes: Optuna's `set_trial_user_attr` per
  attribute then `set_trial_state_values`, against `Run.finish_trial` (one transaction).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def best_of(n: int, fn) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000)
    parser.add_argument("--writes", type=int, default=50)
    args = parser.parse_args()

    from optuna.trial import TrialState
    from scale import big_study

    from opsearch.study import rdb as study_mod  # the fast reader
    from opsearch.study import Run, open_storage

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        url = big_study(tmp, args.trials)
        print(f"{args.trials:,}-trial SQLite study written in {time.perf_counter() - t:.1f} s")
        storage = open_storage(url, create=False)
        study_id = storage.get_study_id_from_name("big")
        orm = best_of(3, lambda: storage.get_all_trials(study_id, deepcopy=False))
        fast_rows = study_mod._read_rdb_trials(storage, {study_id: -1}, set())
        assert fast_rows is not None and len(fast_rows) == args.trials
        fast = best_of(3, lambda: study_mod._read_rdb_trials(storage, {study_id: -1}, set()))
        print(f"read all trials: Optuna ORM {orm:.2f} s, plain SQL {fast:.2f} s ({orm / fast:.1f}x)")

        run = Run(storage, "big", url)
        attrs = {"verdict": "evaluated", "elapsed_s": 6.5, "formula": "x", "hash": "h" * 24,
                 "equiv_hash": "e" * 16, "equiv_fp": "[0.1,0.2]", "filter_s/validity": 1e-5,
                 "filter_s/numerics": 0.005, "filter_s/equivalence": 0.002,
                 "acc/resnet": 0.9, "acc/mobilenetv2": 0.9, "acc/efficientnet": 0.9}
        values = [0.9, 0.9, 0.9]

        def one_by_one():
            record = run.start_trial({"kind": "candidate"})
            for key, value in attrs.items():
                storage.set_trial_user_attr(record.trial_id, key, value)
            storage.set_trial_state_values(record.trial_id, TrialState.COMPLETE, values)

        def one_write():
            record = run.start_trial({"kind": "candidate"})
            run.finish_trial(record, TrialState.COMPLETE, values, attrs)

        for label, fn in (("per attribute (Optuna API)", one_by_one), ("one transaction", one_write)):
            t = time.perf_counter()
            for _ in range(args.writes):
                fn()
            print(f"start + finish a candidate, {len(attrs)} attributes, {label}: "
                  f"{(time.perf_counter() - t) / args.writes * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
