"""Frame-by-frame comparison of a dense timm ViT and its eventful version on the same frames.

`frame_loop` is the one loop the apps and benchmarks share: each frame is
batched, moved to the models' device and fed to a fixed sequence of calls
(dense, eventful, ...), each timed (device-synchronised) or counted
(`CostCounter`), in that order. `compare_on_frames` and `time_repeats` build
the `frugalvit video` / `frugalvit demo` report on it.

Per frame we record executed MACs (by `CostCounter`), wall time and the
fidelity of the eventful output against the dense one. Timing and counting
are kept apart: the timed eventful model runs bare, and an identical twin
(same parameters, same policy, same frames, hence the same token choices)
runs under the counter, whose dispatch hooks would otherwise inflate the
time. The dense model's executed MACs depend only on the frame shape, so they
are counted once on the first frame. Wall time varies from run to run, so
`time_repeats` replays the clip (from a reset) to give the speed-up's spread.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from frugalvit.cost import CostCounter
from frugalvit.eventful import EventfulViT, MacBudget, TokenPolicy, eventful
from frugalvit.timing import model_device_dtype, timed
from frugalvit.video.fidelity import HOLD_PERIODS, KeyframeHold, hold_fidelity_at, map_fidelity
from frugalvit.video.motion import global_shift, shift_maps


@dataclass(frozen=True)
class FrameRecord:
    """One frame: cost of each model and fidelity of the eventful output."""

    index: int
    dense_gmacs: float
    eventful_gmacs: float
    dense_ms: float
    eventful_ms: float
    cosine: float  # of the pooled features (the head's input)
    relative_l2: float
    top1_agrees: bool
    full_update: bool
    updated_share: float
    held: bool = False  # the eventful model held its last output (`EventfulViT.hold_share`)
    task_pearson: float | None = None  # with a task head (e.g. a saliency decoder): its output's fidelity
    task_relative_l2: float | None = None
    task_iou_top10: float | None = None
    feature_cosine: float | None = None  # of the whole forward_features output (tokens, or a feature map)
    feature_relative_l2: float | None = None
    # with a task head: keyframe-and-hold's task fidelity on this frame, one value per period K (HOLD_PERIODS)
    hold_task_pearson: tuple[float, ...] | None = None
    hold_task_iou_top10: tuple[float, ...] | None = None
    share: float | None = None  # with a compute budget: the TopFraction share this frame ran at
    held_limit: int | None = None  # with a compute budget: the eventful model's max_held_frames on this frame


# Called once per frame by `compare_on_frames`: (index, input frame, dense task output,
# eventful task output, per-token count of gates that recomputed it (B, N) or None).
FrameCallback = Callable[[int, Tensor, Tensor, Tensor, "Tensor | None"], None]


@dataclass(frozen=True)
class ComparisonSummary:
    """Totals over a clip; ratios are dense / eventful measured in the same run.

    `speedup` and `speedup_after_first` are medians over `repeats` replays of
    the clip, with their minimum and maximum; everything else (and the
    per-frame records) comes from the first replay.
    """

    frames: int
    speedup: float
    speedup_after_first: float
    speedup_min: float
    speedup_max: float
    speedup_after_first_min: float
    speedup_after_first_max: float
    repeats: int
    mac_ratio: float
    mac_ratio_after_first: float
    dense_ms_median: float
    eventful_ms_median: float
    cosine_mean: float
    cosine_min: float
    relative_l2_mean: float
    top1_agreement: float
    full_updates: int
    state_mib: float
    held_frames: int = 0
    task_pearson_mean: float | None = None
    task_pearson_min: float | None = None
    task_iou_top10_mean: float | None = None
    task_iou_top10_min: float | None = None
    task_relative_l2_mean: float | None = None
    feature_cosine_mean: float | None = None
    feature_relative_l2_mean: float | None = None
    # keyframe-and-hold (the dense output every K-th frame, held), task fidelity after the first frame per period,
    # and interpolated at this run's MAC ratio and wall-clock speed-up (None outside 1x..the longest period)
    hold_periods: tuple[int, ...] | None = None
    hold_task_pearson_mean: tuple[float, ...] | None = None
    hold_task_iou_top10_mean: tuple[float, ...] | None = None
    hold_at_mac_ratio: tuple[float, float] | None = None
    hold_at_speedup: tuple[float, float] | None = None

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class FrameStep:
    """One call per frame in `frame_loop`: `fn(batch)`, timed or counted, under a unique `name`.

    `first_frame_only`: run it on the first frame only (e.g. counting a dense
    model, whose cost depends only on the frame shape).
    """

    name: str
    fn: Callable[[Tensor], Tensor | tuple[Tensor, ...]]
    measure: Literal["time", "macs"]
    first_frame_only: bool = False


@dataclass(frozen=True)
class StepResult:
    """A step's output on one frame and its cost: wall milliseconds ("time") or executed MACs ("macs")."""

    output: Tensor | tuple[Tensor, ...]
    ms: float | None = None
    macs: int | None = None


def _nan_min(values: Sequence[float]) -> float:
    """The smallest value, NaN if any is NaN (Python's `min` skips a NaN or returns it depending on its place)."""
    return math.nan if any(value != value for value in values) else min(values)


@torch.no_grad()
def frame_loop(frames: Iterable[Tensor], steps: Sequence[FrameStep], device: torch.device | None = None,
               dtype: torch.dtype | None = None, progress: bool = False, total: int | None = None
               ) -> Iterator[tuple[int, Tensor, Tensor, dict[str, StepResult]]]:
    """Feed every frame (C, H, W) as a batch of one to `steps`, in order; yield (index, frame, batch, results).

    The batch is moved to `device` / `dtype` when given (timing then
    synchronises that device; otherwise the batch's). Results are keyed by
    step name. Stateful models (eventful) see the frames in order; the caller
    reads their state (`last_frame_full`, ...) after each yield, before the
    next frame runs. Runs without autograd.
    """
    names = [step.name for step in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"frame_loop steps need unique names, got {names}")
    for index, frame in enumerate(tqdm(frames, total=total, desc="frames", disable=not progress, unit="frame")):
        batch = frame.unsqueeze(0)
        if device is not None or dtype is not None:
            batch = batch.to(device, dtype)
        results: dict[str, StepResult] = {}
        for step in steps:
            if step.first_frame_only and index > 0:
                continue
            if step.measure == "time":
                output, ms = timed(step.fn, batch, device=batch.device)
                results[step.name] = StepResult(output, ms=ms)
            else:
                with CostCounter() as cost:
                    output = step.fn(batch)
                results[step.name] = StepResult(output, macs=cost.macs)
        yield index, frame, batch, results


@torch.no_grad()
def _dense_features(model: nn.Module, frame: Tensor) -> Tensor:
    return model.forward_features(frame)


def _twin(ev: EventfulViT) -> EventfulViT:
    """A second eventful model with `ev`'s settings, for counting: the same frames give the same token choices.
    Never captured (a replayed graph runs no operator a counter could see), but sync-free where `ev` is, so
    that it decides as `ev` does (cuts one frame late, cancelled rows kept)."""
    twin = eventful(ev.model, ev.policy, ev.incremental_max_fraction, ev.refresh_every, ev.cut_share,
                    ev.cut_relative_error, ev.nonfinite, hold_share=ev.hold_share, max_held_frames=ev.max_held_frames,
                    attention_rows=ev.attention_rows, token_selection=ev.token_selection)
    twin.sync_free = ev.sync_free or ev.capture
    return twin


# A stateful task head for an eventful backbone, made per eventful model: head(features, update_all) -> output
# (e.g. `SaliencyViT.eventful_decoder(ev.policy)`); update_all is the backbone's `last_frame_full`. On a frame
# the backbone held (`last_frame_held`) the head is not called: its last output is held too.
EventfulHeadFactory = Callable[[EventfulViT], Callable[[Tensor, bool], Tensor]]


def _with_head(backbone: Callable[[Tensor], Tensor], head: Callable[[Tensor], Tensor]
               ) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    def run(batch: Tensor) -> tuple[Tensor, Tensor]:
        features = backbone(batch)
        return features, head(features)

    return run


def _eventful_with_head(ev: EventfulViT, head: Callable[[Tensor, bool], Tensor], motion_compensated: bool = False,
                        follow_policy: bool = False) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """The eventful pipeline; on a held frame the head's last output, moved by the global motion since the
    frame it was computed on when `motion_compensated` (the output must then be a map at frame resolution).
    `follow_policy`: before every frame the head's `policy` (its input gating) is set to the backbone's, which
    a compute budget changes from frame to frame."""
    if follow_policy and not hasattr(head, "policy"):
        raise ValueError("a compute budget changes the policy every frame: the eventful task head needs a settable "
                         "`policy` (e.g. SaliencyViT.eventful_decoder)")
    last: list[Tensor] = []  # the head's last output and the frame it was computed on, for held frames

    def run(batch: Tensor) -> tuple[Tensor, Tensor]:
        if follow_policy:
            head.policy = ev.policy
        features = ev.forward_features(batch)
        if ev.last_frame_held and last:
            output, frame = last
            return features, shift_maps(output, global_shift(frame, batch)) if motion_compensated else output.clone()
        last[:] = [head(features, ev.last_frame_full), batch]
        return features, last[0]

    return run


def _steps(model: nn.Module, ev: EventfulViT, task_head: Callable[[Tensor], Tensor] | None,
           eventful_task_head: EventfulHeadFactory | None, counted: EventfulViT | None,
           motion_compensated: bool = False, dense_forward: Callable[[Tensor], Tensor] | None = None,
           follow_policy: bool = False) -> list[FrameStep]:
    """Dense and eventful steps (timed; and counted where `counted`, the eventful twin, is given): the
    backbones alone, or with `eventful_task_head` the whole pipelines (backbone + head), each head fresh.
    `dense_forward` replaces `model.forward_features` in the timed dense step (e.g. compiled); the counted
    one stays eager, where the counter sees every operator."""
    if motion_compensated and eventful_task_head is None:
        raise ValueError("motion-compensated held frames move the task head's map: they need an eventful task head")
    dense = counted_dense = partial(_dense_features, model)
    if dense_forward is not None:
        dense = dense_forward
    if eventful_task_head is not None:
        if task_head is None:
            raise ValueError("an eventful task head needs the dense task head to compare with")
        dense, counted_dense = _with_head(dense, task_head), _with_head(counted_dense, task_head)
        eventful_step = _eventful_with_head(ev, eventful_task_head(ev), motion_compensated, follow_policy)
        counted_step = None if counted is None else _eventful_with_head(counted, eventful_task_head(counted),
                                                                        motion_compensated, follow_policy)
    else:
        eventful_step = ev.forward_features
        counted_step = None if counted is None else counted.forward_features
    steps = [FrameStep("dense", dense, "time"), FrameStep("eventful", eventful_step, "time")]
    if counted_step is not None:
        steps = [FrameStep("dense counted", counted_dense, "macs", first_frame_only=True), *steps,
                 FrameStep("eventful counted", counted_step, "macs")]
    return steps


@torch.no_grad()
def compare_on_frames(model: nn.Module, ev: EventfulViT, frames: Iterable[Tensor], progress: bool = True,
                      total: int | None = None, task_head: Callable[[Tensor], Tensor] | None = None,
                      on_frame: FrameCallback | None = None, eventful_task_head: EventfulHeadFactory | None = None,
                      motion_compensated: bool = False, dense_forward: Callable[[Tensor], Tensor] | None = None,
                      budget: float | None = None, budget_max_held_frames: int | None = None
                      ) -> tuple[list[FrameRecord], int]:
    """Run `model` and `ev` on every frame (3, H, W); return per-frame records and the eventful state bytes.

    `task_head` maps final features (B, N, D) to the task output (e.g. the
    saliency decoder of `frugalvit.models.saliency_vit`); the records then
    carry its fidelity (`frugalvit.video.fidelity`). Alone, it runs on both
    feature sets, untimed and uncounted (times and MACs are the backbones').
    With `eventful_task_head` (a factory of the eventful side's head, e.g.
    `lambda ev: saliency.eventful_decoder(ev.policy)`), times and MACs are
    the whole pipelines': dense backbone + `task_head` against eventful
    backbone + its eventful head. `on_frame` sees every frame's outputs (for
    a side-by-side video). `motion_compensated` (with `eventful_task_head`,
    whose output is a map at frame resolution): a held frame returns the last
    map moved by the global motion since it was computed
    (`frugalvit.video.motion`; timed but not in the MAC count: three FFTs of
    the frame, at most ~6 M multiply-accumulates at 224 px). `dense_forward`
    (e.g. `torch.compile(model.forward_features)`, for a compiled eventful
    model) is the dense backbone that is timed; MACs are counted eagerly.
    `budget` (a target saving, dense / eventful MACs): a `MacBudget` chooses
    every frame's `TopFraction` from the counted cost of the frames before
    (the whole pipeline's with `eventful_task_head`); with
    `budget_max_held_frames` it also lets the model hold that many frames in a
    row while in debt (`MacBudget.held_limit`, from `ev.max_held_frames` as
    the usual limit, restored at the end). The records carry the share
    (`share`) and the held limit (`held_limit`) so that `time_repeats` can
    replay the same sequence.
    """
    model.eval()
    ev.reset()
    counted = _twin(ev)
    device, dtype = model_device_dtype(model)
    steps = _steps(model, ev, task_head, eventful_task_head, counted, motion_compensated, dense_forward,
                   follow_policy=budget is not None)
    whole = eventful_task_head is not None
    hold = KeyframeHold(HOLD_PERIODS) if task_head is not None else None
    dense_gmacs = 0.0
    records: list[FrameRecord] = []
    controller: MacBudget | None = None
    usual_held = ev.max_held_frames
    for index, frame, _, results in frame_loop(frames, steps, device, dtype, progress, total):
        if "dense counted" in results:
            dense_gmacs = results["dense counted"].macs / 1e9
            if budget is not None:  # its allowance comes from this first dense frame's cost
                controller = MacBudget(budget, results["dense counted"].macs, max_held_frames=budget_max_held_frames)
        dense_features, dense_ms = results["dense"].output, results["dense"].ms
        eventful_features, eventful_ms = results["eventful"].output, results["eventful"].ms
        if whole:
            (dense_features, dense_out), (eventful_features, eventful_out) = dense_features, eventful_features
        elif task_head is not None:
            dense_out, eventful_out = task_head(dense_features), task_head(eventful_features)
        dense_pooled = model.forward_head(dense_features, pre_logits=True)
        eventful_pooled = model.forward_head(eventful_features, pre_logits=True)
        counts = [count for block in ev.gate_counts() for count in block if count is not None]
        task: dict[str, object] = {}
        if task_head is not None:
            task = {f"task_{name}": values[0] for name, values in map_fidelity(eventful_out, dense_out).items()}
            held = hold.step(index, dense_out)
            task.update(hold_task_pearson=held["pearson"], hold_task_iou_top10=held["iou_top10"])
            if on_frame is not None:
                on_frame(index, frame, dense_out, eventful_out, ev.updated_tokens())
        records.append(FrameRecord(
            index=index,
            dense_gmacs=dense_gmacs,
            eventful_gmacs=results["eventful counted"].macs / 1e9,
            dense_ms=dense_ms,
            eventful_ms=eventful_ms,
            cosine=F.cosine_similarity(dense_pooled, eventful_pooled, dim=-1).item(),
            relative_l2=((dense_pooled - eventful_pooled).norm() / dense_pooled.norm().clamp_min(1e-12)).item(),
            feature_cosine=F.cosine_similarity(dense_features.flatten(1), eventful_features.flatten(1)).mean().item(),
            feature_relative_l2=((dense_features - eventful_features).norm()
                                 / dense_features.norm().clamp_min(1e-12)).item(),
            top1_agrees=bool((model.forward_head(dense_features).argmax(-1)
                              == model.forward_head(eventful_features).argmax(-1)).item()),
            full_update=ev.last_frame_full,
            held=ev.last_frame_held,
            updated_share=sum(counts) / (len(counts) * ev.eventful_blocks[0].attention_gate.reference.shape[1]),
            share=getattr(ev.policy, "fraction", None) if controller is not None else None,
            held_limit=ev.max_held_frames if controller is not None else None,
            **task,
        ))
        if controller is not None:  # the next frame's share, from what this one cost
            controller.spent(results["eventful counted"].macs,
                             partial=not (counted.last_frame_full or counted.last_frame_held))
            ev.policy = counted.policy = controller.policy()
            ev.max_held_frames = counted.max_held_frames = controller.held_limit(usual_held)
    ev.max_held_frames = usual_held  # the model's own limit again (the records keep each frame's)
    return records, ev.state_bytes()


@torch.no_grad()
def time_repeats(model: nn.Module, ev: EventfulViT, frames: Tensor, repeats: int,
                 progress: bool = False, task_head: Callable[[Tensor], Tensor] | None = None,
                 eventful_task_head: EventfulHeadFactory | None = None, motion_compensated: bool = False,
                 dense_forward: Callable[[Tensor], Tensor] | None = None,
                 policies: Sequence[TokenPolicy] | None = None, held_limits: Sequence[int] | None = None
                 ) -> list[tuple[list[float], list[float]]]:
    """Replay `frames` (T, 3, H, W) `repeats` times from a reset, timing dense and eventful interleaved per frame.

    Returns, per replay, the per-frame wall times in ms of the dense model and
    of the eventful one (the whole pipelines with `eventful_task_head`, as in
    `compare_on_frames`, with its `dense_forward`). Nothing is counted, so the
    replays cost only the two forward passes per frame. `policies` and
    `held_limits`: the eventful model's policy and `max_held_frames` for each
    frame (a budgeted run's sequences, from its records).
    """
    if repeats < 0:
        raise ValueError(f"repeats must be >= 0, got {repeats}")
    model.eval()
    device, dtype = model_device_dtype(model)
    usual_held = ev.max_held_frames
    replays: list[tuple[list[float], list[float]]] = []
    for _ in tqdm(range(repeats), desc="timing repeats", disable=not progress or repeats == 0, unit="replay"):
        ev.reset()
        steps = _steps(model, ev, task_head, eventful_task_head, None, motion_compensated,  # a fresh head per replay
                       dense_forward, follow_policy=policies is not None)
        dense_times, eventful_times = [], []
        if policies:
            ev.policy = policies[0]
        if held_limits:
            ev.max_held_frames = held_limits[0]
        for index, _, _, results in frame_loop(frames, steps, device, dtype):
            dense_times.append(results["dense"].ms)
            eventful_times.append(results["eventful"].ms)
            if policies and index + 1 < len(policies):  # set before the next frame runs
                ev.policy = policies[index + 1]
            if held_limits and index + 1 < len(held_limits):
                ev.max_held_frames = held_limits[index + 1]
        replays.append((dense_times, eventful_times))
    ev.max_held_frames = usual_held
    return replays


def summarize(records: list[FrameRecord], state_bytes: int,
              repeat_times: Sequence[tuple[list[float], list[float]]] = ()) -> ComparisonSummary:
    """Ratios of totals (dense / eventful) over all frames and over the frames after the first.

    `repeat_times` (from `time_repeats`) adds replays to the first one in
    `records`; the speed-ups are then medians over all replays, with min and max.
    """
    if not records:
        raise ValueError("no frames to summarize")
    later = records[1:] or records

    def ratio(rows: list[FrameRecord], dense: str, eventful_: str) -> float:
        return sum(getattr(r, dense) for r in rows) / max(1e-12, sum(getattr(r, eventful_) for r in rows))

    def times_ratio(dense: list[float], eventful_: list[float]) -> float:
        return sum(dense) / max(1e-12, sum(eventful_))

    speedups = [ratio(records, "dense_ms", "eventful_ms")]
    speedups_after_first = [ratio(later, "dense_ms", "eventful_ms")]
    for dense_times, eventful_times in repeat_times:
        speedups.append(times_ratio(dense_times, eventful_times))
        first = 1 if len(dense_times) > 1 else 0
        speedups_after_first.append(times_ratio(dense_times[first:], eventful_times[first:]))
    cosines = [r.cosine for r in records]
    return ComparisonSummary(
        frames=len(records),
        speedup=statistics.median(speedups),
        speedup_after_first=statistics.median(speedups_after_first),
        speedup_min=min(speedups),
        speedup_max=max(speedups),
        speedup_after_first_min=min(speedups_after_first),
        speedup_after_first_max=max(speedups_after_first),
        repeats=len(speedups),
        mac_ratio=ratio(records, "dense_gmacs", "eventful_gmacs"),
        mac_ratio_after_first=ratio(later, "dense_gmacs", "eventful_gmacs"),
        dense_ms_median=float(torch.tensor([r.dense_ms for r in records]).median()),
        eventful_ms_median=float(torch.tensor([r.eventful_ms for r in records]).median()),
        cosine_mean=sum(cosines) / len(cosines),
        cosine_min=_nan_min(cosines),
        relative_l2_mean=sum(r.relative_l2 for r in records) / len(records),
        top1_agreement=sum(r.top1_agrees for r in records) / len(records),
        full_updates=sum(r.full_update for r in records),
        state_mib=state_bytes / 2**20,
        held_frames=sum(r.held for r in records),
        **_task_summary(records[1:] or records),
        **_feature_summary(records),
        **_hold_summary(records[1:] or records, len(records), ratio(records, "dense_gmacs", "eventful_gmacs"),
                        statistics.median(speedups)),
    )


def _feature_summary(records: list[FrameRecord]) -> dict[str, float]:
    """Mean fidelity of the whole feature output, where the records carry it."""
    if any(r.feature_cosine is None or r.feature_relative_l2 is None for r in records):
        return {}
    return {"feature_cosine_mean": sum(r.feature_cosine for r in records) / len(records),
            "feature_relative_l2_mean": sum(r.feature_relative_l2 for r in records) / len(records)}


def _hold_summary(records: list[FrameRecord], frames: int, mac_ratio: float, speedup: float) -> dict[str, object]:
    """Keyframe-and-hold's mean task fidelity per period over `records` (the frames after the first), and at the
    eventful run's own savings: a period's saving is over the whole clip of `frames` frames, first one included,
    as the run's MAC ratio and speed-up are."""
    if records[0].hold_task_pearson is None:
        return {}
    periods = HOLD_PERIODS  # those of compare_on_frames' KeyframeHold
    pearson = [statistics.fmean(r.hold_task_pearson[k] for r in records) for k in range(len(periods))]
    iou = [statistics.fmean(r.hold_task_iou_top10[k] for r in records) for k in range(len(periods))]
    return {"hold_periods": periods, "hold_task_pearson_mean": tuple(pearson), "hold_task_iou_top10_mean": tuple(iou),
            "hold_at_mac_ratio": hold_fidelity_at(mac_ratio, periods, pearson, iou, frames=frames),
            "hold_at_speedup": hold_fidelity_at(speedup, periods, pearson, iou, frames=frames)}


def _task_summary(records: list[FrameRecord]) -> dict[str, float]:
    """Mean and worst task fidelity after the first frame (which every method computes densely)."""
    if records[0].task_pearson is None:
        return {}
    pearson = [r.task_pearson for r in records]
    iou = [r.task_iou_top10 for r in records]
    return {"task_pearson_mean": sum(pearson) / len(pearson), "task_pearson_min": _nan_min(pearson),
            "task_iou_top10_mean": sum(iou) / len(iou), "task_iou_top10_min": _nan_min(iou),
            "task_relative_l2_mean": sum(r.task_relative_l2 for r in records) / len(records)}
