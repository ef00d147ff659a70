"""Entry point of the `frugalvit` command: one sub-command per capability.

Each sub-command module exposes `register(subparsers)`, which adds its parser
and sets `handler` to a function taking the parsed arguments and returning an
exit code. Errors a user can fix (bad file, bad option value) are raised as
`UsageError`, `ValueError` or `FileNotFoundError` and printed as one line.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

SUBCOMMAND_MODULES = ("frugalvit.cli.demo", "frugalvit.cli.video", "frugalvit.cli.dvt", "frugalvit.cli.ecoformer")


class UsageError(Exception):
    """An error in what the user asked for; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frugalvit", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (UsageError, ValueError, FileNotFoundError, NotImplementedError) as error:
        print(f"frugalvit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"frugalvit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
