"""Eventful on timm's SAM / ViTDet-style backbone: windowed blocks, global blocks, decomposed relative positions."""

from __future__ import annotations

import pytest
import timm
import torch

import frugalvit as fv
from frugalvit.eventful.model import EventfulViT
from eventful_anchors import (assert_changed_rows_path_matches_dense, assert_full_budget_equals, assert_half_precision_incremental_matches,
                              assert_sync_free_step_compiles_whole,
                              incremental_paths_equal_dense, last_frame_macs, relative_error)
from test_eventful import patch_video
from test_eventful_capture import FxGraphFrame

SIZE = 128  # an 8 x 8 token grid; windows of 3 need padding to 9 x 9, as SAM's 64 x 64 grid pads to 70 x 70
SAM_VARIANTS = {
    "rel-pos": dict(window_size=3, global_attn_indexes=[1, 3]),
    "no-rel-pos": dict(window_size=2, global_attn_indexes=[1], use_rel_pos=False),
    "224-style": dict(window_size=3, global_attn_indexes=[1, 3], use_abs_pos=False, neck_chans=None),
}


def make_sam(variant: str = "rel-pos", **extra: object) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = dict(img_size=SIZE, embed_dim=64, depth=4, num_heads=4, neck_chans=32) | SAM_VARIANTS[variant] | extra
    model = timm.create_model("samvit_base_patch16", pretrained=False, **kwargs).eval()
    with torch.no_grad():  # timm starts the relative-position tables at zero; make them matter
        for module in model.modules():
            if getattr(module, "use_rel_pos", False):
                module.rel_pos_h.normal_(0.0, 0.5)
                module.rel_pos_w.normal_(0.0, 0.5)
    return model


def sam_video(frames: int = 5, batch: int = 2, share: float = 0.2, seed: int = 0) -> torch.Tensor:
    """`patch_video` at this file's frame size (an 8 x 8 token grid)."""
    return patch_video(frames, batch, share, seed, size=SIZE)


@pytest.mark.parametrize("variant", sorted(SAM_VARIANTS))
def test_full_budget_equals_the_timm_model(variant: str) -> None:
    assert_full_budget_equals(make_sam(variant), sam_video(3), atol=1e-6)


@pytest.mark.parametrize("sync_free", [False, True], ids=["touched-windows", "all-windows"])
@pytest.mark.parametrize("variant", sorted(SAM_VARIANTS))
def test_incremental_path_with_zero_threshold_equals_dense(variant: str, sync_free: bool) -> None:
    """`Threshold(0)` with `incremental_max_fraction=1.0`: the windowed and incremental global paths run."""
    assert {"windows", "incremental"} <= incremental_paths_equal_dense(make_sam(variant), sam_video(5), sync_free)


def test_only_windows_with_changed_tokens_are_recomputed() -> None:
    model = make_sam()
    ev = fv.eventful(model, fv.Threshold(0.0), incremental_max_fraction=1.0)
    frame = torch.randn(1, 3, SIZE, SIZE)
    moved = frame.clone()
    moved[:, :, :16, :16] += 1.0  # token (0, 0): one window of the first block
    with torch.no_grad():
        ev(frame)
        ev(moved)
    first = ev.eventful_blocks[0].attention
    assert first.last_path == "windows" and first.last_windows == 1 and first.geometry.num_windows == 9


def test_macs_fall_with_the_budget() -> None:
    model = make_sam()
    frames = sam_video(4, batch=1, share=0.3)
    macs = last_frame_macs(model, frames, [fv.TopFraction(f) for f in (1.0, 0.5, 0.25, 0.125)])
    with fv.CostCounter() as dense, torch.no_grad():
        model(frames[-1])
    assert macs[0] <= dense.macs * 1.01
    assert all(later < earlier for earlier, later in zip(macs, macs[1:])), macs


def test_captured_frames_equal_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Graph-capture semantics (fixed ops on fixed tensors) hold for windowed and relative-position state."""
    monkeypatch.setattr(EventfulViT, "recorder", FxGraphFrame)
    model = make_sam()
    eager = fv.eventful(model, fv.TopFraction(0.25), refresh_every=4)
    captured = fv.eventful(model, fv.TopFraction(0.25), refresh_every=4, capture=True)
    eager.sync_free = True
    with torch.no_grad():
        for frame in sam_video(9):
            torch.testing.assert_close(captured.forward_features(frame), eager.forward_features(frame), rtol=1e-5,
                                       atol=1e-5)


def test_other_frame_size_and_reset() -> None:
    """Any size the model accepts (the grid, windows and tables follow it); a new size needs reset()."""
    model = make_sam()
    ev = fv.eventful(model, fv.TopFraction(1.0))
    with torch.no_grad():
        ev.forward_features(torch.randn(1, 3, SIZE, SIZE))
        with pytest.raises(ValueError, match="reset"):
            ev.forward_features(torch.randn(1, 3, SIZE - 32, SIZE - 32))
        ev.reset()
        small = torch.randn(1, 3, SIZE - 32, SIZE - 32)
        torch.testing.assert_close(ev.forward_features(small), model.forward_features(small), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["samvit_large_patch16", "samvit_huge_patch16"])
def test_larger_sam_variants_convert(name: str) -> None:
    """SAM-L / SAM-H (their own widths, heads and global-block layout), shortened to two blocks for the test."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=64, depth=2, global_attn_indexes=[1],
                              window_size=3).eval()
    ev = fv.eventful(model, fv.Threshold(0.0), incremental_max_fraction=1.0)
    frames = sam_video(3, batch=1)[:, :, :, :64, :64]
    with torch.no_grad():
        for frame in frames:
            assert relative_error(ev.forward_features(frame), model.forward_features(frame)) < 1e-4


def test_video_command_runs_sam_end_to_end(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """`frugalvit video --model samvit_base_patch16`: the report carries the feature map's fidelity."""
    import json

    from frugalvit.cli.main import main

    out = tmp_path / "sam"
    assert main(["video", "bundled:carphone_pristine", "--model", "samvit_base_patch16", "--size", "128",
                 "--random-init", "--policy", "fraction:0.25", "--max-frames", "3", "--repeats", "1",
                 "--no-progress", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    later = report["frames"][-1]
    assert later["eventful_gmacs"] < 0.6 * later["dense_gmacs"] and later["updated_share"] <= 0.25
    assert report["summary"]["feature_relative_l2_mean"] < 0.5 and report["frames"][0]["feature_cosine"] > 0.9999
    assert "feature map" in capsys.readouterr().out


def test_half_precision_incremental_path_matches_dense() -> None:
    assert_half_precision_incremental_matches(make_sam(), sam_video(4))


def test_sync_free_frame_compiles_whole_with_no_graph_break() -> None:
    assert_sync_free_step_compiles_whole(make_sam(), sam_video(4))


def test_held_frames_on_a_sam_backbone() -> None:
    """hold_share on a SAM backbone (conv neck, feature-map output): a held frame returns the last feature map;
    the full frame that ends a run of held frames equals the dense model."""
    model = make_sam()
    height, width = model.patch_embed.img_size
    frame = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    ev = fv.eventful(model, fv.TopFraction(0.125), cut_share=0.9, hold_share=0.2, max_held_frames=1)
    moved = frame.clone()
    moved[..., : height // 2, :] = torch.randn(1, 3, height // 2, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ev.forward_features(frame)
        last = ev.forward_features(frame + 1e-3)
        held = ev.forward_features(moved)
        assert ev.last_frame_held and torch.equal(held, last)
        full = ev.forward_features(moved)
        assert ev.last_frame_full
        torch.testing.assert_close(full, model.forward_features(moved), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", sorted(SAM_VARIANTS))
def test_changed_rows_attention_recomputes_exactly_the_selected_rows(variant: str) -> None:
    assert_changed_rows_path_matches_dense(make_sam(variant), sam_video(1))
