"""Eventful on timm's EVA-02: rotary positions on q/k (patch tokens only), SwiGLU, sub-LN, split q/k/v."""

from __future__ import annotations

import pytest
import timm
import torch

import frugalvit as fv
from frugalvit.eventful.model import UnsupportedModelError
from eventful_anchors import (assert_changed_rows_path_matches_dense, assert_full_budget_equals, assert_half_precision_incremental_matches,
                              assert_sync_free_step_compiles_whole,
                              incremental_paths_equal_dense, last_frame_macs)
from frugalvit.eventful.model import UnsupportedModelError
from test_eventful import patch_video

SIZE = 56  # a 4 x 4 grid of 14-pixel patches
VARIANTS = {
    "eva02-tiny": ("eva02_tiny_patch14_224", {}),
    "split-qkv-sub-ln-layerscale": ("eva02_small_patch14_224", dict(qkv_fused=False, scale_attn_inner=True,
                                                                   init_values=0.5)),
    "eva02-base-narrow": ("eva02_base_patch14_224", dict(embed_dim=128, num_heads=2)),
}


def make_eva(variant: str) -> torch.nn.Module:
    name, extra = VARIANTS[variant]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=SIZE, depth=2, **extra).eval()


def eva_video(frames: int = 5, batch: int = 2, share: float = 0.3) -> torch.Tensor:
    return patch_video(frames, batch, share, size=SIZE, patch=14)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_full_budget_equals_the_timm_model(variant: str) -> None:
    assert_full_budget_equals(make_eva(variant), eva_video(3))


@pytest.mark.parametrize("sync_free", [False, True], ids=["host-checks", "sync-free"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_incremental_path_with_zero_threshold_equals_dense(variant: str, sync_free: bool) -> None:
    """The changed tokens' queries and keys are rotated by their own positions (prefix tokens not at all)."""
    model = make_eva(variant)
    assert "incremental" in incremental_paths_equal_dense(model, eva_video(), sync_free)


def test_rotation_is_applied() -> None:
    ev = fv.eventful(make_eva("eva02-tiny"), fv.TopR(4))
    with torch.no_grad():
        ev(eva_video(1)[0])
    rows = ev.eventful_blocks[0].attention.rotary
    assert rows is not None and rows.shape[0] == 17 and not torch.equal(rows[1], rows[2])


def test_macs_fall_with_the_budget() -> None:
    macs = last_frame_macs(make_eva("eva02-tiny"), eva_video(4, batch=1), [fv.TopR(r) for r in (17, 8, 4)])
    assert macs[0] > macs[1] > macs[2], macs


def test_unhandled_eva_options_are_refused_clearly() -> None:
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=SIZE, depth=1,
                              dynamic_img_size=True)
    with pytest.raises(UnsupportedModelError, match="dynamic_img_size is not handled; build the model at the"):
        fv.eventful(model, fv.TopR(1))


def test_half_precision_incremental_path_matches_dense() -> None:
    assert_half_precision_incremental_matches(make_eva("eva02-tiny"), eva_video(4))


def test_sync_free_frame_compiles_whole_with_no_graph_break() -> None:
    assert_sync_free_step_compiles_whole(make_eva("eva02-tiny"), eva_video(4))


def test_changed_rows_attention_recomputes_exactly_the_selected_rows() -> None:
    assert_changed_rows_path_matches_dense(make_eva("eva02-tiny"), eva_video(2))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_frame_that_changes_nothing_passes_no_tokens(variant: str) -> None:
    """A gate that lets no token through (M = 0), fused or split q/k/v: the same frame's output again."""
    ev = fv.eventful(make_eva(variant), fv.Threshold(0.1))
    frame = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        first = ev(frame)
        torch.testing.assert_close(ev(frame), first)
    assert all(counts == (0, 0, 0) for counts in ev.gate_counts())


def test_rope_attention_is_named_in_the_refusal() -> None:
    model = timm.create_model("vit_small_patch16_rope_224", pretrained=False, img_size=32, depth=1)
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0\.attn \(AttentionRope\)"):
        fv.eventful(model, fv.TopR(1))
