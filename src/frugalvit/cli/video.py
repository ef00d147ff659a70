"""`frugalvit video`: placeholder until the capability lands."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("video", help="(not available yet)")
    parser.set_defaults(handler=lambda args: (_ for _ in ()).throw(NotImplementedError("'video' is not implemented yet")))
