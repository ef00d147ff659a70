"""Eventful Transformer: exactness at full budget, incremental attention, budgets, state, bad input."""

from __future__ import annotations

import pytest
import timm
import torch

import frugalvit as fv
from frugalvit.eventful.attention import build_attention_sums, cancelled_rows, fused_attention, update_attention_sums_
from frugalvit.eventful.gates import (Selection, TokenBuffer, TokenGate, gather_tokens, scatter_rows_strided_,
                                     scatter_tokens_)
from frugalvit.eventful.model import UnsupportedModelError
from frugalvit.timm import embed_tokens

from eventful_anchors import (assert_changed_rows_path_matches_dense, assert_half_precision_close_to_float32,
                              assert_sync_free_step_compiles_whole)

SIZE = 64
# Small versions of real timm architectures: class token, LayerScale (deit3, dinov2), registers,
# class-token-free average pooling, pre-norm (CLIP), qk-norm.
ARCHITECTURES = {
    "vit_tiny_patch16_224": {},
    "deit3_small_patch16_224": {},
    "vit_base_patch16_reg4_gap_256": {},
    "vit_medium_patch16_gap_256": {},
    "vit_base_patch32_clip_224": {"patch_size": 16},
    "vit_small_patch14_reg4_dinov2": {"patch_size": 16},
    "vit_small_patch16_224": {"qk_norm": True, "class_token": False, "global_pool": "avg"},
}


def make_model(name: str, **extra: object) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(img_size=SIZE, depth=2, embed_dim=64, num_heads=4, num_classes=10) | ARCHITECTURES[name] | extra
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad():  # LayerScale starts near zero; make it matter.
        for module in model.modules():
            if isinstance(module, timm.layers.LayerScale):
                module.gamma.uniform_(0.5, 1.5)
    return model


def video(frames: int = 5, batch: int = 1, moving: float = 0.15, seed: int = 0) -> torch.Tensor:
    """Frames where a random subset of pixels changes each step."""
    generator = torch.Generator().manual_seed(seed)
    frame = torch.randn(batch, 3, SIZE, SIZE, generator=generator)
    out = [frame]
    for _ in range(frames - 1):
        mask = torch.rand(batch, 1, SIZE, SIZE, generator=generator) < moving
        frame = frame + mask * torch.randn(batch, 3, SIZE, SIZE, generator=generator)
        out.append(frame)
    return torch.stack(out)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_full_budget_equals_dense_model(name: str) -> None:
    model = make_model(name)
    ev = fv.eventful(model, fv.TopFraction(1.0))
    with torch.no_grad():
        for frame in video(4, batch=2):
            torch.testing.assert_close(ev(frame), model(frame), rtol=1e-5, atol=1e-5)


def test_full_budget_threshold_zero_equals_dense() -> None:
    model = make_model("deit3_small_patch16_224")
    ev = fv.eventful(model, fv.Threshold(0.0))
    with torch.no_grad():
        for frame in video(4):
            torch.testing.assert_close(ev(frame), model(frame), rtol=1e-5, atol=1e-5)


def patch_video(frames: int = 4, batch: int = 1, share: float = 0.3, seed: int = 0, size: int = SIZE,
                patch: int = 16) -> torch.Tensor:
    """Frames in which a random share of the patches changes each step (the others stay exactly equal)."""
    generator = torch.Generator().manual_seed(seed)
    grid = size // patch
    frame = torch.randn(batch, 3, size, size, generator=generator)
    out = [frame]
    for _ in range(frames - 1):
        patches = (torch.rand(batch, 1, grid, grid, generator=generator) < share).float()
        mask = torch.nn.functional.interpolate(patches, scale_factor=patch, mode="nearest")
        frame = frame + mask * torch.randn(batch, 3, size, size, generator=generator)
        out.append(frame)
    return torch.stack(out)


@pytest.mark.parametrize("policy", [fv.Threshold(0.0), fv.RelativeThreshold(0.0)], ids=["absolute", "relative"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_incremental_path_with_zero_threshold_equals_dense(name: str, policy: fv.TokenPolicy) -> None:
    """The approximate path itself (gathers, buffers, incremental attention sums), not the dense shortcut."""
    model = make_model(name)
    ev = fv.eventful(model, policy, incremental_max_fraction=1.0)
    paths = []
    with torch.no_grad():
        for frame in patch_video(5, batch=2):
            out, reference = ev(frame), model(frame)
            scale = reference.abs().max()
            torch.testing.assert_close(out / scale, reference / scale, rtol=0, atol=1e-4)
            paths += ev.attention_paths()
    assert "incremental" in paths


@pytest.mark.parametrize("policy", [fv.TopR(4), fv.TopFraction(0.2)], ids=["topr", "fraction"])
def test_sync_free_frame_compiles_whole_with_no_graph_break(policy: fv.TokenPolicy) -> None:
    """The CPU-checkable proof that a fixed-budget frame has no host sync: `step` is one graph."""
    model = make_model("deit3_small_patch16_224")
    eager, compiled = fv.eventful(model, policy), fv.eventful(model, policy)
    eager.sync_free = compiled.sync_free = True
    frames = patch_video(6, share=0.2)
    embed = lambda images: embed_tokens(model, images)  # noqa: E731
    with torch.no_grad():
        compiled(frames[0])
        compiled(frames[1])
        explanation = torch._dynamo.explain(compiled.step)(embed(frames[2]), False)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        torch._dynamo.reset()
        compiled.reset()
        compiled.step = torch.compile(compiled.step, fullgraph=True, backend="eager")
        paths = []
        for frame in frames:
            torch.testing.assert_close(compiled(frame), eager(frame), rtol=1e-5, atol=1e-5)
            paths += compiled.attention_paths()
    assert "incremental" in paths


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_changed_rows_attention_recomputes_exactly_the_selected_rows(name: str) -> None:
    assert_changed_rows_path_matches_dense(make_model(name), patch_video(1, batch=2))


def test_changed_rows_attention_frames() -> None:
    """`attention_rows="changed"` on whole frames: only the "rows" path runs on partial frames, a full budget
    still equals the timm model, attention costs less than over all queries, and a bad value is refused."""
    model = make_model("vit_tiny_patch16_224", img_size=128)  # 64 tokens: attention matters in the MACs
    frames = patch_video(4, share=0.2, size=128)
    full = fv.eventful(model, fv.TopFraction(1.0), attention_rows="changed")
    macs = {}
    with torch.no_grad():
        for frame in frames:
            torch.testing.assert_close(full(frame), model(frame), rtol=1e-5, atol=1e-5)
        for rows in ("all", "changed"):
            ev = fv.eventful(model, fv.TopR(8), incremental_max_fraction=0.0, attention_rows=rows)
            for frame in frames[:-1]:
                ev(frame)
            with fv.CostCounter() as cost:
                ev(frames[-1])
            macs[rows] = cost.macs
            assert set(ev.attention_paths()) == {"rows" if rows == "changed" else "dense"}
    # Same gate counts, so the linear layers cost the same: the difference is attention, 2 N^2 D against
    # 2 (M + 1) N D multiply-accumulates per layer (the class token's row too; D = heads x head width).
    tokens, width, depth = 65, 64, 2
    assert macs["all"] - macs["changed"] == depth * 2 * tokens * (tokens - 8 - 1) * width
    with pytest.raises(ValueError, match="attention_rows must be one of all, changed"):
        ev.attention_rows = "some"


def test_changed_rows_keep_the_class_token_current() -> None:
    """A classifier reads the class token, whose own input never moves: with changed rows its attention row is
    recomputed every frame, so the logits follow the video (they stayed at frame 1's when it was not)."""
    model = make_model("vit_tiny_patch16_224", img_size=128)
    ev = fv.eventful(model, fv.TopFraction(0.25), attention_rows="changed")
    with torch.no_grad():
        logits = [ev(frame) for frame in patch_video(4, share=0.3, size=128)]
    assert all(not torch.equal(logits[0], later) for later in logits[1:])


def test_changed_rows_frame_compiles_whole_with_no_graph_break() -> None:
    assert_sync_free_step_compiles_whole(make_model("deit3_small_patch16_224"), patch_video(4, share=0.2),
                                         attention_rows="changed")


def test_relative_threshold_is_scale_free() -> None:
    gate_small, gate_large = TokenGate(), TokenGate()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 6, 8, generator=generator)
    moved = tokens.clone()
    moved[0, 1] *= 1.5  # moved by half its norm
    moved[0, 4] *= 1.05  # moved by 5% of its norm
    picks = []
    for gate, scale in ((gate_small, 1.0), (gate_large, 10.0)):
        gate(tokens * scale, fv.RelativeThreshold(0.2))
        selection, _ = gate(moved * scale, fv.RelativeThreshold(0.2))
        picks.append(selection.indices.tolist())
    assert picks[0] == picks[1] == [[1]]


def test_original_model_shared_and_unchanged() -> None:
    model = make_model("vit_tiny_patch16_224")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ev = fv.eventful(model, fv.TopR(5))
    for frame in video(3):
        ev(frame)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert model.blocks[0].attn.qkv.weight.data_ptr() == ev.model.blocks[0].attn.qkv.weight.data_ptr()
    assert type(model.blocks[0]).__name__ == "Block" and not hasattr(model, "eventful_blocks")
    assert sum(p.numel() for p in ev.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "vit_base_patch16_reg4_gap_256"])
def test_incremental_attention_equals_recomputed_attention(name: str) -> None:
    """The incremental path and a dense recomputation over the same gated q, k, v agree."""
    model = make_model(name)
    ev = fv.eventful(model, fv.TopR(6), incremental_max_fraction=1.0)
    paths = set()
    for frame in video(6):
        ev(frame)
        paths.update(ev.attention_paths())
        for block in ev.eventful_blocks:
            attention = block.attention
            expected = fused_attention(attention.q, attention.k, attention.v, attention.attention.scale)
            torch.testing.assert_close(attention.output, expected, rtol=1e-4, atol=1e-5)
    assert "incremental" in paths


def test_incremental_and_dense_switch_give_same_outputs() -> None:
    """Forcing the dense path (fraction 0) and the incremental path (fraction 1) agree frame by frame."""
    model = make_model("vit_tiny_patch16_224")
    incremental = fv.eventful(model, fv.TopR(6), incremental_max_fraction=1.0)
    dense = fv.eventful(model, fv.TopR(6), incremental_max_fraction=0.0)
    for frame in video(6):
        torch.testing.assert_close(incremental(frame), dense(frame), rtol=1e-4, atol=1e-4)
    assert set(dense.attention_paths()) == {"dense"}
    assert set(incremental.attention_paths()) == {"incremental"}


def test_attention_switch_defaults_by_device() -> None:
    """None picks the path by device (incremental up to 1/3 on the CPU, always fused on CUDA); a set value wins."""
    ev = fv.eventful(make_model("vit_tiny_patch16_224"), fv.TopR(4))
    assert ev.incremental_max_fraction is None
    assert ev.attention_switch(torch.device("cpu")) == pytest.approx(1 / 3)
    assert ev.attention_switch(torch.device("cuda")) == 0.0
    ev.incremental_max_fraction = 0.5
    assert ev.attention_switch(torch.device("cuda")) == 0.5
    ev.incremental_max_fraction = None
    frames = video(3)
    for frame in frames:
        ev(frame)
    assert set(ev.attention_paths()) == {"incremental"}  # CPU default: 4 of 17 tokens is below 1/3


def test_attention_sums_update_matches_dense_over_many_steps() -> None:
    generator = torch.Generator().manual_seed(1)
    batch, heads, tokens, width, changed = 2, 3, 40, 8, 6
    q, k, v = (torch.randn(batch, heads, tokens, width, generator=generator) for _ in range(3))
    scale = width ** -0.5
    sums = build_attention_sums(q, k, v, scale)
    for _ in range(30):
        indices = torch.sort(torch.stack([torch.randperm(tokens, generator=generator)[:changed]
                                          for _ in range(batch)]), dim=1).values
        selection = Selection(indices, tokens)
        old_k, old_v = gather_tokens(k, selection), gather_tokens(v, selection)
        fresh = [torch.randn(batch, heads, changed, width, generator=generator) for _ in range(3)]
        for state, rows in zip((q, k, v), fresh):
            scatter_tokens_(state, selection, rows)
        update_attention_sums_(sums, q, k, v, selection, *fresh, old_k, old_v, scale)
    torch.testing.assert_close(sums.output(), fused_attention(q, k, v, scale), rtol=1e-4, atol=1e-5)


def _one_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: list[int], new_k: torch.Tensor,
              new_v: torch.Tensor, scale: float, host_check: bool = True):  # noqa: ANN202
    """Replace keys/values (queries unchanged) of tokens `rows` through the incremental update; return the sums."""
    sums = build_attention_sums(q, k, v, scale)
    selection = Selection(torch.tensor([rows]), q.shape[-2])
    old_k, old_v = gather_tokens(k, selection), gather_tokens(v, selection)
    scatter_tokens_(k, selection, new_k)
    scatter_tokens_(v, selection, new_v)
    update_attention_sums_(sums, q, k, v, selection, gather_tokens(q, selection), new_k, new_v, old_k, old_v, scale,
                           host_check=host_check)
    return sums


@pytest.mark.parametrize("host_check", [True, False], ids=["cpu-host-checks", "on-device"])
def test_incremental_sums_survive_logit_overflow_without_fallback(host_check: bool) -> None:
    """A new key far above every row's stabiliser: the rows are rescaled, no overflow, no dense rebuild."""
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=generator) for _ in range(3))
    new_k = 60.0 * q[:, :, :1] / q[:, :, :1].norm(dim=-1, keepdim=True)  # logit ~ 60 / sqrt(8) * |q| >> 30
    out = _one_step(q, k, v, [5], new_k, torch.randn(1, 2, 1, 8, generator=generator), 8 ** -0.5,
                    host_check).output()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, fused_attention(q, k, v, 8 ** -0.5), rtol=1e-4, atol=1e-5)


def test_incremental_sums_repair_cancelled_rows() -> None:
    """Removing the key that held almost all of some rows' mass leaves tiny denominators.

    With host checks (the CPU default) the frame is rebuilt exactly; on the device the ceil(M/8)
    smallest denominators are recomputed and `cancelled_rows` marks the rest for the caller to hold.
    """
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 10, 8, generator=generator) for _ in range(3))
    k[:, :, 4] = 40.0 * q[:, :, 0] / q[:, :, 0].norm()  # row 0 (and a few like it) attend almost only to token 4
    new_k, new_v = torch.randn(1, 1, 1, 8, generator=generator), torch.randn(1, 1, 1, 8, generator=generator)
    exact = _one_step(q.clone(), k.clone(), v.clone(), [4], new_k, new_v, 8 ** -0.5, True)
    k_now, v_now = k.clone(), v.clone()
    on_device = _one_step(q, k, v, [4], new_k, new_v, 8 ** -0.5, False)
    reference = fused_attention(q, k_now.index_copy(2, torch.tensor([4]), new_k),
                                v_now.index_copy(2, torch.tensor([4]), new_v), 8 ** -0.5)
    torch.testing.assert_close(exact.output(), reference, rtol=1e-4, atol=1e-5)
    still_cancelled = cancelled_rows(on_device)
    assert still_cancelled.sum() < (exact.denominator > 0).sum()  # the repair reached at least one row
    fine = ~still_cancelled.expand_as(reference)  # above the 1e-4 floor: float32 cancellation error up to ~1e-3
    torch.testing.assert_close(on_device.output()[fine], reference[fine], rtol=3e-2, atol=2e-3)


@pytest.mark.parametrize("sync_free", [False, True], ids=["host-checks", "sync-free"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2"])
def test_half_precision_incremental_path_matches_dense_without_nan(name: str, dtype: torch.dtype,
                                                                   sync_free: bool) -> None:
    """Sums kept in float32: a float16 / bfloat16 model runs the incremental path with no NaN or Inf,
    with the CPU's host checks and with the device-side guards (`sync_free`)."""
    model = make_model(name).to(dtype)
    ev = fv.eventful(model, fv.Threshold(0.0), incremental_max_fraction=1.0)
    ev.sync_free = sync_free
    paths = []
    with torch.no_grad():
        for frame in patch_video(5, batch=2):
            frame = frame.to(dtype)
            out, reference = ev(frame), model(frame)
            assert out.dtype == dtype and torch.isfinite(out).all()
            scale = reference.float().abs().max()
            error = ((out.float() - reference.float()).abs().max() / scale).item()
            assert error < (2e-2 if dtype == torch.bfloat16 else 4e-3)
            paths += ev.attention_paths()
    assert "incremental" in paths


def test_error_grows_as_budget_shrinks_and_macs_fall() -> None:
    model = make_model("deit3_small_patch16_224")
    frames = video(5, moving=0.3)
    with torch.no_grad():
        reference = model(frames[-1])
    errors, macs = [], []
    for r in (17, 12, 8, 4, 1):
        ev = fv.eventful(model, fv.TopR(r))
        for frame in frames[:-1]:
            ev(frame)
        with fv.CostCounter() as cost:
            out = ev(frames[-1])
        errors.append((out - reference).norm().item() / reference.norm().item())
        macs.append(cost.macs)
    assert errors[0] < 1e-5
    assert all(later >= earlier - 1e-4 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] > errors[1]
    assert all(later < earlier for earlier, later in zip(macs, macs[1:])), macs


def analytic_eventful_macs(dim: int, depth: int, tokens: int, changed: int, patches: int, patch_pixels: int,
                           classes: int, incremental: bool, sync_free: bool = False) -> int:
    """Executed MACs of one eventful frame where every gate passes `changed` tokens."""
    tokenwise = changed * dim * (3 * dim + dim + 2 * 4 * dim)
    repaired = -(-changed // 8) if sync_free else 0  # device-side cancellation repair rows (REPAIR_DIVISOR)
    attention = (6 * changed + 2 * repaired) * tokens * dim if incremental else 2 * tokens * tokens * dim
    return patches * patch_pixels * dim + depth * (tokenwise + attention) + dim * classes


@pytest.mark.parametrize("sync_free", [False, True], ids=["host-checks", "sync-free"])
@pytest.mark.parametrize("changed", [3, 8, 17])
def test_eventful_step_macs_match_analytic_count(changed: int, sync_free: bool) -> None:
    model = make_model("vit_tiny_patch16_224")
    ev = fv.eventful(model, fv.TopR(changed))
    ev.sync_free = sync_free
    frames = video(3)
    ev(frames[0])
    ev(frames[1])  # first partial frame builds the attention sums densely
    with fv.CostCounter() as cost:
        ev(frames[2])
    tokens = 17
    incremental = changed <= tokens / 3
    assert set(ev.attention_paths()) == {"incremental" if incremental else "dense"}
    expected = analytic_eventful_macs(64, 2, tokens, changed, 16, 3 * 16 * 16, 10, incremental, sync_free)
    assert cost.macs == expected


def test_full_frame_keeps_sums_so_the_next_frame_is_incremental() -> None:
    """No `rebuild` (a second dense attention pass) after a first frame, a refresh or a scene cut."""
    model = make_model("vit_tiny_patch16_224")
    ev = fv.eventful(model, fv.TopR(3))
    frames = video(4)
    with torch.no_grad():
        ev(frames[0])
        assert set(ev.attention_paths()) == {"dense+sums"}
        with fv.CostCounter() as first_partial:
            ev(frames[1])
        assert set(ev.attention_paths()) == {"incremental"}
        with fv.CostCounter() as steady:
            ev(frames[2])
        assert first_partial.macs == steady.macs
        ev.refresh()
        ev(frames[3])
        ev(frames[2])
        assert set(ev.attention_paths()) == {"incremental"}
    full = fv.eventful(model, fv.TopFraction(1.0))  # never incremental: keep the fused kernel
    full(frames[0])
    assert set(full.attention_paths()) == {"dense"}


def test_policy_change_mid_sequence() -> None:
    model = make_model("vit_tiny_patch16_224")
    ev = fv.eventful(model, fv.TopR(4))
    frames = video(6)
    for frame in frames[:3]:
        ev(frame)
    assert ev.gate_counts()[0] == (4, 4, 4)
    ev.policy = fv.TopR(9)
    ev(frames[3])
    assert ev.gate_counts()[0] == (9, 9, 9)
    ev.policy = fv.TopFraction(1.0)
    with torch.no_grad():
        torch.testing.assert_close(ev(frames[4]), model(frames[4]), rtol=1e-5, atol=1e-5)


def test_threshold_policy_follows_change() -> None:
    model = make_model("vit_tiny_patch16_224")
    ev = fv.eventful(model, fv.Threshold(1e-3))
    frame = video(1)[0]
    ev(frame)
    ev(frame)
    assert ev.gate_counts()[0][0] == 0  # nothing changed: no token recomputed
    with torch.no_grad():
        torch.testing.assert_close(ev(frame), model(frame), rtol=1e-5, atol=1e-5)


def test_reset_and_refresh() -> None:
    model = make_model("vit_tiny_patch16_224")
    ev = fv.eventful(model, fv.TopR(2))
    frames = video(4, moving=0.5)
    first = ev(frames[0])
    ev(frames[1])
    ev.reset()
    torch.testing.assert_close(ev(frames[0]), first)
    ev(frames[1])
    ev.refresh()
    with torch.no_grad():
        torch.testing.assert_close(ev(frames[2]), model(frames[2]), rtol=1e-5, atol=1e-5)
    assert ev.gate_counts()[0] == (17, 17, 17)
    ev.refresh_every = 2
    ev(frames[3])
    assert ev.gate_counts()[0] == (2, 2, 2)
    ev(frames[0])
    assert ev.gate_counts()[0] == (17, 17, 17)


def test_scene_cut_triggers_full_update() -> None:
    model = make_model("vit_tiny_patch16_224")
    ev = fv.eventful(model, fv.TopR(2), cut_share=0.5, cut_relative_error=0.5)
    calm = video(3, moving=0.01)
    for index, frame in enumerate(calm):
        ev(frame)
        assert ev.last_frame_full == (index == 0)
    assert ev.gate_counts()[0] == (2, 2, 2)
    cut = video(1, seed=7)[0]
    with torch.no_grad():
        torch.testing.assert_close(ev(cut), model(cut), rtol=1e-5, atol=1e-5)
    assert ev.last_frame_full and ev.gate_counts()[0] == (17, 17, 17)


def half_changed(frame: torch.Tensor, seed: int) -> torch.Tensor:
    """`frame` with its top half replaced by new content: half the tokens move a lot, the rest not at all."""
    out = frame.clone()
    out[..., : SIZE // 2, :] = torch.randn(out[..., : SIZE // 2, :].shape,
                                           generator=torch.Generator().manual_seed(seed))
    return out


@pytest.mark.parametrize("selection", ["per_gate", "shared"])
def test_widespread_change_is_held_then_computed_in_full(selection: str) -> None:
    """hold_share: a frame where half the tokens moved (between hold_share and cut_share) returns the last
    output and computes nothing; after max_held_frames such frames, a full frame; calm frames stay partial."""
    model = make_model("vit_tiny_patch16_224")
    ev = fv.eventful(model, fv.TopR(2), cut_share=0.9, hold_share=0.3, max_held_frames=2,
                     token_selection=selection)
    calm = video(3, moving=0.01)
    with torch.no_grad():
        for frame in calm:
            last = ev(frame)
        assert not ev.last_frame_held and ev.gate_counts()[0] == (2, 2, 2)
        state = [t.clone() for t in ev.state_tensors()]
        kept, last = last, last.clone()
        kept.zero_()  # the caller owns its output: writing into it must not change what a held frame returns
        for seed in (1, 2):
            held = ev(half_changed(calm[-1], seed))
            assert ev.last_frame_held and not ev.last_frame_full
            assert ev.gate_counts()[0] == (0, 0, 0) and ev.attention_paths()[0] == "held"
            assert int(ev.updated_tokens().sum()) == 0
            torch.testing.assert_close(held, last, rtol=0, atol=0)
            assert all(torch.equal(a, b) for a, b in zip(state, ev.state_tensors()))
        frame = half_changed(calm[-1], 3)
        torch.testing.assert_close(ev(frame), model(frame), rtol=1e-5, atol=1e-5)  # held twice: full frame
        assert ev.last_frame_full and not ev.last_frame_held
        ev(frame + 0.01 * torch.randn_like(frame))
        assert not ev.last_frame_held and ev.gate_counts()[0] == (2, 2, 2)
        cut = video(1, seed=7)[0]  # every token moves: a cut, not a hold
        torch.testing.assert_close(ev(cut), model(cut), rtol=1e-5, atol=1e-5)
        assert ev.last_frame_full


def test_a_batch_is_held_only_when_every_stream_would_hold() -> None:
    model = make_model("vit_tiny_patch16_224")
    ev = fv.eventful(model, fv.TopR(2), cut_share=0.9, hold_share=0.3)
    calm = video(3, batch=2, moving=0.01)
    with torch.no_grad():
        for frame in calm:
            ev(frame)
        one = torch.stack([half_changed(calm[-1, 0], 1), calm[-1, 1]])
        ev(one)
        assert not ev.last_frame_held and ev.gate_counts()[0] == (2, 2, 2)
        ev(half_changed(calm[-1], 2))
        assert ev.last_frame_held
        ev.reset(stream=1)  # a pending stream reset is done on the next frame, never held off
        frame = half_changed(calm[-1], 3)
        torch.testing.assert_close(ev(frame)[1], model(frame)[1], rtol=1e-5, atol=1e-5)
        assert not ev.last_frame_held


def test_hold_share_bad_settings_are_clear_errors() -> None:
    model = make_model("vit_tiny_patch16_224")
    frame = video(1)[0]
    with pytest.raises(ValueError, match="hold_share must be None or lie in"):
        fv.eventful(model, fv.TopR(2), cut_share=0.5, hold_share=1.5)
    with pytest.raises(ValueError, match="max_held_frames must be an integer"):
        fv.eventful(model, fv.TopR(2), cut_share=0.5, hold_share=0.2, max_held_frames=0)
    for cut_share in (None, 0.2):
        ev = fv.eventful(model, fv.TopR(2), cut_share=cut_share, hold_share=0.2)
        with pytest.raises(ValueError, match="needs a larger cut_share"):
            ev(frame)


def test_held_frames_with_sync_free_decide_on_the_host_and_match_the_eager_path() -> None:
    """hold_share with sync_free: one host decision per frame, then the sync-free frame; same outputs and the
    same held / full / partial frames as without sync_free."""
    model = make_model("vit_tiny_patch16_224")
    calm = video(3, moving=0.01)
    frames = [*calm, half_changed(calm[-1], 1), half_changed(calm[-1], 2), calm[-1] + 0.01, video(1, seed=7)[0]]
    runs = []
    for sync_free in (False, True):
        ev = fv.eventful(model, fv.TopR(2), cut_share=0.9, hold_share=0.3)
        ev.sync_free = sync_free
        with torch.no_grad():
            runs.append([(ev(frame), ev.last_frame_held, ev.last_frame_full) for frame in frames])
    for (eager, held, full), (free, held_free, full_free) in zip(*runs):
        assert (held, full) == (held_free, full_free)
        torch.testing.assert_close(free, eager, rtol=1e-5, atol=1e-5)
    assert [held for _, held, _ in runs[0]] == [False, False, False, True, True, False, False]
    assert runs[0][-1][2]  # the cut: a full frame at once, not a frame late


def test_sync_free_scene_cut_is_decided_on_the_device_and_applied_one_frame_later(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With sync_free, a cut is flagged per stream on the device and recomputed in full on the next frame (no
    host sync in the frame: no .item() or bool(tensor)); only the cut stream of a batch is refreshed."""
    model = make_model("vit_tiny_patch16_224")
    calm = video(3, batch=2, moving=0.01)
    cut = torch.stack([calm[-1, 0], video(1, seed=7)[0, 0]])  # stream 1 cuts, stream 0 stays calm
    after = cut + 0.01 * torch.randn_like(cut)
    ev = fv.eventful(model, fv.TopR(2), cut_share=0.5, cut_relative_error=0.5)
    ev.sync_free = True

    def no_sync(*_: object) -> None:
        raise AssertionError("host sync in a sync-free frame")

    with torch.no_grad():
        for frame in calm:
            ev(frame)
        monkeypatch.setattr(torch.Tensor, "item", no_sync)
        monkeypatch.setattr(torch.Tensor, "__bool__", no_sync)
        ev(cut)
        assert not ev.last_frame_full and ev.gate_counts()[0] == (2, 2, 2)  # flagged, not yet applied
        out = ev(after)
        monkeypatch.undo()
        torch.testing.assert_close(out[1], model(after)[1], rtol=1e-5, atol=1e-5)  # stream 1 recomputed in full
        assert not ev.last_frame_full
        ev(after + 0.01 * torch.randn_like(after))  # stream 1 was refreshed: no second cut for it
        assert ev._streams_pending == set() and ev._pending_cuts is not None
        single = fv.eventful(model, fv.TopR(2), cut_share=0.5, cut_relative_error=0.5)
        single.sync_free = True
        for frame in calm[:, :1]:
            single(frame)
        single(cut[1:])
        assert not single.last_frame_full
        single(after[1:])
        assert single.last_frame_full  # one stream, all of it cut: one full frame


def test_batch_samples_are_independent() -> None:
    model = make_model("vit_tiny_patch16_224")
    frames = video(4, batch=2)
    batched = fv.eventful(model, fv.TopR(5))
    singles = [fv.eventful(model, fv.TopR(5)) for _ in range(2)]
    for frame in frames:
        out = batched(frame)
        for index, single in enumerate(singles):
            torch.testing.assert_close(out[index:index + 1], single(frame[index:index + 1]), rtol=1e-4, atol=1e-5)


def test_state_memory_is_reported() -> None:
    model = make_model("vit_tiny_patch16_224")
    ev = fv.eventful(model, fv.TopR(3))
    assert ev.state_bytes() == 0
    for frame in video(3):
        ev(frame)
    assert ev.state_bytes() > 0
    ev.reset()
    assert ev.state_bytes() == 0


def test_gate_and_buffer_semantics() -> None:
    gate, buffer = TokenGate(), TokenBuffer()
    tokens = torch.zeros(1, 4, 2)
    selection, passed = gate(tokens, fv.TopR(1))
    assert selection is None and torch.equal(passed, tokens)
    buffer(selection, passed * 10)
    moved = tokens.clone()
    moved[0, 2] = 5.0
    selection, passed = gate(moved, fv.TopR(1))
    assert selection.indices.tolist() == [[2]] and torch.equal(passed, moved[:, 2:3])
    assert torch.equal(gate.reference, moved)
    assert torch.equal(buffer(selection, passed * 10), moved * 10)


@pytest.mark.parametrize("spec, expected", [
    ("topr:16", fv.TopR(16)), ("topr:0.25", fv.TopFraction(0.25)), ("fraction:1", fv.TopFraction(1.0)),
    ("threshold:0.1", fv.Threshold(0.1)), ("relative:0.2", fv.RelativeThreshold(0.2)),
])
def test_parse_policy(spec: str, expected: fv.TokenPolicy) -> None:
    assert fv.parse_policy(spec) == expected


@pytest.mark.parametrize("spec", ["topr", "topr:abc", "topr:2.5", "magic:3", "threshold:-1", "fraction:1.5", "relative:-0.1"])
def test_parse_policy_rejects_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        fv.parse_policy(spec)


def test_budget_out_of_range() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        fv.TopR(-1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fv.TopFraction(1.5)
    model = make_model("vit_tiny_patch16_224")
    ev = fv.eventful(model, fv.TopR(100))
    frames = video(2)
    ev(frames[0])
    with pytest.raises(ValueError, match="more tokens than the 17"):
        ev(frames[1])
    with pytest.raises(TypeError, match="TokenPolicy"):
        ev.policy = 16
    with pytest.raises(ValueError, match="incremental_max_fraction"):
        ev.incremental_max_fraction = 2.0


def test_bad_frames_get_clear_errors() -> None:
    model = make_model("vit_tiny_patch16_224")
    ev = fv.eventful(model, fv.TopR(4))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        ev(torch.randn(3, SIZE, SIZE))
    with pytest.raises(ValueError, match="3-channel"):
        ev(torch.randn(1, 1, SIZE, SIZE))
    ev(torch.randn(1, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="call reset"):
        ev(torch.randn(2, 3, SIZE, SIZE))
    model.train()
    with pytest.raises(RuntimeError, match="eval"):
        ev(torch.randn(1, 3, SIZE, SIZE))


def test_unsupported_models_are_named() -> None:
    with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
        fv.eventful(torch.nn.Linear(3, 3), fv.TopR(1))
    parallel = timm.create_model("vit_small_patch16_18x2_224", img_size=SIZE, depth=1)
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0 \(ParallelThingsBlock\)"):
        fv.eventful(parallel, fv.TopR(1))
    # an Attention subclass with its own arithmetic (EcoFormer's hashed attention) is not silently replaced by
    # timm's softmax attention
    hashed = fv.ecoformer(make_model("vit_tiny_patch16_224"), bits=8, anchors=4)
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0\.attn \(EcoFormerAttention\).*overrides"):
        fv.eventful(hashed, fv.TopR(1))


def test_dynamic_image_size_model() -> None:
    model = make_model("vit_tiny_patch16_224", dynamic_img_size=True)
    ev = fv.eventful(model, fv.TopFraction(1.0))
    frame = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        torch.testing.assert_close(ev(frame), model(frame), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_changed_rows_attention_in_half_precision(dtype: torch.dtype) -> None:
    """`attention_rows="changed"` in half precision: finite, and close to the same frames in float32. Loose: where
    two tokens' errors tie after rounding the half-precision gate may pick the other one, which moves a frame by
    about 0.05 relative L2 (every-row attention shows the same, up to 0.058 on these frames)."""
    assert_half_precision_close_to_float32(make_model("deit3_small_patch16_224"), patch_video(5, batch=2, share=0.2),
                                           dtype, attention_rows="changed")


@pytest.mark.parametrize("grouped", [False, True], ids=["tokens", "heads"])
def test_strided_scatter_writes_what_the_flat_row_copy_writes(grouped: bool) -> None:
    """The GPU's one-kernel scatter of a strided source (keys split from a qkv projection) equals the CPU's
    copy-and-index_copy, for (B, N, D) and per-head (B, H, N, Dh) state, with per-sample indices."""
    torch.manual_seed(0)
    batch, tokens, heads, dim, count = 2, 9, 3, 4, 4
    indices = torch.stack([torch.randperm(tokens)[:count].sort().values for _ in range(batch)])
    selection = Selection(indices, tokens)
    if grouped:
        qkv = torch.randn(batch, count, 3, heads, dim)
        values = qkv.permute(2, 0, 3, 1, 4)[1]  # (B, H, M, Dh), strided like the keys of one projection
        target = torch.randn(batch, heads, tokens, dim)
    else:
        values = torch.randn(batch, 2 * dim, count).transpose(1, 2)[..., :dim]  # (B, M, D), strided
        target = torch.randn(batch, tokens, dim)
    assert not values.is_contiguous()
    expected = scatter_tokens_(target.clone(), selection, values.contiguous())
    torch.testing.assert_close(scatter_rows_strided_(target.clone(), selection, values), expected, rtol=0, atol=0)


def test_hybrid_vit_takes_rgb_frames_and_keeps_its_anchor() -> None:
    """A hybrid ViT's patch projection reads its CNN's features: the frame check must not ask for their width."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=64, depth=2).eval()
    ev = fv.eventful(model, fv.TopFraction(1.0))
    with torch.no_grad():
        for frame in torch.randn(3, 1, 3, 64, 64):
            torch.testing.assert_close(ev(frame), model(frame), rtol=1e-5, atol=1e-5)


def test_map_head_models_are_counted() -> None:
    """timm's attention-pooling head expands a parameter under no_grad: CostCounter still counts it."""
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=32, depth=1).eval()
    frame = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), fv.CostCounter() as whole:
        model(frame)
    with torch.no_grad(), fv.CostCounter() as features:
        model.forward_features(frame)
    assert whole.macs > features.macs > 0 and "VisionTransformer.attn_pool" in whole.by_module()
