"""Sweep of held-frame settings (`EventfulViT.hold_share`) on real weights: where the chosen settings come from.

For one clip and size, every combination of token policy, hold share, cut
share and max held frames runs through `eventful_real.eventful_run` (the
eventful backbone and decoder, MACs counted) and is scored against the dense
model's saliency maps like `eventful_real.py`. One JSON object per line on
stdout; `--out` also writes them as one JSON file. The settings in
`eventful_real.hold_settings` were picked from such sweeps on bigbuckbunny and
bikes (results/eventful_hold_sweep.json; three later ones and the 2x adaptive
keyframes of `eventful_real.default_settings`: eventful_hold_sweep_2.json), so
the verdicts on those clips are in-sample; carphone_pristine was left out of
the sweeps as a check.

Usage:
    python3 benchmarks/eventful_hold_sweep.py bigbuckbunny 224 --policies fraction:0.125,fraction:0.0625 \\
        --holds 0.1,0.2 --cuts 0.5,0.7 --max-held 3 [--relative-error 0.5] [--attention-rows changed]
        [--token-selection shared] [--motion-compensate] [--out FILE]

`--motion-compensate` scores each setting twice: its held maps as computed,
and moved by the global shift since their frame (`eventful_motion.py`'s
"eventful_mc" rows; the motion estimates' MACs counted).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eventful_real as real  # noqa: E402 - the benchmark next to this script
from eventful_motion import compensated, last_computed, motion_macs  # noqa: E402 - the benchmark next to this

from frugalvit.ioutil import write_json_atomically  # noqa: E402
from frugalvit.models import saliency_vit  # noqa: E402
from frugalvit.saliency import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from frugalvit.video.decode import bundled_clip_path, load_frames  # noqa: E402
from frugalvit.video.fidelity import map_fidelity  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(value) for value in text.split(",")]


def holds(text: str) -> list[float | None]:
    """Hold shares; "none": no held frames (adaptive keyframes only: the cut share alone)."""
    return [None if value == "none" else float(value) for value in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", help="bundled clip name (bigbuckbunny, bikes, carphone_pristine)")
    parser.add_argument("size", type=int)
    parser.add_argument("--policies", default="fraction:0.125", help="comma-separated policies (parse_policy)")
    parser.add_argument("--holds", type=holds, default=[0.1, 0.2],
                        help="hold shares, comma-separated; 'none' for adaptive keyframes only")
    parser.add_argument("--cuts", type=floats, default=[0.5, 0.7])
    parser.add_argument("--max-held", type=lambda text: [int(v) for v in text.split(",")], default=[3])
    parser.add_argument("--relative-error", type=float, default=0.5, help="cut_relative_error")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--attention-rows", choices=("all", "changed"), default="all")
    parser.add_argument("--token-selection", choices=("per_gate", "shared"), default="per_gate")
    parser.add_argument("--motion-compensate", action="store_true",
                        help="also score the held maps moved by the global shift (kind eventful_mc)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    frames = load_frames(bundled_clip_path(args.clip), args.size, IMAGENET_MEAN, IMAGENET_STD,
                         max_frames=args.frames)
    model = saliency_vit(args.size)
    dense_maps, dense_backbone, dense_decoder = real.dense_run(model, frames)
    total = frames.shape[0]
    rows = []
    for policy, hold, cut, max_held in itertools.product(args.policies.split(","), args.holds, args.cuts,
                                                         args.max_held):
        if hold is not None and hold >= cut:
            continue
        options = {"cut_share": cut, "hold_share": hold, "max_held_frames": max_held,
                   "cut_relative_error": args.relative_error, "attention_rows": args.attention_rows,
                   "token_selection": args.token_selection}
        run = real.eventful_run(model, frames, real.EventfulSetting("sweep", policy, options))
        macs = sum(run.backbone_macs) + sum(run.decoder_macs)
        variants = [("eventful", run.maps, macs)]
        if args.motion_compensate:
            variants.append(("eventful_mc", compensated(run.maps, frames, last_computed(run.held)),
                             macs + sum(run.held) * motion_macs(args.size, args.size)))
        for kind, maps, counted in variants:
            fidelity = real.summarize(map_fidelity(maps, dense_maps))
            row = {"clip": args.clip, "size": args.size, "kind": kind, "policy": policy, **options,
                   "mac_ratio": (dense_backbone + dense_decoder) * total / counted,
                   "backbone_mac_ratio": dense_backbone * total / sum(run.backbone_macs),
                   "pearson_mean": fidelity["pearson_mean"], "pearson_worst": fidelity["pearson_worst"],
                   "iou_top10_mean": fidelity["iou_top10_mean"], "held_frames": sum(run.held),
                   "full_frames": sum(run.full)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out is not None:
        write_json_atomically({"benchmark": "eventful_hold_sweep", "torch": torch.__version__, "rows": rows},
                              args.out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
