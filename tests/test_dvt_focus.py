"""Glance-and-focus cascade: crops, located centres, each stage's input, real early exit and its costs."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F

from frugalvit.dvt import AttentionPoolHead, FocusCascade, TokenLocator, crop_around, tokens_at_resolution
from frugalvit.dvt.cascade import resize_images

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _backbone() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=3, num_classes=0, embed_dim=32, depth=2,
                             num_heads=2).eval()


def _cascade(resolutions: tuple[int, ...] = (42,)) -> FocusCascade:
    backbone = _backbone()
    torch.manual_seed(1)
    heads = [AttentionPoolHead(32, 5, hidden=16) for _ in range(2 + len(resolutions))]
    return FocusCascade(backbone, glance=28, crop=24, heads=heads, locator=TokenLocator(32, hidden=8),
                        input_size=48, resolutions=resolutions, mean=MEAN, std=STD).eval()


def test_crop_around_cuts_the_square_around_each_centre_and_stays_inside() -> None:
    images = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).view(2, 3, 10, 10)
    centers = torch.tensor([[5.0, 4.0], [0.0, 9.5]])  # the second lies in a corner: moved inside
    crops = crop_around(images, centers, side=4, size=4)
    torch.testing.assert_close(crops[0], images[0, :, 3:7, 2:6])
    torch.testing.assert_close(crops[1], images[1, :, 0:4, 6:10])
    resized = crop_around(images, centers, side=4, size=8)
    torch.testing.assert_close(resized[0], F.interpolate(images[:1, :, 3:7, 2:6], size=(8, 8), mode="bilinear",
                                                         antialias=True, align_corners=False)[0])
    with pytest.raises(ValueError, match="crop side must lie in"):
        crop_around(images, centers, side=11, size=4)
    with pytest.raises(ValueError, match="one \\(y, x\\) centre per cropped image"):
        crop_around(images, centers[:1], side=4, size=4)


def test_locator_points_at_the_best_patch_centre() -> None:
    locator = TokenLocator(4, hidden=2)
    patches = torch.tensor([0, 5, 11, 15])
    centers = TokenLocator.patch_centers(patches, (4, 4), image_size=40)
    assert centers.tolist() == [[5.0, 5.0], [15.0, 15.0], [25.0, 35.0], [35.0, 35.0]]
    tokens = torch.randn(3, 17, 4)
    expected = TokenLocator.patch_centers(locator(tokens).argmax(-1), (4, 4), 40)
    torch.testing.assert_close(locator.centers(tokens, (4, 4), 40), expected)


def test_each_stage_reads_its_own_view_and_early_exit_regroups_the_centres() -> None:
    cascade = _cascade()
    x = torch.rand(6, 3, 48, 48)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        stages = cascade.forward_all(x)
        glance = tokens_at_resolution(cascade.model, (resize_images(x, (28, 28)) - mean) / std)
        torch.testing.assert_close(stages[0], cascade.heads[0](glance))
        centers = cascade.locator.centers(glance, (4, 4), 48)
        focus = tokens_at_resolution(cascade.model, (crop_around(x, centers, 24, 28) - mean) / std)
        torch.testing.assert_close(stages[1], cascade.heads[1](focus))
        whole = tokens_at_resolution(cascade.model, (resize_images(x, (42, 42)) - mean) / std)
        torch.testing.assert_close(stages[2], cascade.heads[2](whole))
        # a mid threshold: some samples leave at each stage, the focus runs on a regrouped batch with its centres
        confidence = stages[0].softmax(-1).amax(-1)
        threshold = float(confidence.median())
        out = cascade(x, thresholds=[threshold, 0.0])
        leave = confidence >= threshold
        assert 0 < int(leave.sum()) < 6
        torch.testing.assert_close(out.logits[leave], stages[0][leave])
        torch.testing.assert_close(out.logits[~leave], stages[1][~leave], atol=1e-5, rtol=1e-5)
        assert out.exit_stage.tolist() == [0 if left else 1 for left in leave.tolist()]
        uint8 = (x * 255).round().to(torch.uint8)
        torch.testing.assert_close(cascade.forward_all(uint8)[1], cascade.forward_all(uint8.float() / 255)[1],
                                   atol=0.05, rtol=0.05)
    costs = cascade.stage_macs()
    assert costs[0] < costs[1] < costs[2]
    assert costs[1] - costs[0] == pytest.approx(costs[0], rel=0.02)  # the focus costs a glance


def test_focus_cascade_errors_name_the_fix() -> None:
    backbone = _backbone()
    heads = [nn.Identity()] * 2
    with pytest.raises(ValueError, match="heads for 3 stages"):
        FocusCascade(backbone, 28, 24, heads, TokenLocator(32), input_size=48, resolutions=(42,))
    with pytest.raises(ValueError, match="not divisible by the model's patch size"):
        FocusCascade(backbone, 30, 24, heads, TokenLocator(32), input_size=48)
    with pytest.raises(ValueError, match="crop and zooms must lie in"):
        FocusCascade(backbone, 28, 64, heads, TokenLocator(32), input_size=48)
    with pytest.raises(ValueError, match="strictly increasing"):
        FocusCascade(backbone, 28, 24, [nn.Identity()] * 4, TokenLocator(32), input_size=48, resolutions=(56, 42))


def test_without_a_locator_the_glance_head_attention_places_the_crop() -> None:
    """locator=None: the focus crop goes where the glance's AttentionPoolHead looks (no position labels needed)."""
    cascade = _cascade(())
    located = FocusCascade(cascade.model, 28, 24, list(cascade.heads), None, input_size=48, mean=MEAN,
                           std=STD).eval()
    x = torch.rand(4, 3, 48, 48)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        glance = tokens_at_resolution(cascade.model, (resize_images(x, (28, 28)) - mean) / std)
        scores = located.heads[0].patch_scores(glance)
        assert scores.shape == (4, 16)
        torch.testing.assert_close(scores.sum(-1), torch.ones(4))
        logits, same = located.heads[0].forward_with_patch_scores(glance)  # one pass gives both
        torch.testing.assert_close(same, scores)
        torch.testing.assert_close(logits, located.heads[0](glance))
        centers = TokenLocator.patch_centers(scores.argmax(-1), (4, 4), 48)
        focus = tokens_at_resolution(cascade.model, (crop_around(x, centers, 24, 28) - mean) / std)
        torch.testing.assert_close(located.forward_all(x)[1], located.heads[1](focus))
    with pytest.raises(ValueError, match="no locator and the glance head"):
        FocusCascade(cascade.model, 28, 24, [nn.Linear(32, 5), nn.Linear(32, 5)], None, input_size=48)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_focus_and_resolution_cascades_run_in_half_precision_on_the_cpu(dtype: torch.dtype) -> None:
    """Anti-aliased resizing has no float16/bfloat16 CPU kernel: it runs in float32 there, the cascade in `dtype`."""
    from frugalvit.dvt import ResolutionCascade

    focus = _cascade().to(dtype)
    resolution = ResolutionCascade(focus.model, [28, 42], heads=list(focus.heads)[:2], input_size=48).to(dtype)
    x = torch.rand(4, 3, 48, 48)
    with torch.no_grad():
        for cascade, thresholds in ((focus, [0.5, 0.0]), (resolution, [0.5])):
            for images in (x, (x * 255).to(torch.uint8)):
                out = cascade(cascade.prepare_input(images), thresholds=thresholds)
                assert out.logits.dtype == dtype and bool(torch.isfinite(out.logits).all())
    crops = crop_around(x.to(dtype), torch.full((4, 2), 20.0), 24, 28)
    assert crops.dtype == dtype and crops.shape == (4, 3, 28, 28)


def test_a_zoom_looks_where_the_focus_head_points_and_regroups_under_early_exit() -> None:
    """zooms=(12,): a third look at a 12 px square centred where the focus head's attention points (mapped from
    the focus crop back to input pixels); early exit after the glance and after the focus regroups those centres."""
    from frugalvit.dvt.focus import crop_origin

    backbone = _backbone()
    torch.manual_seed(2)
    heads = [AttentionPoolHead(32, 5, hidden=16) for _ in range(3)]
    cascade = FocusCascade(backbone, 28, 24, heads, None, input_size=48, mean=MEAN, std=STD, zooms=(12,)).eval()
    x = torch.rand(6, 3, 48, 48)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        stages = cascade.forward_all(x)
        glance = tokens_at_resolution(backbone, (resize_images(x, (28, 28)) - mean) / std)
        first = TokenLocator.patch_centers(heads[0].patch_scores(glance).argmax(-1), (4, 4), 48)
        focus = tokens_at_resolution(backbone, (crop_around(x, first, 24, 28) - mean) / std)
        second = crop_origin(first, 24, 48) + TokenLocator.patch_centers(heads[1].patch_scores(focus).argmax(-1),
                                                                         (4, 4), 24)
        zoom = tokens_at_resolution(backbone, (crop_around(x, second, 12, 28) - mean) / std)
        torch.testing.assert_close(stages[2], heads[2](zoom))
        confidence = [stage.softmax(-1).amax(-1) for stage in stages[:2]]
        limits = [float(confidence[0].quantile(0.7)), float(confidence[1].quantile(0.5))]
        out = cascade(x, thresholds=limits)
        expected = torch.where(confidence[0] >= limits[0], 0, torch.where(confidence[1] >= limits[1], 1, 2))
        assert out.exit_stage.tolist() == expected.tolist() and len(set(expected.tolist())) > 1
        for stage in range(3):
            chosen = expected == stage
            torch.testing.assert_close(out.logits[chosen], stages[stage][chosen], atol=1e-5, rtol=1e-5)
    costs = cascade.stage_macs()
    # a zoom costs about a focus (the focus also scores where its head points, which only a zoom needs)
    assert costs[2] - costs[1] == pytest.approx(costs[1] - costs[0], rel=0.05)
    with pytest.raises(ValueError, match="need patch_scores"):
        FocusCascade(backbone, 28, 24, [heads[0], nn.Linear(32, 5), heads[2]], None, input_size=48, zooms=(12,))


def test_a_sized_locator_sizes_the_focus_crop_and_early_exit_regroups_the_boxes() -> None:
    """crop_sides + SizedTokenLocator: the focus crop is margin x the located size around the located patch,
    rounded up to a side choice (never above crop); the (centres, sides) carry follows the remaining samples."""
    from frugalvit.dvt import SizedTokenLocator, crop_boxes

    backbone = _backbone()
    torch.manual_seed(1)
    heads = [AttentionPoolHead(32, 5, hidden=16) for _ in range(3)]
    locator = SizedTokenLocator(32, hidden=8)
    cascade = FocusCascade(backbone, 28, 40, heads, locator, input_size=48, resolutions=(42,), mean=MEAN, std=STD,
                           crop_sides=(12, 20, 44), margin=1.5).eval()
    assert cascade.crop_sides == (12, 20, 40)  # 44 > crop: dropped; crop itself is the largest
    x = torch.rand(6, 3, 48, 48)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        glance = tokens_at_resolution(backbone, (resize_images(x, (28, 28)) - mean) / std)
        patch = locator(glance).argmax(-1)
        centers, sides = locator.boxes(glance, (4, 4), 48)
        torch.testing.assert_close(centers, TokenLocator.patch_centers(patch, (4, 4), 48))
        torch.testing.assert_close(sides, locator.log_sides(glance, patch).exp() * 48)
        stages = cascade.forward_all(x)
        focus = tokens_at_resolution(backbone, (crop_boxes(x, centers, sides * 1.5, 28, (12, 20, 40)) - mean) / std)
        torch.testing.assert_close(stages[1], heads[1](focus))
        confidence = stages[0].softmax(-1).amax(-1)
        threshold = float(confidence.median())
        out = cascade(x, thresholds=[threshold, 0.0])
        leave = confidence >= threshold
        assert 0 < int(leave.sum()) < 6
        torch.testing.assert_close(out.logits[~leave], stages[1][~leave], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="give a locator that sizes it"):
        FocusCascade(backbone, 28, 40, heads, TokenLocator(32), input_size=48, resolutions=(42,), crop_sides=(12,))
    with pytest.raises(ValueError, match="cannot be combined with zooms"):
        FocusCascade(backbone, 28, 40, heads, locator, input_size=48, zooms=(20,), crop_sides=(12,))
