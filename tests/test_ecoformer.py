"""EcoFormer: hashing, hashed linear attention, conversion, hash fitting, state dict, cost counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from timm.layers import Attention

from frugalvit.cost import CostCounter
from frugalvit.ecoformer import (EcoFormerAttention, convertible_layers, ecoformer, ecoformer_layers,
                                 fit_hash_functions, fit_hashes, hash_codes, hashed_attention_reference,
                                 hashed_linear_attention, paper_bias, remove_ecoformer, sign_ste,
                                 similarity_labels)
from frugalvit.ecoformer.cost import hashed_attention_counted, softmax_attention_counted
from frugalvit.ecoformer.fitting import init_hash_state
from frugalvit.ecoformer.hashing import hamming_distance, l2_normalize, rbf_features
from frugalvit.models import small_vit

torch.set_num_threads(1)


def tiny_vit(**kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return small_vit(image_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, **kwargs).eval()


def images(count: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(count, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def fitted(model: nn.Module, **kwargs: object) -> nn.Module:
    return fit_hashes(ecoformer(model, bits=8, anchors=6, **kwargs), images(), iterations=5)


def random_codes(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed)).float() * 2 - 1


# --- hashing -------------------------------------------------------------------------------------

def test_codes_are_plus_minus_one_and_deterministic() -> None:
    model = fitted(tiny_vit())
    again = fitted(tiny_vit())
    x = l2_normalize(torch.randn(3, 2, 17, 16))
    for layer, twin in zip(ecoformer_layers(model).values(), ecoformer_layers(again).values()):
        tokens = layer.tied_tokens(torch.randn(3, 17, 32))
        codes = layer.codes(torch.randn(3, 17, 32))
        assert set(codes.unique().tolist()) <= {-1.0, 1.0}
        assert torch.equal(layer.hash_weights, twin.hash_weights) and torch.equal(layer.hash_anchors, twin.hash_anchors)
        assert tokens.shape == (3, 2, 17, 16)
    state = init_hash_state(x, 8, 5, torch.Generator().manual_seed(0))
    first = hash_codes(x, state.anchors, state.bandwidth, state.mean, state.weights)
    assert torch.equal(first, hash_codes(x, state.anchors, state.bandwidth, state.mean, state.weights))
    assert sign_ste(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]


def test_rbf_features_match_explicit_distances() -> None:
    x, anchors = torch.randn(2, 3, 7, 5), torch.randn(3, 4, 5)
    bandwidth = torch.tensor([0.5, 1.0, 2.0])
    explicit = ((x.unsqueeze(-2) - anchors.unsqueeze(-3)) ** 2).sum(-1)
    expected = torch.exp(-explicit / (2 * bandwidth)[:, None, None])
    torch.testing.assert_close(rbf_features(x, anchors, bandwidth), expected, rtol=1e-5, atol=1e-6)


def test_hamming_affinity_inner_product_identity() -> None:
    bits = 16
    a, b = random_codes(5, bits, seed=1), random_codes(7, bits, seed=2)
    assert torch.equal(a @ b.T, bits - 2 * hamming_distance(a, b).float())
    assert paper_bias(16) == 32 and paper_bias(15) == 16 and paper_bias(1) == 2
    assert ecoformer(tiny_vit(), bits=16).blocks[0].attn.bias == 17


def test_straight_through_gradient_is_hard_tanh() -> None:
    u = torch.tensor([-2.0, -0.5, 0.0, 0.7, 1.5], requires_grad=True)
    sign_ste(u).sum().backward()
    assert u.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_gradient_flows_through_hash_to_tied_projection() -> None:
    model = fitted(tiny_vit())
    model.train()
    model(images(4)).sum().backward()
    for layer in ecoformer_layers(model).values():
        assert layer.qk.weight.grad is not None and layer.qk.weight.grad.abs().sum() > 0
        assert layer.qkv.weight.grad[:64].abs().sum() == 0  # the original q, k rows are not used when hashing


# --- hashed linear attention ---------------------------------------------------------------------

@pytest.mark.parametrize("normaliser", ["consistent", "authors"])
def test_linear_path_equals_explicit_formula(normaliser: str) -> None:
    q, k = random_codes(2, 3, 11, 8, seed=3), random_codes(2, 3, 11, 8, seed=4)
    v = torch.randn(2, 3, 11, 5, dtype=torch.float64)
    bias = 9.0
    fast = hashed_linear_attention(q.double(), k.double(), v, bias, normaliser)
    slow = hashed_attention_reference(q.double(), k.double(), v, bias, normaliser)
    torch.testing.assert_close(fast, slow)


def test_consistent_normaliser_is_a_convex_combination() -> None:
    codes, v = random_codes(1, 9, 4, seed=5), torch.randn(1, 9, 3)
    out = hashed_linear_attention(codes, codes, v, 5.0)
    assert (out <= v.max(-2).values + 1e-5).all() and (out >= v.min(-2).values - 1e-5).all()
    constant = torch.ones(1, 9, 3)
    torch.testing.assert_close(hashed_linear_attention(codes, codes, constant, 5.0), constant)
    authors = hashed_linear_attention(codes, codes, constant, 5.0, "authors")
    assert not torch.allclose(authors, constant)  # the released formula does not preserve constants


# --- conversion ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"qkv_bias": False}, {"qk_norm": True}, {"init_values": 1e-2},
                                    {"class_token": False, "global_pool": "avg"}, {"reg_tokens": 2}])
def test_hashing_off_equals_original(kwargs: dict) -> None:
    model = tiny_vit(**kwargs)
    converted = fitted(model)
    x = images(3)
    reference = model(x)
    assert not torch.allclose(converted(x), reference)
    for layer in ecoformer_layers(converted).values():
        layer.hashing = False
    assert torch.equal(converted(x), reference)
    for layer in ecoformer_layers(converted).values():
        layer.fused_attn = not layer.fused_attn
    torch.testing.assert_close(converted(x), reference, rtol=1e-5, atol=1e-5)


def test_conversion_copies_and_leaves_other_layers_identical() -> None:
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = ecoformer(model, bits=8, anchors=6, layers=[1])
    assert all(type(m) is not EcoFormerAttention for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(converted.blocks[0].attn) is Attention and isinstance(converted.blocks[1].attn, EcoFormerAttention)
    fit_hashes(converted, images(), iterations=2)
    x = images(2)
    block0 = converted.blocks[0]
    torch.testing.assert_close(block0(model.patch_embed(x)), model.blocks[0](model.patch_embed(x)), rtol=0, atol=0)
    for key, value in model.state_dict().items():
        if not key.startswith("blocks.1.attn"):
            assert torch.equal(converted.state_dict()[key], value)
    assert list(ecoformer_layers(ecoformer(model, layers=["blocks.0.attn"])) ) == ["blocks.0.attn"]


def test_tied_projection_initialised_from_query_and_key() -> None:
    model = tiny_vit()
    w = model.blocks[0].attn.qkv.weight
    mean = ecoformer(model, bits=4, anchors=4).blocks[0].attn.qk.weight
    query = ecoformer(model, bits=4, anchors=4, init="query").blocks[0].attn.qk.weight
    torch.testing.assert_close(mean, 0.5 * (w[:32] + w[32:64]))
    assert torch.equal(query, w[:32])


def test_remove_ecoformer_restores_timm_attention() -> None:
    model = tiny_vit()
    restored = remove_ecoformer(fitted(model))
    assert all(type(m) is not EcoFormerAttention for m in restored.modules())
    assert convertible_layers(restored) == convertible_layers(model)
    assert torch.equal(restored(images(2)), model(images(2)))


def test_bad_arguments_raise_clear_errors() -> None:
    model = tiny_vit()
    with pytest.raises(ValueError, match="bits"):
        ecoformer(model, bits=0)
    with pytest.raises(ValueError, match="bits"):
        ecoformer(model, bits=65)
    with pytest.raises(ValueError, match="anchors"):
        ecoformer(model, anchors=1)
    with pytest.raises(ValueError, match="normaliser"):
        ecoformer(model, normaliser="other")  # type: ignore[arg-type]
    for bias in (8, float("inf"), float("nan")):  # every similarity positive, and finite
        with pytest.raises(ValueError, match="bias must be a finite number above bits"):
            ecoformer(model, bits=16, bias=bias)
    with pytest.raises(ValueError, match="out of range"):
        ecoformer(model, layers=[5])
    for one in (0, "blocks.0.attn"):  # one layer is a list of one
        with pytest.raises(ValueError, match="a list of attention layer indices or names"):
            ecoformer(model, layers=one)
    with pytest.raises(ValueError, match="no timm Attention"):
        ecoformer(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="already converted"):
        ecoformer(ecoformer(model))
    with pytest.raises(ValueError, match="top_l"):
        similarity_labels(torch.randn(4, 4), 3)
    with pytest.raises(ValueError, match="anchors need"):
        fit_hashes(ecoformer(model, anchors=100), images(1))
    with pytest.raises(ValueError, match="convert it first"):
        fit_hashes(model, images(1))


def test_unfitted_model_errors_clearly() -> None:
    converted = ecoformer(tiny_vit(), bits=8, anchors=6)
    with pytest.raises(RuntimeError, match="not fitted"):
        converted(images(1))


# --- fitting and state dict ----------------------------------------------------------------------

def test_similarity_labels() -> None:
    scores = torch.tensor([[5.0, 1.0, 3.0, 0.0], [0.0, 2.0, 1.0, 9.0]])
    assert similarity_labels(scores, 1).tolist() == [[1, 0, 0, -1], [-1, 0, 0, 1]]


def test_fitting_beats_random_hashes_on_structured_similarity() -> None:
    torch.manual_seed(0)
    centres = l2_normalize(torch.randn(4, 8))
    assignment = torch.randint(0, 4, (16, 1, 24))
    tokens = l2_normalize(centres[assignment] + 0.1 * torch.randn(16, 1, 24, 8))
    labels = similarity_labels(tokens @ tokens.transpose(-1, -2), 3)

    def objective(state: object, labelled_only: bool) -> float:
        codes = hash_codes(tokens, state.anchors, state.bandwidth, state.mean, state.weights)
        error = (8 * labels - codes @ codes.transpose(-1, -2)) ** 2
        return (error * (labels != 0) if labelled_only else error).sum().item()

    random_state = init_hash_state(tokens, 8, 10, torch.Generator().manual_seed(0))
    for labelled_only in (False, True):
        learned = fit_hash_functions(tokens, labels, 8, 10, iterations=30, generator=torch.Generator().manual_seed(0),
                                     labelled_only=labelled_only)
        assert objective(learned, labelled_only) < 0.9 * objective(random_state, labelled_only)
        assert torch.equal(learned.anchors, random_state.anchors)


def test_fitted_state_round_trips_through_state_dict(tmp_path) -> None:
    model = fitted(tiny_vit())
    path = tmp_path / "eco.pt"
    torch.save(model.state_dict(), path)
    fresh = ecoformer(tiny_vit(), bits=8, anchors=6)
    fresh.load_state_dict(torch.load(path))
    assert all(layer.fitted for layer in ecoformer_layers(fresh).values())
    x = images(2)
    assert torch.equal(fresh(x), model(x))


def test_loading_state_dict_without_hashes_errors() -> None:
    plain = tiny_vit().state_dict()
    converted = ecoformer(tiny_vit(), bits=8, anchors=6)
    with pytest.raises(RuntimeError, match="no EcoFormer hash state"):
        converted.load_state_dict(plain)
    with pytest.raises(RuntimeError, match="no EcoFormer hash state"):
        converted.load_state_dict(plain, strict=False)
    unfitted = ecoformer(tiny_vit(), bits=8, anchors=6)
    converted.load_state_dict(unfitted.state_dict())  # a converted but unfitted state loads, and cannot run
    with pytest.raises(RuntimeError, match="not fitted"):
        converted(images(1))


def test_refit_with_warm_start_keeps_anchors() -> None:
    model = fitted(tiny_vit())
    anchors = model.blocks[0].attn.hash_anchors.clone()
    fit_hashes(model, images(), supervision="tied", warm_start=True, iterations=3)
    assert torch.equal(model.blocks[0].attn.hash_anchors, anchors)


# --- cost accounting -----------------------------------------------------------------------------

@pytest.mark.parametrize("normaliser", ["consistent", "authors"])
def test_counts_match_analytic_formulas(normaliser: str) -> None:
    batch, heads, tokens, width, bits, anchors = 2, 3, 13, 8, 6, 5
    codes = random_codes(batch, heads, tokens, bits)
    v = torch.randn(batch, heads, tokens, width)
    with CostCounter() as cost:
        hashed_linear_attention(codes, codes, v, 7.0, normaliser)
    expected = hashed_attention_counted(tokens, heads, width, bits, anchors, batch, normaliser)
    assert cost.mults == 0 and cost.adds == expected.adds_only

    model = fitted(tiny_vit(), normaliser=normaliser)
    layer, x = model.blocks[0].attn, torch.randn(batch, 17, 32)
    with CostCounter() as cost:
        layer(x)
    projections = 3 * batch * 17 * 32 * 32  # tied qk, v, output projection
    counted = hashed_attention_counted(17, 2, 16, 8, 6, batch, normaliser)
    assert cost.mults == projections + counted.macs
    assert cost.adds == projections + counted.macs + counted.adds_only
    layer.hashing = False
    with CostCounter() as cost:
        layer(x)
    assert cost.mults == 4 * batch * 17 * 32 * 32 + softmax_attention_counted(17, 2, 16, batch).macs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hashed_attention_in_half_precision_at_16k_tokens(dtype: torch.dtype) -> None:
    """bias * N exceeds float16's range from a few thousand tokens: the sums accumulate in float32."""
    generator = torch.Generator().manual_seed(0)
    tokens, bits = 16_384, 16
    q_codes, k_codes = (torch.randint(0, 2, (1, 2, tokens, bits), generator=generator).float() * 2 - 1
                        for _ in range(2))
    v = torch.randn(1, 2, tokens, 32, generator=generator)
    bias = 17.0
    assert bias * tokens > torch.finfo(torch.float16).max
    reference = hashed_linear_attention(q_codes, k_codes, v, bias)
    out = hashed_linear_attention(q_codes.to(dtype), k_codes.to(dtype), v.to(dtype), bias)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 2e-3)


def test_anchor_norms_are_counted_once_per_head_not_per_image() -> None:
    """The anchors' squared norms run once per head and call: a batch of 2 doubles everything else only."""
    from frugalvit.ecoformer.cost import hashed_attention_elementwise

    one, two = hashed_attention_elementwise(196, 3, 64, 16, 25), hashed_attention_elementwise(196, 3, 64, 16, 25, 2)
    assert 2 * one.mults - two.mults == 2 * one.adds - two.adds == 3 * 25 * 64
    assert one.mults == 94959  # batch 1 as before: the documented energy figures stand
