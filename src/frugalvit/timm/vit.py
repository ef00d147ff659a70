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
    position dropout included, so it follows `model.training`). On CUDA the
    patches are embedded by `patch_tokens` (one matrix product, equal up to
    rounding); elsewhere by timm's own `PatchEmbed`, bit for bit.
    """
    embed = model.patch_embed
    patches = patch_tokens(embed, images) if images.is_cuda and patch_tokens_apply(embed, images) else embed(images)
    return model.norm_pre(model.patch_drop(model._pos_embed(patches)))


def patch_tokens_apply(embed: object, images: Tensor) -> bool:
    """Whether `patch_tokens` computes what `embed(images)` does: timm's plain `PatchEmbed` with a
    non-overlapping convolution, flattened output, and images of a size it accepts (else timm raises)."""
    if not _plain_patch_embed(embed):
        return False
    proj = embed.proj
    if not (isinstance(proj, torch.nn.Conv2d) and tuple(proj.kernel_size) == tuple(proj.stride)
            and tuple(proj.padding) == (0, 0) and tuple(proj.dilation) == (1, 1) and proj.groups == 1
            and proj.padding_mode == "zeros"):
        return False
    if not embed.flatten or images.dim() != 4:
        return False
    height, width = images.shape[-2:]
    if embed.img_size is not None and embed.strict_img_size:
        return (height, width) == tuple(embed.img_size)
    return height % proj.kernel_size[0] == 0 and width % proj.kernel_size[1] == 0


def patch_tokens(embed: PatchEmbed, images: Tensor) -> Tensor:
    """timm's `PatchEmbed` forward (B, N, D) as one matrix product over the unfolded patches.

    Equal to `embed(images)` up to rounding (check `patch_tokens_apply` first).
    Why: cuDNN runs this convolution as an implicit GEMM after an NCHW -> NHWC
    copy, 0.13 ms of a 0.77 ms eventful frame at 576 tokens and 0.28 ms at
    4,096 tokens on an H200 (ViT-B/16, bf16, profiles of GPU run 9); one
    `addmm` does the same arithmetic.
    """
    proj = embed.proj
    rows, cols = proj.kernel_size
    batch, channels, height, width = images.shape
    grid = (height // rows, width // cols)
    patches = images.reshape(batch, channels, grid[0], rows, grid[1], cols).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(batch * grid[0] * grid[1], channels * rows * cols)
    weight = proj.weight.reshape(proj.out_channels, -1)
    x = patches @ weight.T if proj.bias is None else torch.addmm(proj.bias, patches, weight.T)
    return embed.norm(x.reshape(batch, grid[0] * grid[1], proj.out_channels))


def has_plain_patch_embed(model: VisionTransformer) -> bool:
    """Whether `model` embeds patches with timm's `PatchEmbed` computation (a subclass that keeps its
    `forward` counts) and without dynamic padding: what `embed_tokens_resampled` reproduces."""
    return _plain_patch_embed(getattr(model, "patch_embed", None)) and not getattr(model, "dynamic_img_pad", False)


def _plain_patch_embed(embed: object) -> bool:
    """timm's `PatchEmbed` computation (a subclass that keeps its `forward` counts), without dynamic padding."""
    return (isinstance(embed, PatchEmbed) and type(embed).forward is PatchEmbed.forward
            and not getattr(embed, "dynamic_img_pad", False))


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
    prefix = [token.expand(x.shape[0], -1, -1) for token in  # in timm's order: class, distillation, registers
              (model.cls_token, getattr(model, "dist_token", None), model.reg_token) if token is not None]
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
