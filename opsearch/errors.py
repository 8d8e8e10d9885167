"""Exceptions that carry a one-line, user-facing message.

`UserError` is what the CLI turns into one line on stderr and exit status 2; `InvalidCandidate`
is what the compiler raises for a graph that cannot be a layer (the search records it as a
rejection and goes on).
"""


class OpsearchError(Exception):
    """Base class of the errors opsearch raises on purpose."""


class UserError(OpsearchError, ValueError):
    """Bad user input (a name, a file, a flag, a storage URL): one clear line, exit status 2."""


class InvalidCandidate(OpsearchError, ValueError):
    """A graph that cannot be a layer; the message says why."""


class EnvironmentFault(OpsearchError):
    """Something around the search failed, not its input nor a candidate: one line on stderr,
    the exit status `exit_code`, no traceback; the study stays consistent and the same command,
    run again once the cause is gone, resumes it."""

    exit_code = 1


class StorageUnavailable(EnvironmentFault):
    """The study's storage stayed unreachable past the storage grace period: exit status 3."""

    exit_code = 3


class DiskFull(EnvironmentFault):
    """No space left on the device (or the quota) where a file had to be written: exit status 4.
    The message names the file; nothing is left written half."""

    exit_code = 4
