"""timm's BEiT (`Beit`): what the eventful machinery needs from it.

BEiT differs from timm's ViT in three places the eventful blocks touch: the
q/k/v projection has separate q and v biases (k has none), each attention
layer adds a learned relative position bias (H, N, N) over the patch grid
plus the class token (optionally a model-wide shared one), and LayerScale is
a bare parameter (`gamma_1`, `gamma_2`) instead of a module. Every call
into timm's BEiT module, private helpers included, is here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from timm.models import beit


def is_beit(model: nn.Module) -> bool:
    """Whether `model` is (a subclass of) timm's `Beit`."""
    return isinstance(model, beit.Beit)


def check_supported(model: nn.Module) -> None:
    """Raise TypeError naming the first part of a BEiT model the eventful conversion does not handle."""
    for index, block in enumerate(model.blocks):
        if not (isinstance(block, beit.Block) and isinstance(block.attn, beit.Attention)):
            raise TypeError(f"blocks.{index} ({type(block).__name__}) is not timm's BEiT Block with its Attention")


def embed_tokens(model: nn.Module, images: Tensor) -> Tensor:
    """The tokens BEiT feeds its first block: patches, class token, absolute positions (if any)."""
    x = model.patch_embed(images)
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    return model.pos_drop(x)


def position_bias(model: nn.Module, block: nn.Module) -> Tensor | None:
    """The (H, N, N) relative position bias one block's attention adds to its logits (None without)."""
    attn = block.attn
    bias = attn._get_rel_pos_bias()[0] if attn.relative_position_bias_table is not None else None
    if model.rel_pos_bias is not None:
        shared = model.rel_pos_bias()
        bias = shared if bias is None else bias + shared
    return bias


def fused_qkv(attn: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, heads, M, Dh) from one qkv layer whose bias may live apart as q_bias / k_bias / v_bias
    (BEiT, EVA), added the way the layer's own forward adds it."""
    batch, count, _ = tokens.shape
    if attn.q_bias is None:
        qkv = attn.qkv(tokens)
    else:
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(tokens) + bias if attn.qkv_bias_separate else F.linear(tokens, attn.qkv.weight, bias)
    head_dim = qkv.shape[-1] // (3 * attn.num_heads)  # explicit, not -1: a gate may pass no tokens (M = 0)
    q, k, v = qkv.reshape(batch, count, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def split_qkv(attn: nn.Module, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, heads, M, Dh) of tokens (B, M, D) with BEiT's separate q/v biases."""
    return fused_qkv(attn, tokens)


def layer_scale(block: nn.Module, branch: int, x: Tensor) -> Tensor:
    """`x` scaled by the block's LayerScale of branch 1 (attention) or 2 (MLP), if it has one."""
    gamma = getattr(block, f"gamma_{branch}")
    return x if gamma is None else gamma * x
