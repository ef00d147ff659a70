"""Eventful on timm's EVA-02: rotary positions on q/k (patch tokens only), SwiGLU, sub-LN, split q/k/v."""

from __future__ import annotations

import pytest
import timm
import torch

import frugalvit as fv
from frugalvit.eventful.model import UnsupportedModelError

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
    generator = torch.Generator().manual_seed(0)
    frame = torch.randn(batch, 3, SIZE, SIZE, generator=generator)
    out = [frame]
    for _ in range(frames - 1):
        patches = (torch.rand(batch, 1, SIZE // 14, SIZE // 14, generator=generator) < share).float()
        mask = torch.nn.functional.interpolate(patches, scale_factor=14, mode="nearest")
        frame = frame + mask * torch.randn(batch, 3, SIZE, SIZE, generator=generator)
        out.append(frame)
    return torch.stack(out)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_full_budget_equals_the_timm_model(variant: str) -> None:
    model = make_eva(variant)
    ev = fv.eventful(model, fv.TopFraction(1.0))
    with torch.no_grad():
        for frame in eva_video(3):
            torch.testing.assert_close(ev(frame), model(frame), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sync_free", [False, True], ids=["host-checks", "sync-free"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_incremental_path_with_zero_threshold_equals_dense(variant: str, sync_free: bool) -> None:
    """The changed tokens' queries and keys are rotated by their own positions (prefix tokens not at all)."""
    model = make_eva(variant)
    ev = fv.eventful(model, fv.Threshold(0.0), incremental_max_fraction=1.0)
    ev.sync_free = sync_free
    paths = set()
    with torch.no_grad():
        for frame in eva_video():
            assert relative_error(ev.forward_features(frame), model.forward_features(frame)) < 1e-4
            paths.update(ev.attention_paths())
    assert "incremental" in paths and ev.eventful_blocks[0].attention.rotary is not None


def test_macs_fall_with_the_budget() -> None:
    model = make_eva("eva02-tiny")
    frames = eva_video(4, batch=1)
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


def test_unhandled_eva_options_are_refused_clearly() -> None:
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=SIZE, depth=1,
                              dynamic_img_size=True)
    with pytest.raises(UnsupportedModelError, match="dynamic_img_size is not handled; build the model at the"):
        fv.eventful(model, fv.TopR(1))
