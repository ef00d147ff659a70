"""`token_selection="shared"`: one token set per frame, chosen at the first gate, passed by every gate."""

from __future__ import annotations

import pytest
import torch

import frugalvit as fv
from frugalvit.eventful.policies import TokenPolicy

from eventful_anchors import assert_half_precision_close_to_float32, assert_sync_free_step_compiles_whole
from test_eventful import ARCHITECTURES, make_model, patch_video


class Replay(TokenPolicy):
    """Every gate passes the indices recorded for this frame (a per-gate run that selects what shared did)."""

    fixed_size = True

    def __init__(self, frames: list[torch.Tensor]) -> None:
        self.frames, self.frame = frames, 0

    def count(self, error_norms: torch.Tensor) -> int:
        return self.frames[self.frame].shape[1]

    def select(self, error_norms: torch.Tensor) -> torch.Tensor:
        return self.frames[self.frame]


def gate_indices(ev: fv.EventfulViT) -> list[torch.Tensor | None]:
    return [gate.last_indices for block in ev.eventful_blocks
            for gate in (block.attention_gate, block.projection_gate, block.mlp_gate)]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_full_budget_equals_the_timm_model(name: str) -> None:
    model = make_model(name)
    ev = fv.eventful(model, fv.TopFraction(1.0), token_selection="shared")
    with torch.no_grad():
        for frame in patch_video(4, batch=2):
            torch.testing.assert_close(ev(frame), model(frame), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", ["all", "changed"])
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_gate_passes_the_first_gates_choice_with_the_prefix_tokens(name: str, rows: str) -> None:
    """The first gate chooses by the input's change (the class token and registers always among the chosen),
    every gate passes exactly those tokens, and the frames equal a per-gate run whose every gate is told to
    select the same tokens (the shared path is the per-gate path with one selection; with changed attention rows
    the prefix rows, chosen already, are not recomputed a second time)."""
    model = make_model(name)
    frames = patch_video(5, batch=2, share=0.3)
    shared = fv.eventful(model, fv.TopFraction(0.25), token_selection="shared", attention_rows=rows)
    recorded, outputs = [], []
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        for frame in frames:
            outputs.append(shared(frame))
            indices = gate_indices(shared)
            if shared.last_frame_full:
                assert all(index is None for index in indices)
                recorded.append(None)
                continue
            assert all(torch.equal(index, indices[0]) for index in indices)
            assert (indices[0][:, :prefix] == torch.arange(prefix)).all()
            recorded.append(indices[0].clone())
        replay = Replay([index for index in recorded if index is not None])
        per_gate = fv.eventful(model, replay, attention_rows=rows)
        for frame, index, expected in zip(frames, recorded, outputs):
            torch.testing.assert_close(per_gate(frame), expected, rtol=1e-6, atol=1e-6)
            replay.frame += index is not None


def test_token_wise_cost_as_per_gate_and_the_class_token_follows_the_video() -> None:
    """Every gate passes as many tokens as with per-gate selection; attention costs only the selected rows
    (a per-gate frame with changed rows told the same tokens computes the class token's row once more per
    layer, the only difference); a classifier's logits move with the video, since the class token is
    recomputed on every partial frame."""
    model = make_model("vit_tiny_patch16_224", img_size=128)
    frames = patch_video(4, share=0.3, size=128)
    ev = fv.eventful(model, fv.TopR(9), token_selection="shared")
    with torch.no_grad():
        logits = [ev(frame) for frame in frames[:-1]]
        with fv.CostCounter() as shared:
            ev(frames[-1])
        assert ev.gate_counts()[-1] == (9, 9, 9)
        recorded = [None] + [ev.eventful_blocks[0].attention_gate.last_indices.clone()]
        replay = Replay([ev.eventful_blocks[0].attention_gate.last_indices.clone()])
        per_gate = fv.eventful(model, fv.TopR(9), attention_rows="changed")
        for frame in frames[:-1]:
            per_gate(frame)
        per_gate.policy = replay
        with fv.CostCounter() as told:
            per_gate(frames[-1])
    tokens, width, depth = 65, model.embed_dim, len(model.blocks)
    assert shared.macs == told.macs - depth * 2 * tokens * width  # the class token's row: q.K^T and a.V
    assert all(not torch.equal(logits[0], later) for later in logits[1:])
    counts = ev.updated_tokens()
    assert counts[0, 0] == 3 * len(ev.eventful_blocks)  # the class token through every gate
    assert set(counts.flatten().tolist()) <= {0, 3 * len(ev.eventful_blocks)}  # whole network or nothing


def test_threshold_policies_choose_once_per_frame() -> None:
    """A data-dependent policy decides the count once, at the first gate, from the input's change."""
    model = make_model("deit3_small_patch16_224")
    ev = fv.eventful(model, fv.RelativeThreshold(0.05), token_selection="shared")
    with torch.no_grad():
        for frame in patch_video(3, share=0.25):
            ev(frame)
    counts = {count for block in ev.gate_counts() for count in block}
    assert len(counts) == 1 and 1 <= counts.pop() < 17


@pytest.mark.parametrize("rows", ["all", "changed"])
def test_shared_frame_compiles_whole_with_no_graph_break(rows: str) -> None:
    model = make_model("vit_small_patch14_reg4_dinov2")
    frames = patch_video(4, share=0.2)
    assert_sync_free_step_compiles_whole(model, frames, attention_rows=rows, token_selection="shared")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", ["all", "changed"])
def test_half_precision_stays_finite_and_close(dtype: torch.dtype, rows: str) -> None:
    assert_half_precision_close_to_float32(make_model("deit3_small_patch16_224"), patch_video(4, share=0.3), dtype,
                                           attention_rows=rows, token_selection="shared")


def test_shared_state_is_keys_values_one_reference_and_the_residual() -> None:
    """A shared sequence keeps each layer's keys and values, the first gate's reference (it chooses) and the
    residual sums, nothing else (no buffers, no other gate's reference, no query or output rows), and a
    partial frame writes the first gate's reference, not the others."""
    model = make_model("vit_small_patch14_reg4_dinov2")
    frames = patch_video(3, batch=2, share=0.3)
    ev = fv.eventful(model, fv.TopFraction(0.25), token_selection="shared", refresh_every=3)
    per_gate = fv.eventful(model, fv.TopFraction(0.25))
    with torch.no_grad():
        for frame in frames:
            ev(frame)
            per_gate(frame)
    assert not ev.last_frame_full
    batch, tokens, width = 2, model.patch_embed.num_patches + model.num_prefix_tokens, model.embed_dim
    selected = ev.eventful_blocks[0].attention_gate.last_count
    # keys and values per layer, the reference, the residual sums, the first gate's error scratch (float32);
    # the chosen indices (int64)
    expected = (2 * len(model.blocks) + 3) * batch * tokens * width * 4 + batch * selected * 8
    assert ev.state_bytes() == expected
    assert per_gate.state_bytes() > 3 * expected
    gates = [gate for block in ev.eventful_blocks for gate in (block.attention_gate, block.projection_gate,
                                                               block.mlp_gate)]
    assert gates[0].reference is not None and all(gate.reference is None for gate in gates[1:])
    with torch.no_grad():  # the next full frame (refresh_every) keeps the same state, written in place
        before = [(id(t), t.data_ptr()) for t in ev.state_tensors()]
        ev(frames[0])
        assert ev.last_frame_full and [(id(t), t.data_ptr()) for t in ev.state_tensors()] == before


@pytest.mark.parametrize("order", [("shared", "per_gate"), ("per_gate", "shared")])
def test_switching_selection_mid_sequence_recomputes_one_frame_in_full(order: tuple[str, str]) -> None:
    """Shared frames keep only the first gate's reference and the residual sums, per-gate frames the other
    gates' references and buffers: a switch either way computes the next frame in full, and from there the
    frames equal a run started there with the new selection."""
    before, after = order
    model = make_model("deit3_small_patch16_224")
    frames = patch_video(6, batch=2, share=0.3)
    ev = fv.eventful(model, fv.TopFraction(0.25), token_selection=before)
    fresh = fv.eventful(model, fv.TopFraction(0.25), token_selection=after)
    with torch.no_grad():
        for frame in frames[:3]:
            ev(frame)
        assert not ev.last_frame_full
        ev.token_selection = after
        for step, frame in enumerate(frames[3:]):
            torch.testing.assert_close(ev(frame), fresh(frame), rtol=1e-6, atol=1e-6)
            assert ev.last_frame_full == (step == 0)


def test_a_bad_value_is_one_clear_error() -> None:
    ev = fv.eventful(make_model("vit_tiny_patch16_224"), fv.TopFraction(0.25))
    with pytest.raises(ValueError, match="token_selection must be one of per_gate, shared"):
        ev.token_selection = "global"


def other_families() -> list[tuple[str, torch.nn.Module, torch.Tensor]]:
    from test_eventful_beit import make_beit
    from test_eventful_eva import eva_video, make_eva
    from test_eventful_sam import make_sam, sam_video

    return [("sam", make_sam(), sam_video(4)), ("beit", make_beit("per-layer-bias"), patch_video(4, batch=2)),
            ("eva", make_eva("eva02-tiny"), eva_video(4))]


@pytest.mark.parametrize("family", ["beit", "eva"])
def test_beit_and_eva_shared_frames_equal_per_gate_frames_told_the_same_tokens(family: str) -> None:
    """The selected-tokens frame with a relative-position bias table (BEiT) and rotary embeddings (EVA): equal
    to the per-gate path (every attention row) whose every gate is told the shared frame's tokens."""
    from test_eventful_beit import make_beit
    from test_eventful_eva import eva_video, make_eva

    model, frames = {"beit": lambda: (make_beit("per-layer-bias"), patch_video(5, batch=2, share=0.3)),
                     "eva": lambda: (make_eva("eva02-tiny"), eva_video(5, batch=2))}[family]()
    shared = fv.eventful(model, fv.TopFraction(0.25), token_selection="shared")
    recorded, outputs = [], []
    with torch.no_grad():
        for frame in frames:
            outputs.append(shared.forward_features(frame))
            if not shared.last_frame_full:
                assert shared.attention_paths()[0] == "rows"
                recorded.append(shared.eventful_blocks[0].attention_gate.last_indices.clone())
        assert recorded
        replay = Replay(recorded)
        per_gate = fv.eventful(model, replay)
        for index, (frame, expected) in enumerate(zip(frames, outputs)):
            torch.testing.assert_close(per_gate.forward_features(frame), expected, rtol=1e-5, atol=1e-5)
            replay.frame += index > 0 and not per_gate.last_frame_full


def test_sam_beit_and_eva_full_budget_and_one_selection() -> None:
    """Windowed attention with relative positions and a conv neck (SAM), a relative-position table (BEiT) and
    rotary embeddings (EVA): full budget equals the timm model; partial frames pass one selection everywhere."""
    for name, model, frames in other_families():
        full = fv.eventful(model, fv.TopFraction(1.0), token_selection="shared")
        shared = fv.eventful(model, fv.TopFraction(0.25), token_selection="shared")
        with torch.no_grad():
            for frame in frames:
                torch.testing.assert_close(full.forward_features(frame), model.forward_features(frame),
                                           rtol=1e-5, atol=1e-5, msg=name)
                out = shared.forward_features(frame)
                assert torch.isfinite(out).all(), name
        indices = gate_indices(shared)
        assert all(torch.equal(index, indices[0]) for index in indices), name
