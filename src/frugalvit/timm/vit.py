"""timm's `VisionTransformer` and `Attention`: the token embedding and the attention's input and output halves.

The methods above this layer rewrite what happens *between* the q/k/v
projection and the output projection (a logit bias, hashed attention,
incremental updates) or run the blocks on their own terms; they all start
from the same tokens and the same q/k/v as timm. Writing those once, here,
keeps them exact with timm's own forward and keeps timm's private API
(`VisionTransformer._pos_embed`) to one call site.
"""

from __future__ import annotations

import torch
from torch import Tensor
from timm.layers import Attention, PatchEmbed, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer


def embed_tokens(model: VisionTransformer, images: Tensor) -> Tensor:
    """The tokens a timm ViT feeds its first block: patches, prefix tokens, position embedding, pre-norm.

    Exactly `model.forward_features` up to the blocks (patch dropout and
    position dropout included, so it follows `model.training`).
    """
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def has_plain_patch_embed(model: VisionTransformer) -> bool:
    """Whether `model` embeds patches with timm's `PatchEmbed` computation (a subclass that keeps its
    `forward` counts) and without dynamic padding: what `embed_tokens_resampled` reproduces."""
    embed = getattr(model, "patch_embed", None)
    return (isinstance(embed, PatchEmbed) and type(embed).forward is PatchEmbed.forward
            and not getattr(embed, "dynamic_img_pad", False) and not getattr(model, "dynamic_img_pad", False))


def embed_tokens_resampled(model: VisionTransformer, images: Tensor) -> Tensor:
    """`embed_tokens` for images of any size divisible by the patch size, without changing the model.

    The absolute position embeddings are resampled to the input's token grid
    (timm's `resample_abs_pos_embed`); at the model's own size the result is
    exactly `embed_tokens`. Needs a plain `PatchEmbed` (`has_plain_patch_embed`).
    """
    if not has_plain_patch_embed(model):
        raise ValueError(f"cannot resample the token grid of a {type(model.patch_embed).__name__} patch embedding: "
                         "this needs timm's plain PatchEmbed without dynamic padding")
    embed = model.patch_embed
    patch = embed.patch_size
    height, width = images.shape[-2:]
    if height % patch[0] or width % patch[1]:
        raise ValueError(f"image size {height}x{width} is not divisible by the patch size {patch[0]}x{patch[1]}")
    x = embed.proj(images)
    grid = x.shape[-2:]
    x = embed.norm(x.flatten(2).transpose(1, 2))
    prefix = [token.expand(x.shape[0], -1, -1) for token in (model.cls_token, model.reg_token) if token is not None]
    if model.pos_embed is None:
        x = torch.cat(prefix + [x], dim=1)
    else:
        pos = resample_abs_pos_embed(model.pos_embed, new_size=list(grid), old_size=list(embed.grid_size),
                                     num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens)
        if model.no_embed_class:
            x = torch.cat(prefix + [x + pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos
    return model.norm_pre(model.patch_drop(model.pos_drop(x)))


def split_heads(attn: Attention, tokens: Tensor) -> Tensor:
    """(B, N, heads * head_dim) -> (B, heads, N, head_dim), the layout of timm's attention."""
    batch, count, _ = tokens.shape
    return tokens.reshape(batch, count, attn.num_heads, attn.head_dim).transpose(1, 2)


def split_qkv(attn: Attention, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of a timm `Attention` on `tokens` (B, N, C), each (B, heads, N, head_dim), q/k norms applied.

    What `Attention.forward` computes before its softmax; `attn.scale` is not
    applied (SDPA applies it).
    """
    batch, count, _ = tokens.shape
    qkv = attn.qkv(tokens).reshape(batch, count, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def attention_gate(attn: Attention, tokens: Tensor) -> Tensor | None:
    """The sigmoid output gate of a gated timm `Attention` on its input `tokens`, or None (most models)."""
    gate = getattr(attn, "gate", None)
    return gate(tokens).sigmoid() if gate is not None else None


def merge_heads(attn: Attention, heads: Tensor, gate: Tensor | None = None) -> Tensor:
    """timm `Attention`'s output half: (B, heads, N, head_dim) -> merged, `norm`, gated, `proj`, `proj_drop`.

    `gate` is `attention_gate(attn, tokens)` of the layer's input.
    """
    batch, _, count, _ = heads.shape
    out = attn.norm(heads.transpose(1, 2).reshape(batch, count, attn.num_heads * attn.head_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))
