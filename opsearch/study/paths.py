"""Where runs live: run names, storage URLs and the files beside them."""
from __future__ import annotations

import os
import shlex


from opsearch.errors import UserError


RUNS_DIR_ENV = "OPSEARCH_RUNS_DIR"


def runs_dir() -> str:
    return os.environ.get(RUNS_DIR_ENV, "runs")


def run_url(name: str) -> str:
    """The default storage of a run: an SQLite file under runs/<name>/."""
    return f"sqlite:///{os.path.join(runs_dir(), name, 'study.db')}"


def is_url(text: str) -> bool:
    return "://" in text or text.endswith((".log", ".journal"))


def storage_path(url: str) -> str | None:
    """The file of a file-backed storage (SQLite, journal); None for a database server."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        return None if path in ("", ":memory:") else path
    if url.startswith("journal://"):
        path = url[len("journal://"):]
        return path[1:] if path.startswith("//") else path
    if "://" not in url and url.endswith((".log", ".journal")):
        return url
    return None


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


# --------------------------------------------------------------------------------------------
# Opening runs


def resolve(run_or_url: str, name: str | None = None) -> tuple[str, str]:
    """(storage URL, study name) for a run name or a storage URL."""
    if is_url(run_or_url):
        return run_or_url, name or "default"
    if not run_or_url or "/" in run_or_url or run_or_url.startswith("."):
        raise UserError(f"invalid run name {run_or_url!r}: use letters, digits, '-' and '_'")
    return run_url(run_or_url), name or run_or_url


def run_hint(url: str, study_name: str, default_url: str | None = None) -> str:
    """The RUN arguments that select this study again, quoted for a shell.

    A run under runs/ is named by its name alone; any other storage by ``NAME --storage URL``,
    which works whatever else that storage holds."""
    if default_url is not None and url == default_url:
        return shlex.quote(study_name)
    return f"{shlex.quote(study_name)} --storage {shlex.quote(url)}"


def run_dir(url: str, study_name: str) -> str:
    """Where files of a run go by default (plots, logs): beside its SQLite or journal file, in a
    folder named after the study; runs/<study> for a database server."""
    path = None
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
    elif url.startswith("journal:///"):
        path = url[len("journal://"):]
    elif "://" not in url:
        path = url
    if path and path != ":memory:":
        base = os.path.dirname(os.path.abspath(path))
        if os.path.basename(path) == "study.db" and os.path.basename(base) == study_name:
            return base  # runs/<name>/study.db: the run's own folder
        return os.path.join(base, study_name)
    return os.path.join(runs_dir(), study_name)
