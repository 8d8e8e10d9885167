"""The `opsearch` command line: one module per sub-command under opsearch/commands/.

Each command module has ``add_parser(subparsers)`` (which sets ``func`` on its parser) so that
commands stay independent. Errors in user input (`UserError`, `InvalidCandidate`) end with one
line on stderr and exit status 2, never a traceback; faults of the environment
(`EnvironmentFault`: the storage unreachable past its grace period, 3; a full disk, 4) with one
line and their own exit status.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from opsearch.errors import EnvironmentFault, InvalidCandidate, UserError

COMMANDS = ("search", "evaluate", "list", "show", "export", "plot", "rerank", "launch",
            "status", "dashboard")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        self.exit(2, f"opsearch: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="opsearch", description="Search normalization-activation layers.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in COMMANDS:
        importlib.import_module(f"opsearch.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (UserError, InvalidCandidate) as e:
        print(f"opsearch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except EnvironmentFault as e:  # storage unreachable (3), disk full (4): fix, run again
        print(f"opsearch {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"opsearch {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `opsearch list | head`: the reader left, which is no error
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
