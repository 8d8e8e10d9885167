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
