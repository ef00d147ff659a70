"""One cascade stage: a timm `VisionTransformer` whose blocks can take a context embedding and a logit bias.

`ReuseBlock` is timm's `Block` with the MLP input optionally widened by a
context embedding (feature reuse), plus `forward_reuse`, which adds a bias to
the attention logits and can return them (relationship reuse). Its plain
`forward(x)` is timm's, so a stage built here is an ordinary timm model, and
with `context_dim=0` its state dict loads into a plain `VisionTransformer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from frugalvit.timm import attention_gate, embed_tokens, merge_heads, split_qkv


def attention_with_bias(attn: Attention, x: Tensor, bias: Tensor | None = None,
                        return_logits: bool = False) -> tuple[Tensor, Tensor | None]:
    """timm `Attention` forward with an additive logit `bias` (B, H, N, N) and, optionally, its logits.

    Keeps fused SDPA (the bias as a float mask) unless the logits are needed or
    `attn.fused_attn` is False; the explicit path is the reference.
    """
    gate = attention_gate(attn, x)
    q, k, v = split_qkv(attn, x)
    logits = None
    if attn.fused_attn and not return_logits:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    return merge_heads(attn, out, gate), logits


class ReuseBlock(Block):
    """timm `Block` whose MLP also reads a `context_dim`-wide context embedding (feature reuse).

    The LayerNorm before the MLP and the MLP's first layer widen from D to
    D + context_dim; the MLP still outputs D. Without a context (plain
    `forward`) the context is zeros.
    """

    def __init__(self, dim: int, num_heads: int, context_dim: int = 0, **kwargs: Any) -> None:
        super().__init__(dim, num_heads, **kwargs)
        self.context_dim = context_dim
        if context_dim:
            norm_layer = kwargs.get("norm_layer") or nn.LayerNorm
            mlp_layer = kwargs.get("mlp_layer") or Mlp
            self.norm2 = norm_layer(dim + context_dim)
            self.mlp = mlp_layer(in_features=dim + context_dim, hidden_features=self.mlp.fc1.out_features,
                                 out_features=dim, act_layer=kwargs.get("act_layer") or nn.GELU,
                                 bias=kwargs.get("proj_bias", True), drop=kwargs.get("proj_drop", 0.0))

    def forward_reuse(self, x: Tensor, context: Tensor | None = None, attn_bias: Tensor | None = None,
                      return_logits: bool = False) -> tuple[Tensor, Tensor | None]:
        """Block forward with a context embedding (B, N, context_dim) and an attention bias (B, H, N, N)."""
        attended, logits = attention_with_bias(self.attn, self.norm1(x), attn_bias, return_logits)
        x = x + self.drop_path1(self.ls1(attended))
        if self.context_dim:
            if context is None:
                context = x.new_zeros(*x.shape[:-1], self.context_dim)
            mlp_in = torch.cat([x, context], dim=-1)
        elif context is not None:
            raise ValueError("this block was built without feature reuse (context_dim=0) but got a context")
        else:
            mlp_in = x
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(mlp_in))))
        return x, logits

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if not self.context_dim:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if is_causal:
            raise NotImplementedError("causal attention is not supported by feature-reuse blocks")
        return self.forward_reuse(x, None, attn_mask)[0]


class ConvStemEmbed(PatchEmbed):
    """timm `PatchEmbed` behind a small convolutional stem (Xiao et al., *Early Convolutions Help Transformers
    See Better*, 2021): stride-2 3x3 conv + BatchNorm + ReLU per entry of `stem_channels`, then the patch
    projection with the remaining stride. Same token grid as a plain patch embedding of `patch_size`.

    Why: a ViT trained from scratch on a few thousand cluttered images barely leaves chance level in CPU-sized
    training; the stem's locality makes it learn in minutes. Its MACs are counted like any convolution.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, stem_channels: Sequence[int] = (24, 48), bias: bool = True,
                 **kwargs: Any) -> None:
        stride = 2 ** len(stem_channels)
        size = patch_size if isinstance(patch_size, int) else patch_size[0]
        if not stem_channels or size % stride:
            raise ValueError(f"a conv stem of {len(stem_channels)} stride-2 layers needs a patch size divisible by "
                             f"{stride}, got {patch_size}; use fewer stem channels or a larger patch")
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, bias=bias,
                         **kwargs)
        layers: list[nn.Module] = []
        width = in_chans
        for channels in stem_channels:
            layers += [nn.Conv2d(width, channels, 3, 2, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
            width = channels
        self.in_chans = in_chans
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(width, embed_dim, kernel_size=size // stride, stride=size // stride, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(self.stem(x))
        return self.norm(x.flatten(2).transpose(1, 2))


def stage_in_chans(vit: VisionTransformer) -> int:
    """Image channels a stage takes (through a conv stem or a plain patch projection)."""
    return int(getattr(vit.patch_embed, "in_chans", vit.patch_embed.proj.in_channels))


def dvt_stage(image_size: int, patch_size: int, in_chans: int = 3, num_classes: int = 1000, embed_dim: int = 192,
              depth: int = 6, num_heads: int = 3, context_dim: int = 0, conv_stem: Sequence[int] = (),
              **kwargs: Any) -> VisionTransformer:
    """A timm `VisionTransformer` built from `ReuseBlock`s (context_dim > 0 for a stage that reuses features).

    `conv_stem` (channels per stride-2 layer, e.g. (24, 48)) puts a `ConvStemEmbed` in front of the tokens.
    """
    if conv_stem:
        kwargs["embed_layer"] = partial(ConvStemEmbed, stem_channels=tuple(conv_stem))
    return VisionTransformer(img_size=image_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                             block_fn=partial(ReuseBlock, context_dim=context_dim), **kwargs)


@dataclass
class StageOutput:
    """What a stage hands on: class logits, final tokens before the last norm, attention logits per layer."""

    logits: Tensor
    tokens: Tensor
    attention: list[Tensor] | None


def stage_forward(vit: VisionTransformer, images: Tensor, context: Tensor | None = None,
                  attn_biases: Sequence[Tensor] | None = None, return_attention: bool = False) -> StageOutput:
    """Run one stage on `images` with optional reuse inputs; mirrors `VisionTransformer.forward`."""
    if attn_biases is not None and len(attn_biases) != len(vit.blocks):
        raise ValueError(f"got {len(attn_biases)} attention biases for {len(vit.blocks)} blocks")
    x = embed_tokens(vit, images)
    attention: list[Tensor] | None = [] if return_attention else None
    for index, block in enumerate(vit.blocks):
        if not isinstance(block, ReuseBlock):
            raise TypeError(f"stage block {index} is a {type(block).__name__}; build stages with dvt_stage() "
                            "(blocks must be ReuseBlock)")
        bias = None if attn_biases is None else attn_biases[index]
        x, logits = block.forward_reuse(x, context, bias, return_attention)
        if attention is not None:
            attention.append(logits)
    return StageOutput(vit.forward_head(vit.norm(x)), x, attention)
