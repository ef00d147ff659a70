"""Fidelity of a dense-prediction output (e.g. a saliency map) against the dense model's.

Three views, per frame: Pearson r (the map's shape, insensitive to offset and
scale), relative L2 (its values) and the IoU of the top-10% pixels (whether
the same region is called salient; a threshold metric, so small value errors
near the 90th percentile cost IoU although r barely moves).
"""

from __future__ import annotations

from torch import Tensor
import torch

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
