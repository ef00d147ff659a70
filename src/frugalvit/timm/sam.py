"""timm's SAM / ViTDet-style backbone (`VisionTransformerSAM`): what the eventful machinery needs from it.

The backbone keeps tokens as an (B, H, W, D) grid, mixes windowed-attention
blocks (windows of `window_size` tokens a side, the grid zero-padded to a
multiple of it after `norm1`) with a few global blocks, and adds decomposed
relative positions to the attention logits (MViTv2: a term from the query
row and the key's row index plus one from the key's column index). Every
call into timm's SAM module, private helpers included, is here; the
algorithms above it see flat (B, N, D) tokens in row-major grid order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from timm.layers import resample_abs_pos_embed_nhwc
from timm.models import vision_transformer_sam as sam


def is_sam(model: nn.Module) -> bool:
    """Whether `model` is (a subclass of) timm's `VisionTransformerSAM`."""
    return isinstance(model, sam.VisionTransformerSAM)


def is_sam_block(block: nn.Module) -> bool:
    return isinstance(block, sam.Block) and isinstance(block.attn, sam.Attention)


def embed_grid(model: nn.Module, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """(tokens (B, H * W, D) in row-major order, (H, W)): the backbone's input to its first block."""
    x = model.patch_embed(images)
    if model.pos_embed is not None:
        x = x + resample_abs_pos_embed_nhwc(model.pos_embed, x.shape[1:3])
    x = model.norm_pre(model.patch_drop(model.pos_drop(x)))
    batch, height, width, dim = x.shape
    return x.reshape(batch, height * width, dim), (height, width)


def finish_grid(model: nn.Module, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """The backbone's `forward_features` output from the last block's tokens: the neck on the (B, D, H, W) map."""
    batch, _, dim = tokens.shape
    return model.neck(tokens.reshape(batch, grid[0], grid[1], dim).permute(0, 3, 1, 2))


@dataclass(frozen=True)
class RelativePositions:
    """Decomposed relative-position tables of one attention layer over a (H, W) query/key grid.

    `height` (H, H, Dh) and `width` (W, W, Dh): the embedding of the offset
    between query row/column and key row/column (timm's `get_rel_pos`, which
    also interpolates the learned table to the grid). The logit of query i
    and key j gains q_i . height[r_i, r_j] + q_i . width[c_i, c_j], with the
    query after q_norm and before scaling.
    """

    height: Tensor
    width: Tensor


def relative_positions(attn: nn.Module, grid: tuple[int, int]) -> RelativePositions | None:
    """The layer's tables for a (H, W) grid (a window's, or the whole grid's), or None without relative positions."""
    if not getattr(attn, "use_rel_pos", False):
        return None
    return RelativePositions(sam.get_rel_pos(grid[0], grid[0], attn.rel_pos_h),
                             sam.get_rel_pos(grid[1], grid[1], attn.rel_pos_w))


def check_supported(model: nn.Module) -> None:
    """Raise TypeError naming the first part of a SAM backbone the eventful conversion does not handle."""
    for index, block in enumerate(model.blocks):
        if not is_sam_block(block):
            raise TypeError(f"blocks.{index} ({type(block).__name__}) is not timm's SAM Block with its Attention")
        if block.attn.rope is not None:
            raise TypeError(f"blocks.{index}.attn uses rotary embeddings, which the SAM conversion does not handle")


@dataclass(frozen=True)
class ConvNeck:
    """SAM's neck as token-wise and spatial parts: 1x1 conv, channel norm, 3x3 conv, channel norm (no biases).

    Weights are read from the modules on every access, so they follow the
    model to another device or dtype. `module` is the whole neck (full frames
    run it as timm does).
    """

    module: nn.Sequential

    @property
    def project(self) -> Tensor:
        """The 1x1 conv as a (C, D) matrix."""
        return self.module[0].weight[:, :, 0, 0]

    @property
    def taps(self) -> Tensor:
        """The 3x3 conv's weights per offset: (3, 3, C out, C in), index [dy + 1, dx + 1]."""
        return self.module[2].weight.permute(2, 3, 0, 1)

    def norm1(self, tokens: Tensor) -> Tensor:
        """The first LayerNorm2d over the channel (last) axis of (..., C) tokens."""
        return _channel_norm(self.module[1], tokens)

    def norm2(self, tokens: Tensor) -> Tensor:
        return _channel_norm(self.module[3], tokens)


def _channel_norm(norm: nn.Module, tokens: Tensor) -> Tensor:
    return torch.nn.functional.layer_norm(tokens, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def conv_neck(model: nn.Module) -> ConvNeck | None:
    """The neck's parts when it is SAM's [1x1 conv, LayerNorm2d, 3x3 conv (padding 1), LayerNorm2d], else None."""
    from timm.layers import LayerNorm2d

    neck = model.neck
    if not isinstance(neck, nn.Sequential) or len(neck) != 4:
        return None
    project, norm1, conv, norm2 = neck
    plain = all(isinstance(c, nn.Conv2d) and c.bias is None and c.groups == 1 and c.stride == (1, 1)
                and c.dilation == (1, 1) for c in (project, conv))
    if not (plain and project.kernel_size == (1, 1) and conv.kernel_size == (3, 3) and conv.padding == (1, 1)
            and isinstance(norm1, LayerNorm2d) and isinstance(norm2, LayerNorm2d)):
        return None
    return ConvNeck(neck)
