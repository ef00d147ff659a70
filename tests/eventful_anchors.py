"""The exactness anchors every eventful model family must pass, shared by the per-family test files."""

from __future__ import annotations

from collections.abc import Iterable

import torch

import frugalvit as fv


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_full_budget_equals(model: torch.nn.Module, frames: torch.Tensor, atol: float = 1e-5) -> None:
    """At full budget, features and outputs equal the timm model's on every frame."""
    ev = fv.eventful(model, fv.TopFraction(1.0))
    with torch.no_grad():
        for frame in frames:
            torch.testing.assert_close(ev.forward_features(frame), model.forward_features(frame), rtol=1e-5,
                                       atol=atol)
            torch.testing.assert_close(ev(frame), model(frame), rtol=1e-5, atol=atol)


def incremental_paths_equal_dense(model: torch.nn.Module, frames: torch.Tensor, sync_free: bool) -> set[str]:
    """`Threshold(0)` with `incremental_max_fraction=1.0` (so the incremental paths run, not the dense
    shortcut) stays within 1e-4 relative error of dense on every frame; returns the attention paths taken."""
    ev = fv.eventful(model, fv.Threshold(0.0), incremental_max_fraction=1.0)
    ev.sync_free = sync_free
    paths: set[str] = set()
    with torch.no_grad():
        for frame in frames:
            assert relative_error(ev.forward_features(frame), model.forward_features(frame)) < 1e-4
            paths.update(ev.attention_paths())
    return paths


def last_frame_macs(model: torch.nn.Module, frames: torch.Tensor, policies: Iterable[fv.TokenPolicy]) -> list[int]:
    """Executed MACs of the last frame under each policy (the earlier frames warm the state up)."""
    macs = []
    for policy in policies:
        ev = fv.eventful(model, policy)
        with torch.no_grad():
            for frame in frames[:-1]:
                ev(frame)
            with fv.CostCounter() as cost:
                ev(frames[-1])
        macs.append(cost.macs)
    return macs
