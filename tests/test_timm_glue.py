"""The timm glue (`frugalvit.timm`): exact with timm's own forward, and module swaps that undo exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from frugalvit.ecoformer import EcoFormerAttention, convertible_layers, ecoformer, fit_hashes, remove_ecoformer
from frugalvit.timm import (attention_gate, embed_tokens, embed_tokens_resampled, graft, merge_heads,
                            replace_modules, split_qkv)
from frugalvit.timm.vit import patch_tokens, patch_tokens_apply

torch.set_num_threads(1)

VARIANTS = {
    "class token": {},
    "registers, no_embed_class": {"reg_tokens": 2, "no_embed_class": True},
    "no class token": {"class_token": False, "global_pool": "avg"},
}


def tiny_vit(**kwargs: object) -> VisionTransformer:
    torch.manual_seed(0)
    options = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
    return VisionTransformer(**(options | kwargs)).eval()


def images(count: int = 2, size: int = 32) -> Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", VARIANTS, ids=list(VARIANTS))
@torch.no_grad()
def test_embed_tokens_is_the_models_own_embedding(variant: str) -> None:
    model = tiny_vit(**VARIANTS[variant])
    x = images()
    tokens = embed_tokens(model, x)
    assert tokens.shape[1] == model.num_prefix_tokens + 16
    torch.testing.assert_close(model.norm(model.blocks(tokens)), model.forward_features(x), rtol=0, atol=0)
    torch.testing.assert_close(embed_tokens_resampled(model, x), tokens, rtol=0, atol=0)
    larger = embed_tokens_resampled(model, images(size=48))
    assert larger.shape == (2, model.num_prefix_tokens + 36, 32)


@pytest.mark.parametrize("options", [{}, {"patch_size": 4, "embed_layer_norm": True}, {"bias": False}],
                         ids=["patch 8", "patch 4 + norm", "no bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_patch_tokens_is_patch_embed_as_one_matmul(options: dict[str, object], dtype: torch.dtype) -> None:
    """The CUDA path's patch embedding against timm's PatchEmbed (the reference), on the CPU."""
    options = dict(options)  # the parameter is shared between the dtype cases
    norm, bias = options.pop("embed_layer_norm", False), options.pop("bias", True)
    model = tiny_vit(**options, **({"embed_norm_layer": nn.LayerNorm} if norm else {})).to(dtype)
    if not bias:
        model.patch_embed.proj.bias = None
    x = images().to(dtype)
    embed = model.patch_embed
    assert isinstance(embed.norm, nn.LayerNorm) == norm
    assert patch_tokens_apply(embed, x)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(patch_tokens(embed, x), embed(x), **tolerance)
    assert not patch_tokens_apply(embed, images(size=48).to(dtype))  # strict size: timm's own error stays


def test_embed_tokens_resampled_names_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        embed_tokens_resampled(tiny_vit(), images(size=36))


ATTENTIONS = {"plain": {}, "qk_norm": {"qk_norm": True}, "qk_norm, scale_norm, gated": {
    "qk_norm": True, "scale_norm": True, "gated": True}}


@pytest.mark.parametrize("options", ATTENTIONS.values(), ids=list(ATTENTIONS))
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@torch.no_grad()
def test_split_qkv_then_sdpa_is_timm_attention(options: dict[str, bool], fused: bool) -> None:
    torch.manual_seed(0)
    if options.get("gated") and "gated" not in Attention.__init__.__code__.co_varnames:
        pytest.skip("this timm has no gated Attention")
    qk_norm = options.get("qk_norm", False)
    attn = Attention(48, num_heads=3, qkv_bias=True, norm_layer=nn.LayerNorm, **options).eval()
    if qk_norm:  # non-trivial norm parameters, so that forgetting them shows
        nn.init.normal_(attn.q_norm.weight)
        nn.init.normal_(attn.k_norm.bias)
    attn.fused_attn = fused
    x = torch.randn(2, 7, 48)
    q, k, v = split_qkv(attn, x)
    assert q.shape == k.shape == v.shape == (2, 3, 7, 16)
    out = merge_heads(attn, F.scaled_dot_product_attention(q, k, v), attention_gate(attn, x))
    torch.testing.assert_close(out, attn(x), rtol=1e-5, atol=1e-6)


class Tagged(nn.Module):
    """A stand-in replacement that wraps the module it replaces and changes its output."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        return 2 * self.inner(x, *args, **kwargs)


@torch.no_grad()
def test_replace_modules_and_undo_restore_the_same_objects() -> None:
    model = tiny_vit()
    x = images()
    before = model(x)
    originals = {name: module for name, module in model.named_modules() if isinstance(module, Attention)}
    replacement = replace_modules(model, lambda _, m: isinstance(m, Attention), lambda _, m: Tagged(m))
    assert replacement.originals == originals
    assert all(isinstance(model.get_submodule(name), Tagged) for name in originals)
    assert not torch.equal(model(x), before)
    replacement.undo()
    assert all(model.get_submodule(name) is module for name, module in originals.items())
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="already undone"):
        replacement.undo()


def test_replace_modules_outermost_only_shared_once_and_undo_refuses_a_changed_model() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 3)), shared, shared)
    replacement = replace_modules(model, lambda _, m: isinstance(m, (nn.Sequential, nn.Linear)),
                                  lambda _, m: nn.Identity())
    assert list(replacement.swapped) == ["0", "1", "2"]  # "0.0" inside the replaced "0" is not visited
    assert model[1] is model[2]
    model[1] = nn.Tanh()
    with pytest.raises(RuntimeError, match="'1' no longer holds"):
        replacement.undo()


def test_graft_shares_parts_and_returns_their_names() -> None:
    source = Attention(16, num_heads=2)
    target = nn.Module()
    names = graft(target, source)
    assert target.qkv is source.qkv and target.proj is source.proj and target.scale == source.scale
    assert {"qkv", "proj", "num_heads", "fused_attn", "training"} <= set(names)
    assert "_forward_hooks" not in names and target._forward_hooks is not source._forward_hooks


class HalvedAttention(Attention):
    """A user's subclass of timm's Attention: its own attribute and a forward that calls its own method."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.factor = 0.5

    def shrink(self, x: Tensor) -> Tensor:
        return self.factor * x

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return self.shrink(super().forward(x, attn_mask=attn_mask, is_causal=is_causal))


def test_ecoformer_converts_a_subclass_of_timm_attention_and_back() -> None:
    model = tiny_vit(attn_layer=HalvedAttention)
    x = images()
    before = model(x)
    assert convertible_layers(model) == ["blocks.0.attn", "blocks.1.attn"]
    converted = ecoformer(model, bits=4, anchors=4)
    assert all(type(m) is HalvedAttention for m in model.modules() if isinstance(m, Attention))  # not in place
    layers = [m for m in converted.modules() if isinstance(m, EcoFormerAttention)]
    assert len(layers) == 2 and layers[0].factor == 0.5
    for layer in layers:
        layer.hashing = False
    torch.testing.assert_close(converted(x), before, rtol=0, atol=0)  # the subclass's own forward
    for layer in layers:
        layer.hashing = True
    fit_hashes(converted, x, iterations=2)  # learns (needs autograd)
    with torch.no_grad():
        assert torch.isfinite(converted(x)).all()
    restored = remove_ecoformer(converted)
    assert [type(m) for m in restored.modules() if isinstance(m, Attention)] == [HalvedAttention] * 2
    assert restored.blocks[0].attn.qkv is not layers[0].qkv  # a copy, as asked (inplace=False)
    torch.testing.assert_close(restored(x), before, rtol=0, atol=0)
