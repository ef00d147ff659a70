"""Fidelity of a dense-prediction output (e.g. a saliency map) against the dense model's.

Three views, per frame: Pearson r (the map's shape, insensitive to offset and
scale), relative L2 (its values) and the IoU of the top-10% pixels (whether
the same region is called salient; a threshold metric, so small value errors
near the 90th percentile cost IoU although r barely moves).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TOP_SHARE = 0.10


def map_fidelity(maps: Tensor, reference: Tensor, top_share: float = TOP_SHARE) -> dict[str, list[float]]:
    """Per-frame `pearson`, `relative_l2` and `iou_top10` of `maps` against `reference`, both (T, ...)."""
    if maps.shape != reference.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and reference {tuple(reference.shape)} differ in shape")
    a, b = maps.flatten(1).double(), reference.flatten(1).double()
    ac, bc = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    pearson = (ac * bc).sum(1) / (ac.norm(dim=1) * bc.norm(dim=1)).clamp_min(1e-30)
    relative_l2 = (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-30)
    k = max(1, round(top_share * a.shape[1]))
    top_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    top_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    iou = (top_a & top_b).sum(1).double() / (top_a | top_b).sum(1).double()
    return {"pearson": pearson.tolist(), "relative_l2": relative_l2.tolist(), "iou_top10": iou.tolist()}


HOLD_PERIODS = tuple(range(2, 9))


class KeyframeHold:
    """Keyframe-and-hold, what a user can do with no library: the dense output every K-th frame, held in between.

    Fed the dense outputs frame by frame (frame 0 first), `step` scores what
    each period K would have returned on this frame against the dense output,
    so a report can set the eventful result beside the trivial alternative at
    the same saving (a period K over T frames computes ceil(T / K) of them:
    it saves T / ceil(T / K) times the compute and the wall clock, K where K
    divides T).
    """

    def __init__(self, periods: tuple[int, ...] = HOLD_PERIODS) -> None:
        if not periods or any(not isinstance(k, int) or k < 2 for k in periods):
            raise ValueError(f"keyframe periods must be integers >= 2, got {periods!r}")
        self.periods = tuple(sorted(periods))
        self._held: Tensor | None = None  # (len(periods), ...) the map each period holds

    def step(self, index: int, dense: Tensor) -> dict[str, tuple[float, ...]]:
        """Per period, (`pearson`, `iou_top10`) of its held output against `dense` (1, ...) on frame `index`."""
        if self._held is None:
            if index != 0:
                raise ValueError("KeyframeHold must see the clip from its first frame (index 0)")
            self._held = dense.expand(len(self.periods), *dense.shape[1:]).clone()
        for row, period in enumerate(self.periods):
            if index % period == 0:
                self._held[row] = dense[0]
        scores = map_fidelity(self._held, dense.expand_as(self._held))
        return {"pearson": tuple(scores["pearson"]), "iou_top10": tuple(scores["iou_top10"])}


def hold_fidelity_at(ratio: float, periods: tuple[int, ...], pearson: list[float],
                     iou: list[float], frames: int | None = None) -> tuple[float, float] | None:
    """Keyframe-and-hold's (r, IoU) at a saving of `ratio`, linear between neighbouring periods (1x: the dense
    output itself, r = IoU = 1); None outside 1x..the longest period's saving. Over `frames` frames a period K
    saves frames / ceil(frames / K) (K where K divides them; None: K); periods that save the same as a shorter
    one add nothing. `periods` increasing, above 1, one score of each kind per period."""
    if not periods or list(periods) != sorted(set(periods)) or periods[0] < 2 \
            or not len(periods) == len(pearson) == len(iou):
        raise ValueError(f"periods must be increasing whole frame counts from 2 on, with one r and one IoU each; got "
                         f"periods {list(periods)}, {len(pearson)} r and {len(iou)} IoU values")
    points = [(1.0, 1.0, 1.0)]
    for k, r, i in zip(periods, pearson, iou):
        saving = float(k) if frames is None else frames / math.ceil(frames / k)
        if saving > points[-1][0]:
            points.append((saving, r, i))
    if not points[0][0] <= ratio <= points[-1][0]:
        return None
    for (low, r0, i0), (high, r1, i1) in zip(points, points[1:]):
        if ratio <= high:  # the segment holding `ratio` (the check above guarantees one)
            break
    share = (ratio - low) / (high - low)
    return r0 + share * (r1 - r0), i0 + share * (i1 - i0)
