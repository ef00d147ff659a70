"""EventfulViT refuses what it cannot do well: non-finite frames, training, backward; and policy specs are unambiguous."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import frugalvit as fv
from frugalvit.eventful import parse_policy


@pytest.fixture()
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10).eval()


def frames(count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    first = torch.randn(1, 3, 32, 32, generator=generator)
    return [first + 0.05 * index * torch.randn(1, 3, 32, 32, generator=generator) for index in range(count)]


@pytest.mark.parametrize("where", ["all", "one_pixel", "inf"])
def test_nonfinite_frame_raises_by_default(model: torch.nn.Module, where: str) -> None:
    ev = fv.eventful(model, fv.TopR(4))
    f0, f1, f2 = frames()
    ev(f0)
    ev(f1)
    bad = f2.clone()
    if where == "all":
        bad.fill_(float("nan"))
    else:
        bad[0, 1, 5, 7] = float("nan") if where == "one_pixel" else float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        ev(bad)
    assert torch.isfinite(ev(f2)).all()  # the sequence goes on from the last good frame


def test_nonfinite_refresh_gives_dense_output_then_recomputes(model: torch.nn.Module) -> None:
    ev = fv.eventful(model, fv.TopR(4), nonfinite="refresh")
    f0, f1, f2 = frames()
    ev(f0)
    ev(f1)
    bad = f2.clone()
    bad[0, 0, 0, 0] = float("nan")
    with torch.no_grad():
        out, dense = ev(bad), model(bad)
    assert torch.isnan(out).any() and torch.isnan(dense).any() and ev.last_frame_full
    with torch.no_grad():
        after = ev(f2)
        expected = model(f2)
    assert ev.last_frame_full and torch.allclose(after, expected, atol=1e-4)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        ev.nonfinite = "ignore"


def test_train_does_not_switch_the_shared_model(model: torch.nn.Module) -> None:
    ev = fv.eventful(model, fv.TopR(4))
    with pytest.raises(RuntimeError, match="does not train"):
        ev.train()
    assert not model.training
    assert ev.eval() is ev and not model.training


def test_backward_says_eventful_inference_does_not_train(model: torch.nn.Module) -> None:
    ev = fv.eventful(model, fv.TopR(4))
    f0, f1, _ = frames()
    ev(f0)
    for output in (ev(f1), ev.forward_features(f1)):
        with pytest.raises(RuntimeError, match="eventful inference does not train"):
            output.sum().backward()
    with torch.no_grad():
        assert not ev(f1).requires_grad  # under no_grad nothing changes


@pytest.mark.parametrize("spec", ["topr:1.0", "topr:64.0", "topr:2.5", "topr:1e2"])
def test_topr_rejects_a_decimal_token_count(spec: str) -> None:
    with pytest.raises(ValueError, match="fraction:F"):
        parse_policy(spec)


def test_topr_whole_numbers_and_explicit_fractions() -> None:
    assert parse_policy("topr:1") == fv.TopR(1)
    assert parse_policy("fraction:1") == fv.TopFraction(1.0)
    assert parse_policy("fraction:0.25") == fv.TopFraction(0.25)


def test_a_dtype_change_within_a_sequence_asks_for_reset(model: torch.nn.Module) -> None:
    """The state (references, caches, the held output) is in the sequence's dtype: a frame in another dtype is
    an error naming reset(), not a stale float32 answer or a failure deep in a gate."""
    ev = fv.eventful(model, fv.TopR(4), cut_share=0.9, hold_share=0.01)
    f0, f1, _ = frames()
    with torch.no_grad():
        ev(f0)
        ev(f1)
        ev.to(torch.bfloat16)
        with pytest.raises(ValueError, match=r"float32.*call reset\(\)"):
            ev(f1.bfloat16())
        ev.reset()
        out = ev(f1.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_fraction_counts_are_exact_where_the_product_is_whole() -> None:
    """0.14 x 50 is 7.000000000000001 in floats: TopFraction(0.14) of 50 tokens is 7, not 8."""
    norms = torch.rand(1, 50)
    assert fv.TopFraction(0.14).count(norms) == 7
    assert fv.TopFraction(7 / 50).count(norms) == 7
    assert fv.TopFraction(0.141).count(norms) == 8
    assert all(fv.TopFraction(k / 197).count(torch.rand(1, 197)) == k for k in range(198))


def test_bools_are_not_numbers_and_numpy_numbers_are(model: torch.nn.Module) -> None:
    for make in (lambda: fv.TopR(True), lambda: fv.TopFraction(True), lambda: fv.Threshold(True)):
        with pytest.raises(ValueError):
            make()
    ev = fv.eventful(model, fv.TopR(np.int64(4)))
    assert ev.policy == fv.TopR(4) and type(ev.policy.r) is int
    for name, value in (("cut_share", True), ("hold_share", False), ("refresh_every", True)):
        with pytest.raises(ValueError, match=name):
            setattr(ev, name, value)
    ev.cut_share, ev.max_held_frames = np.float32(0.5), np.int64(3)
    assert ev.cut_share == 0.5 and ev.max_held_frames == 3


def test_a_sequence_begun_under_inference_mode_says_so(model: torch.nn.Module) -> None:
    ev = fv.eventful(model, fv.TopR(4))
    f0, f1, f2 = frames()
    with torch.inference_mode():
        ev(f0)
        ev(f1)  # inside inference_mode the sequence goes on
    with torch.no_grad(), pytest.raises(ValueError, match="started under torch.inference_mode"):
        ev(f2)
    ev.reset()
    with torch.no_grad():
        assert torch.isfinite(ev(f2)).all()
