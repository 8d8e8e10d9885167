"""A process that holds an SQLite storage open must never open and close the database file with
plain file calls: closing any descriptor of the file drops every POSIX lock the process holds on
it, its storages' too, and other processes' writes then read back here as 'disk I/O error' or
'database disk image is malformed' (sqlite.org/howtocorrupt.html, 2.2). Notebooks hold several
runs open at once (`opsearch.load`) while workers and commands write."""
from __future__ import annotations

import builtins
import os

from opsearch.study import open_storage


def test_opening_a_storage_again_never_opens_the_database_file_itself(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/study.db"
    held = open_storage(url)  # a live storage of this process, as a SearchRun keeps one
    held.get_all_studies()
    opened: list[str] = []
    real_open = builtins.open

    def recording_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened.append(os.path.abspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    again = open_storage(url, create=False)  # the existing file is checked to be SQLite
    again.get_all_studies()
    held.get_all_studies()
    assert str(tmp_path / "study.db") not in opened


def test_a_file_that_is_not_sqlite_is_still_refused(tmp_path):
    import pytest

    from opsearch.errors import UserError

    (tmp_path / "notes.db").write_text("not a database, just text that is long enough\n")
    with pytest.raises(UserError, match="not an SQLite database"):
        open_storage(f"sqlite:///{tmp_path}/notes.db", create=False)
