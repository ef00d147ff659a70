"""Training-free cascade: one pretrained timm ViT run at increasing input resolutions.

For users who have a single trained ViT and no budget for retraining: stage k
is the same model on the image resized to `resolutions[k]`, with the absolute
position embeddings interpolated to that token grid (timm's
`resample_abs_pos_embed`); no reuse. Cheap resolutions answer the easy images.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from frugalvit.dvt.cascade import resize_images
from frugalvit.dvt.exit import EarlyExitCascade


def vit_at_resolution(model: VisionTransformer, images: Tensor) -> Tensor:
    """Logits of a timm ViT on `images` of any size divisible by its patch size, without changing the model.

    Mirrors `VisionTransformer.forward`, with the position embeddings resampled
    to the input's token grid; at the model's own size it is exactly timm's forward.
    """
    patch = model.patch_embed.patch_size
    height, width = images.shape[-2:]
    if height % patch[0] or width % patch[1]:
        raise ValueError(f"image size {height}x{width} is not divisible by the patch size {patch[0]}x{patch[1]}")
    embed = model.patch_embed
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
    x = model.norm_pre(model.patch_drop(model.pos_drop(x)))
    x = model.norm(model.blocks(x))
    return model.forward_head(x)


class ResolutionCascade(EarlyExitCascade):
    """The same timm ViT at increasing resolutions, with per-sample early exit; nothing to train.

    Args:
        model: a timm `VisionTransformer` (pretrained or not) with absolute or no position embeddings.
        resolutions: increasing square input sizes, each divisible by the patch size;
            the cascade's input size is the last one.
    """

    def __init__(self, model: VisionTransformer, resolutions: Sequence[int]) -> None:
        sizes = [int(size) for size in resolutions]
        if len(sizes) < 2 or sorted(set(sizes)) != sizes:
            raise ValueError(f"resolutions must be at least 2 strictly increasing sizes, got {list(resolutions)}")
        patch = model.patch_embed.patch_size
        bad = [size for size in sizes if size % patch[0] or size % patch[1]]
        if bad:
            raise ValueError(f"resolutions {bad} are not divisible by the model's patch size {patch[0]}")
        if getattr(model, "dynamic_img_pad", False) or model.patch_embed.__class__.__name__ != "PatchEmbed":
            raise ValueError("ResolutionCascade supports timm ViTs with a plain PatchEmbed")
        super().__init__(len(sizes), (model.patch_embed.proj.in_channels, sizes[-1], sizes[-1]))
        self.model = model
        self.resolutions = tuple(sizes)

    def run_stage(self, index: int, images: Tensor, carry: Any, hand_on: bool) -> tuple[Tensor, Any]:
        size = self.resolutions[index]
        return vit_at_resolution(self.model, resize_images(images, (size, size))), None
