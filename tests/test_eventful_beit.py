"""Eventful on timm's BEiT: separate q/v biases, relative position bias tables (per layer or shared), gamma."""

from __future__ import annotations

import pytest
import timm
import torch

import frugalvit as fv
from eventful_anchors import (assert_changed_rows_path_matches_dense, assert_full_budget_equals, assert_half_precision_incremental_matches,
                              assert_sync_free_step_compiles_whole,
                              incremental_paths_equal_dense, last_frame_macs)
from test_eventful import patch_video

VARIANTS = {
    "per-layer-bias": {},
    "shared-bias": dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False),
    "layer-scale": dict(init_values=0.5),
}


def make_beit(variant: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=64, depth=3, embed_dim=64,
                              num_heads=4, **VARIANTS[variant]).eval()
    with torch.no_grad():  # make the position bias and the q/v biases matter
        for module in model.modules():
            if getattr(module, "relative_position_bias_table", None) is not None:
                module.relative_position_bias_table.normal_(0.0, 1.0)
            if getattr(module, "q_bias", None) is not None:
                module.q_bias.normal_(0.0, 0.5)
                module.v_bias.normal_(0.0, 0.5)
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_full_budget_equals_the_timm_model(variant: str) -> None:
    assert_full_budget_equals(make_beit(variant), patch_video(3, batch=2))


@pytest.mark.parametrize("sync_free", [False, True], ids=["host-checks", "sync-free"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_incremental_path_with_zero_threshold_equals_dense(variant: str, sync_free: bool) -> None:
    assert "incremental" in incremental_paths_equal_dense(make_beit(variant), patch_video(5, batch=2, share=0.2),
                                                          sync_free)


def test_macs_fall_with_the_budget() -> None:
    macs = last_frame_macs(make_beit("per-layer-bias"), patch_video(4, share=0.3), [fv.TopR(r) for r in (17, 8, 4)])
    assert macs[0] > macs[1] > macs[2], macs


def test_half_precision_incremental_path_matches_dense() -> None:
    assert_half_precision_incremental_matches(make_beit("per-layer-bias"), patch_video(4, batch=2, share=0.2))


def test_sync_free_frame_compiles_whole_with_no_graph_break() -> None:
    assert_sync_free_step_compiles_whole(make_beit("per-layer-bias"), patch_video(4, batch=2, share=0.2))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_changed_rows_attention_recomputes_exactly_the_selected_rows(variant: str) -> None:
    assert_changed_rows_path_matches_dense(make_beit(variant), patch_video(1, batch=2))


@pytest.mark.parametrize("sync_free", [False, True], ids=["host-checks", "sync-free"])
def test_a_frame_that_changes_nothing_passes_no_tokens_and_costs_little(sync_free: bool) -> None:
    """A gate that lets no token through (M = 0): the frame is the last one's, not a reshape error."""
    model = make_beit("per-layer-bias")
    ev = fv.eventful(model, fv.TopR(0) if sync_free else fv.Threshold(0.1))  # sync-free needs a fixed size
    ev.sync_free = sync_free
    frame = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first = ev(frame)
        with fv.CostCounter() as still:
            again = ev(frame)
        with fv.CostCounter() as dense:
            model(frame)
    torch.testing.assert_close(again, first)
    assert still.macs < 0.3 * dense.macs  # the patch embedding and the head still run (a quarter here)
