"""timm's EVA / EVA-02 (`Eva`): what the eventful machinery needs from it.

EVA-02 rotates queries and keys by rotary position embeddings (the patch
tokens only; class and register tokens stay as they are), may split the q/k/v
projection into three layers with separate biases, normalises the attention
output before its projection (sub-LN), uses a SwiGLU MLP (token-wise, so
nothing to do) and bare `gamma_1` / `gamma_2` LayerScale parameters. Every
call into timm's EVA module, private helpers included, is here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from timm.layers import apply_rot_embed_cat
from timm.models import eva

from frugalvit.timm.beit import fused_qkv, layer_scale

__all__ = ["check_supported", "embed_tokens", "is_eva", "layer_scale", "rotary_rows", "rotate", "split_qkv"]


def is_eva(model: nn.Module) -> bool:
    """Whether `model` is (a subclass of) timm's `Eva`."""
    return isinstance(model, eva.Eva)


def check_supported(model: nn.Module) -> None:
    """Raise TypeError naming the first part of an EVA model the eventful conversion does not handle."""
    if getattr(model, "rope_mixed", False):
        raise TypeError("mixed (per-depth) rotary embeddings are not handled")
    if getattr(model, "dynamic_img_size", False):
        raise TypeError("dynamic_img_size is not handled; build the model at the frame size")
    for index, block in enumerate(model.blocks):
        if not isinstance(block, eva.EvaBlock):
            raise TypeError(f"blocks.{index} ({type(block).__name__}) is not timm's pre-norm EvaBlock")
        if not isinstance(block.attn, eva.EvaAttention):
            raise TypeError(f"blocks.{index}.attn ({type(block.attn).__name__}) is not timm's EvaAttention")
        if block.attn.gate is not None:
            raise TypeError(f"blocks.{index}.attn is gated, which is not handled")


def embed_tokens(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor | None]:
    """(tokens fed to the first block, rotary embedding (N - prefix, 2 Dh) or None)."""
    x, rope = model._pos_embed(model.patch_embed(images))
    return model.norm_pre(x), rope


def rotary_rows(model: nn.Module, rope: Tensor) -> Tensor:
    """The rotary embedding for every token (N, 2 Dh): prefix tokens get sin 0, cos 1 (no rotation, exactly)."""
    prefix = model.num_prefix_tokens
    sin, cos = rope.chunk(2, -1)
    identity = torch.cat([torch.zeros(prefix, sin.shape[-1], dtype=rope.dtype, device=rope.device),
                          torch.ones(prefix, cos.shape[-1], dtype=rope.dtype, device=rope.device)], dim=-1)
    return torch.cat([identity, rope], dim=0)


def rotate(attn: nn.Module, x: Tensor, rows: Tensor) -> Tensor:
    """q or k (B, heads, M, Dh) rotated by their tokens' rotary rows (B, 1, M, 2 Dh), as EvaAttention does."""
    return apply_rot_embed_cat(x, rows, half=getattr(attn, "rotate_half", False)).type_as(x)


def split_qkv(attn: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, heads, M, Dh) of tokens (B, M, D), q/k norms applied, before the rotation."""
    batch, count, _ = tokens.shape
    if attn.qkv is not None:
        q, k, v = fused_qkv(attn, tokens)
    else:
        q, k, v = (layer(tokens).reshape(batch, count, attn.num_heads, layer.out_features // attn.num_heads)
                   .transpose(1, 2) for layer in (attn.q_proj, attn.k_proj, attn.v_proj))  # M may be 0
    return attn.q_norm(q), attn.k_norm(k), v
