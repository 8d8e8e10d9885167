"""A full disk: one line naming the file, exit status 4, nothing written half, and the study
resumes once space is freed.

The end-to-end tests run the commands on a real, small tmpfs (8 MiB, in a private mount
namespace: `unshare -rm`, never the real disk), filled by the fault point `recorded:fill`
(opsearch/faults.py) after the first trial is recorded. The unit tests cut single writes short.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
from optuna.trial import TrialState

from opsearch.errors import DiskFull
from opsearch.study import open_run, open_storage, run_trials

import contract
import resources
from studies import TINY_PROXY_TOML

CONFIG = """
name = "crash"
space = "evonorm"
algorithm = "regularized_evolution"
budget = 5
dataset = "synthetic"
archs = ["resnet"]
filters = ["validity", "numerics", "equivalence"]
baselines = ["bn_relu"]
storage = "{storage}"
workers = 1
plots = false
seed = 1
""" + TINY_PROXY_TOML

# Runs inside `unshare -rm` (a private mount namespace): the two tmpfs live as long as this
# script. D holds the study, E the files that export and plot write.
DRIVER = r"""
set -u
mount -t tmpfs -o size=8m opsearch-study "$D" || exit 99
mount -t tmpfs -o size=1m opsearch-files "$E" || exit 99
run() { name=$1; shift; "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"; echo $? >"$OUT/$name.rc"; }
snapshot() { mkdir -p "$OUT/$1"; cp -a "$D"/study.* "$OUT/$1/"; }
run full env OPSEARCH_FAULT=recorded:fill OPSEARCH_FAULT_STATE="$D/filler" \
    "$PY" -m opsearch search --config "$CONFIG" --quiet
snapshot full
"$PY" -c "from opsearch import faults; faults._fill('$D/filler2')"  # closing may have freed some
run show "$PY" -m opsearch show crash --storage "$STORAGE"  # reading a study on a full disk
rm -f "$D/filler" "$D/filler2"
"$PY" -c "from opsearch import faults; faults._fill('$E/filler')"
run export "$PY" -m opsearch export crash --storage "$STORAGE" --trial 0 -o "$E/layer.py"
run plot "$PY" -m opsearch plot crash --storage "$STORAGE" -o "$E/plots"
ls -A "$E" "$E/plots" >"$OUT/files_when_full.ls" 2>&1
rm -f "$E/filler"
run resumed "$PY" -m opsearch search --config "$CONFIG" --quiet
run export_again "$PY" -m opsearch export crash --storage "$STORAGE" --trial 0 -o "$E/layer.py"
snapshot resumed
exit 0
"""



def numbered(trials) -> dict:
    """Trials by (study, number): numbers count per study (the run's, its stage studies')."""
    return {(t.user_attrs.get("kind") if t.user_attrs.get("kind") in ("rerank", "promotion")
             else "run", t.number): t for t in trials}

def _namespace_works() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m none /mnt"],
                           capture_output=True)
    return probe.returncode == 0


def _read(out, name):
    return (out / name).read_text()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_a_full_disk_stops_with_one_line_and_the_study_resumes(tmp_path, kind):
    if not _namespace_works():
        resources.missing("no private mount namespace here (unshare -rm + mount tmpfs) for a "
                          "size-limited filesystem")
    small, files, out = tmp_path / "small", tmp_path / "files", tmp_path / "out"
    for folder in (small, files, out):
        folder.mkdir()
    file = small / ("study.db" if kind == "sqlite" else "study.log")
    storage = f"sqlite:///{file}" if kind == "sqlite" else f"journal:///{file}"
    config = tmp_path / "run.toml"
    config.write_text(CONFIG.format(storage=storage))
    env = {k: v for k, v in os.environ.items() if k != "OPSEARCH_FAULT"}
    env.update(D=str(small), E=str(files), OUT=str(out), CONFIG=str(config), STORAGE=storage, PY=sys.executable,
               OMP_NUM_THREADS="1")
    done = subprocess.run(["unshare", "-rm", "bash", "-c", DRIVER], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    # the search: one line naming the study's file, exit status 4, no traceback
    err = _read(out, "full.err")
    assert _read(out, "full.rc").strip() == "4", err[-3000:]
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"opsearch search: error: no space left on device: cannot write {file}"), err
    # nothing written half: every trial stored before the disk filled is whole
    full_copy = out / "full" / file.name
    storage_full = f"sqlite:///{full_copy}" if kind == "sqlite" else f"journal:///{full_copy}"
    if kind == "journal":
        data = full_copy.read_bytes()
        assert data.endswith(b"\n"), data[-200:]
        for line in data.splitlines():
            json.loads(line)
    before = numbered(run_trials(open_run(storage_full, "crash")))
    assert before and all(t.state.is_finished() or t.state in (TrialState.RUNNING, TrialState.WAITING)
                          for t in before.values())
    assert [t for t in before.values() if t.state == TrialState.COMPLETE], "nothing was recorded"

    # export and plot on the full disk: one line each naming their file, nothing left behind;
    # a command that only reads the study still names it when the disk it lives on is full
    for command, named in (("export", f"{files}/layer.py"), ("plot", f"{files}/plots/"),
                           ("show", str(file))):
        if command == "show" and _read(out, "show.rc").strip() == "0":
            continue  # this storage reads without writing
        err = _read(out, f"{command}.err")
        assert _read(out, f"{command}.rc").strip() == "4", err[-3000:]
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"opsearch {command}: error: no space left on device: cannot write "
                              f"{named}"), err
    left = _read(out, "files_when_full.ls")
    assert "layer.py" not in left and ".png" not in left and ".tmp" not in left, left

    # space freed: the same command resumes and reaches the budget; nothing stored is lost
    assert _read(out, "resumed.rc").strip() == "0", _read(out, "resumed.err")[-3000:]
    assert _read(out, "export_again.rc").strip() == "0", _read(out, "export_again.err")[-3000:]
    resumed_copy = out / "resumed" / file.name
    storage_resumed = f"sqlite:///{resumed_copy}" if kind == "sqlite" else f"journal:///{resumed_copy}"
    after = run_trials(open_run(storage_resumed, "crash"))
    by_number = numbered(after)
    for n, t in before.items():
        if t.state.is_finished():
            assert by_number[n].user_attrs == t.user_attrs and by_number[n].values == t.values
    counted = [t for t in after if t.user_attrs.get("kind") == "candidate"]
    assert len(counted) == 5
    # a candidate in flight when the disk filled was handed back as it was, not failed as lost
    contract.check_contract(after, ["resnet"], ["validity", "numerics", "equivalence"])
    for n, t in before.items():
        if t.state == TrialState.RUNNING:
            assert "opsearch:handed_back" in by_number[n].system_attrs, n


# --------------------------------------------------------------------------------------------
# Single writes cut short


def test_a_journal_append_cut_short_by_a_full_disk_leaves_no_half_line(tmp_path, monkeypatch):
    path = tmp_path / "study.log"
    storage = open_storage(f"journal:///{path}")
    storage.create_new_study([], "one")
    whole = path.read_bytes()
    real_pwrite = os.pwrite

    def half_then_full(fd, data, offset):
        real_pwrite(fd, data[: len(data) // 2], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", half_then_full)
    with pytest.raises(DiskFull, match=f"cannot write {path} "):
        storage.create_new_study([], "two")
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert path.read_bytes() == whole  # the half line was cut off again
    storage.create_new_study([], "three")  # space is back: the journal goes on
    reread = open_storage(f"journal:///{path}", create=False)
    assert sorted(s.study_name for s in reread.get_all_studies()) == ["one", "three"]


def test_a_partial_last_line_of_a_killed_writer_is_cut_before_the_next_append(tmp_path):
    path = tmp_path / "study.log"
    storage = open_storage(f"journal:///{path}")
    storage.create_new_study([], "one")
    with open(path, "ab") as f:  # a writer killed in the middle of its line
        f.write(b'{"op_code":0,"worker_id":"x","study_na')
    storage.create_new_study([], "two")
    reread = open_storage(f"journal:///{path}", create=False)
    assert sorted(s.study_name for s in reread.get_all_studies()) == ["one", "two"]


def test_a_file_written_on_a_full_disk_is_whole_or_absent(tmp_path, monkeypatch):
    from opsearch.files import write_atomically

    target = tmp_path / "out" / "layer.py"
    write_atomically(str(target), lambda f: f.write("old = 1\n"))
    assert target.read_text() == "old = 1\n" and oct(target.stat().st_mode & 0o777) != "0o600"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(DiskFull, match=f"cannot write {target} "):
        write_atomically(str(target), lambda f: f.write("new = 2\n" * 1000))
    assert target.read_text() == "old = 1\n"  # the earlier file, untouched
    assert os.listdir(target.parent) == ["layer.py"]  # no temporary file left


def test_disk_full_is_recognised_in_sqlite_and_oserror_chains(tmp_path):
    import sqlite3

    from opsearch.study import disk_full, disk_full_error

    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as e:
            raise RuntimeError("An exception is raised during the commit") from e
    except RuntimeError as e:
        assert disk_full(e) is not None
        message = str(disk_full_error(e, "/data/study.db"))
        assert message.startswith("no space left on device: cannot write /data/study.db "
                                  "(database or disk is full)"), message
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded")) is not None
    assert disk_full(sqlite3.OperationalError("database is locked")) is None
    assert disk_full(OSError(errno.EACCES, "Permission denied")) is None
