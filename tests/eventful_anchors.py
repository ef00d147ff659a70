"""The exactness anchors every eventful model family must pass, shared by the per-family test files."""

from __future__ import annotations

from collections.abc import Iterable

import torch

import frugalvit as fv
from frugalvit.eventful.block import EventfulAttention
from frugalvit.eventful.gates import Selection, scatter_tokens_


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


def incremental_paths_equal_dense(model: torch.nn.Module, frames: torch.Tensor, sync_free: bool,
                                  tolerance: float = 1e-4) -> set[str]:
    """`Threshold(0)` with `incremental_max_fraction=1.0` (so the incremental paths run, not the dense
    shortcut) stays within `tolerance` relative error of dense, in the model's dtype, on every frame, with no
    NaN or Inf; returns the attention paths taken."""
    ev = fv.eventful(model, fv.Threshold(0.0), incremental_max_fraction=1.0)
    ev.sync_free = sync_free
    dtype = next(model.parameters()).dtype
    paths: set[str] = set()
    with torch.no_grad():
        for frame in frames.to(dtype):
            out, reference = ev.forward_features(frame).float(), model.forward_features(frame).float()
            assert torch.isfinite(out).all() and relative_error(out, reference) < tolerance
            paths.update(ev.attention_paths())
    return paths


def assert_half_precision_incremental_matches(model: torch.nn.Module, frames: torch.Tensor) -> None:
    """The same anchor in bfloat16 and float16 (state that needs range stays float32), host and sync-free."""
    for dtype in (torch.bfloat16, torch.float16):
        half = model.to(dtype)
        for sync_free in (False, True):
            assert "incremental" in incremental_paths_equal_dense(half, frames, sync_free, tolerance=2e-2)
    model.float()


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


def assert_sync_free_step_compiles_whole(model: torch.nn.Module, frames: torch.Tensor,
                                         attention_rows: str = "all", token_selection: str = "per_gate") -> None:
    """With a fixed-size policy and `sync_free`, `step` is one graph (no break, so no host sync), and the
    compiled frames equal the eager ones."""
    eager, compiled = (fv.eventful(model, fv.TopFraction(0.25), attention_rows=attention_rows,
                                   token_selection=token_selection) for _ in range(2))
    eager.sync_free = compiled.sync_free = True
    with torch.no_grad():
        compiled(frames[0])
        compiled(frames[1])
        explanation = torch._dynamo.explain(compiled.step)(compiled._embed(frames[2]), False)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        torch._dynamo.reset()
        compiled.reset()
        compiled.step = torch.compile(compiled.step, fullgraph=True, backend="eager")
        for frame in frames:
            torch.testing.assert_close(compiled.forward_features(frame), eager.forward_features(frame),
                                       rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def assert_changed_rows_path_matches_dense(model: torch.nn.Module, frames: torch.Tensor, atol: float = 1e-5) -> None:
    """`attention_rows="changed"`, checked on every global attention layer (position terms and rotary embeddings
    as the first frame set them): a partial update recomputes exactly the selected rows and the prefix tokens'
    (class token, registers), as dense attention over the updated tokens has them, and keeps every other row as
    it was; with every token selected (through the partial path, not the dense shortcut) the layer reproduces
    dense attention."""
    ev = fv.eventful(model, fv.TopFraction(0.5), attention_rows="changed")
    generator = torch.Generator().manual_seed(0)
    checked = 0
    with torch.no_grad():
        ev.forward_features(frames[0])
        for block in ev.eventful_blocks:
            attention = block.attention
            if not isinstance(attention, EventfulAttention):
                continue  # windowed layers always recompute whole windows
            batch, _, num_tokens, _ = attention.q.shape
            width = block.block.norm1.normalized_shape[0]
            before = torch.randn(batch, num_tokens, width, generator=generator)
            dense_before = attention(None, before, 0.0)
            picks = [torch.randperm(num_tokens, generator=generator)[:num_tokens // 3].sort().values
                     for _ in range(batch)]
            selection = Selection(torch.stack(picks), num_tokens)
            rows = torch.randn(batch, selection.count, width, generator=generator)
            partial = attention(selection, rows, 0.0, changed_rows_only=True)
            assert attention.last_path == "rows"
            dense_after = attention(None, scatter_tokens_(before.clone(), selection, rows), 0.0)
            chosen = torch.zeros(batch, num_tokens, 1, dtype=torch.bool)
            chosen.scatter_(1, selection.indices.unsqueeze(-1), True)
            chosen[:, :attention.prefix_rows] = True  # the class token and registers: every frame
            assert attention.prefix_rows == int(getattr(model, "num_prefix_tokens", 0) or 0)
            torch.testing.assert_close(partial, torch.where(chosen, dense_after, dense_before), rtol=1e-5, atol=atol)
            every = Selection(torch.arange(num_tokens).expand(batch, -1).contiguous(), num_tokens)
            fresh = torch.randn(batch, num_tokens, width, generator=generator)
            everything = attention(every, fresh, 0.0, changed_rows_only=True)
            torch.testing.assert_close(everything, attention(None, fresh, 0.0), rtol=1e-5, atol=atol)
            checked += 1
    assert checked > 0


def assert_half_precision_close_to_float32(model: torch.nn.Module, frames: torch.Tensor, dtype: torch.dtype,
                                           tolerance: float = 0.1, **options: object) -> None:
    """`TopFraction(0.25)` eventful frames in `dtype` are finite and within `tolerance` relative L2 of the same
    frames in float32 (loose: where two tokens' errors tie after rounding, the half-precision gate may pick the
    other one). `options` go to `frugalvit.eventful`."""
    reference = fv.eventful(model, fv.TopFraction(0.25), **options)
    with torch.no_grad():
        expected = [reference.forward_features(frame) for frame in frames]
        half = fv.eventful(model.to(dtype), fv.TopFraction(0.25), **options)
        for frame, want in zip(frames, expected):
            got = half.forward_features(frame.to(dtype)).float()
            assert torch.isfinite(got).all()
            assert relative_error(got, want) < tolerance
    model.float()
