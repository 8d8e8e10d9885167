"""Sub-commands of the `opsearch` CLI, one module each (see opsearch/cli.py)."""
