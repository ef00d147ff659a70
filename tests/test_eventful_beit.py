"""Eventful on timm's BEiT: separate q/v biases, relative position bias tables (per layer or shared), gamma."""

from __future__ import annotations

import pytest
import timm
import torch

import frugalvit as fv
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


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_full_budget_equals_the_timm_model(variant: str) -> None:
    model = make_beit(variant)
    ev = fv.eventful(model, fv.TopFraction(1.0))
    with torch.no_grad():
        for frame in patch_video(3, batch=2):
            torch.testing.assert_close(ev(frame), model(frame), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sync_free", [False, True], ids=["host-checks", "sync-free"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_incremental_path_with_zero_threshold_equals_dense(variant: str, sync_free: bool) -> None:
    model = make_beit(variant)
    ev = fv.eventful(model, fv.Threshold(0.0), incremental_max_fraction=1.0)
    ev.sync_free = sync_free
    paths = set()
    with torch.no_grad():
        for frame in patch_video(5, batch=2, share=0.2):
            assert relative_error(ev.forward_features(frame), model.forward_features(frame)) < 1e-4
            paths.update(ev.attention_paths())
    assert "incremental" in paths


def test_macs_fall_with_the_budget() -> None:
    model = make_beit("per-layer-bias")
    frames = patch_video(4, share=0.3)
    macs = []
    for r in (17, 8, 4):
        ev = fv.eventful(model, fv.TopR(r))
        with torch.no_grad():
            for frame in frames[:-1]:
                ev(frame)
            with fv.CostCounter() as cost:
                ev(frames[-1])
        macs.append(cost.macs)
    assert macs[0] > macs[1] > macs[2], macs

