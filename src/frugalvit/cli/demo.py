"""`frugalvit demo`: the eventful comparison on a bundled real clip, with no download needed."""

from __future__ import annotations

import argparse
from pathlib import Path

from frugalvit.cli.video import add_arguments, run


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="eventful vs dense on bundled Big Buck Bunny (random weights)",
                                   description=__doc__)
    add_arguments(parser, clip_required=False)
    parser.set_defaults(model="vit_base_patch16_224", random_init=True, policy="topr:0.125", max_frames=48, cut_share=0.5)
    parser.add_argument("--clip", default="bundled:bigbuckbunny", help="clip (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="report directory (default: %(default)s)")
    parser.set_defaults(handler=lambda args: run(args, args.clip))
