"""Frame-by-frame comparison of a dense timm ViT and its eventful version on the same frames.

Per frame we record executed MACs (by `CostCounter`), wall time and the
fidelity of the eventful output against the dense one. Timing and counting
are kept apart: the timed eventful model runs bare, and an identical twin
(same parameters, same policy, same frames, hence the same token choices)
runs under the counter, whose dispatch hooks would otherwise inflate the
time. The dense model's executed MACs depend only on the frame shape, so they
are counted once on the first frame.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from frugalvit.cost import CostCounter
from frugalvit.eventful import EventfulViT, eventful


@dataclass(frozen=True)
class FrameRecord:
    """One frame: cost of each model and fidelity of the eventful output."""

    index: int
    dense_gmacs: float
    eventful_gmacs: float
    dense_ms: float
    eventful_ms: float
    cosine: float
    relative_l2: float
    top1_agrees: bool
    full_update: bool
    updated_share: float


@dataclass(frozen=True)
class ComparisonSummary:
    """Totals over a clip; ratios are dense / eventful measured in the same run."""

    frames: int
    speedup: float
    speedup_after_first: float
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

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _timed(fn, *args):  # noqa: ANN001, ANN202 - tiny local helper
    start = time.perf_counter()
    out = fn(*args)
    return out, (time.perf_counter() - start) * 1e3


@torch.no_grad()
def _dense_features(model: nn.Module, frame: Tensor) -> Tensor:
    return model.forward_features(frame)


def _twin(ev: EventfulViT) -> EventfulViT:
    return eventful(ev.model, ev.policy, ev.incremental_max_fraction, ev.refresh_every, ev.cut_share,
                    ev.cut_relative_error)


@torch.no_grad()
def compare_on_frames(model: nn.Module, ev: EventfulViT, frames: Iterable[Tensor], progress: bool = True,
                      total: int | None = None) -> tuple[list[FrameRecord], int]:
    """Run `model` and `ev` on every frame (3, H, W); return per-frame records and the eventful state bytes."""
    model.eval()
    ev.reset()
    counted = _twin(ev)
    dense_gmacs: float | None = None
    records: list[FrameRecord] = []
    for index, frame in enumerate(tqdm(frames, total=total, desc="frames", disable=not progress, unit="frame")):
        batch = frame.unsqueeze(0)
        if dense_gmacs is None:
            with CostCounter() as cost:
                _dense_features(model, batch)
            dense_gmacs = cost.macs / 1e9
        dense_features, dense_ms = _timed(_dense_features, model, batch)
        eventful_features, eventful_ms = _timed(ev.forward_features, batch)
        with CostCounter() as cost:
            counted.forward_features(batch)
        dense_pooled = model.forward_head(dense_features, pre_logits=True)
        eventful_pooled = model.forward_head(eventful_features, pre_logits=True)
        counts = [count for block in ev.gate_counts() for count in block if count is not None]
        records.append(FrameRecord(
            index=index,
            dense_gmacs=dense_gmacs,
            eventful_gmacs=cost.macs / 1e9,
            dense_ms=dense_ms,
            eventful_ms=eventful_ms,
            cosine=F.cosine_similarity(dense_pooled, eventful_pooled, dim=-1).item(),
            relative_l2=((dense_pooled - eventful_pooled).norm() / dense_pooled.norm().clamp_min(1e-12)).item(),
            top1_agrees=bool((model.forward_head(dense_features).argmax(-1)
                              == model.forward_head(eventful_features).argmax(-1)).item()),
            full_update=ev.last_frame_full,
            updated_share=sum(counts) / (len(counts) * dense_features.shape[1]),
        ))
    return records, ev.state_bytes()


def summarize(records: list[FrameRecord], state_bytes: int) -> ComparisonSummary:
    """Ratios of totals (dense / eventful) over all frames and over the frames after the first."""
    if not records:
        raise ValueError("no frames to summarize")
    later = records[1:] or records

    def ratio(rows: list[FrameRecord], dense: str, eventful_: str) -> float:
        return sum(getattr(r, dense) for r in rows) / max(1e-12, sum(getattr(r, eventful_) for r in rows))

    cosines = [r.cosine for r in records]
    return ComparisonSummary(
        frames=len(records),
        speedup=ratio(records, "dense_ms", "eventful_ms"),
        speedup_after_first=ratio(later, "dense_ms", "eventful_ms"),
        mac_ratio=ratio(records, "dense_gmacs", "eventful_gmacs"),
        mac_ratio_after_first=ratio(later, "dense_gmacs", "eventful_gmacs"),
        dense_ms_median=float(torch.tensor([r.dense_ms for r in records]).median()),
        eventful_ms_median=float(torch.tensor([r.eventful_ms for r in records]).median()),
        cosine_mean=sum(cosines) / len(cosines),
        cosine_min=min(cosines),
        relative_l2_mean=sum(r.relative_l2 for r in records) / len(records),
        top1_agreement=sum(r.top1_agrees for r in records) / len(records),
        full_updates=sum(r.full_update for r in records),
        state_mib=state_bytes / 2**20,
    )
