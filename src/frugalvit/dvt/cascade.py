"""DVT: a cascade of ViTs with increasing token counts, feature and relationship reuse, real early exit."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from frugalvit.data import model_input
from frugalvit.ioutil import check_fields
from frugalvit.dvt.exit import EarlyExitCascade
from frugalvit.dvt.reuse import FeatureReuse, RelationReuse
from frugalvit.dvt.stage import ReuseBlock, StageOutput, dvt_stage, stage_forward, stage_in_chans


def _size(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def resize_images(images: Tensor, size: tuple[int, int], dtype: torch.dtype | None = None) -> Tensor:
    """Bilinear (anti-aliased when shrinking) resize of (N, C, H, W) images; identity at the same size.

    uint8 images (0-255) come back as floats in [0, 1] of `dtype` (default
    float32). On the CPU they are resized as uint8, PyTorch's vectorised
    path (3x faster than a float resize at batch 64, conversion included; the
    result is rounded to whole levels, within 1 level of the float resize);
    on other devices they are converted first. Float images are resized in
    their own dtype and come back in `dtype` when one is given (a stage's
    dtype: float32 images into a bfloat16 model).
    """
    same = tuple(images.shape[-2:]) == tuple(size)
    if images.dtype == torch.uint8:
        if not same and images.device.type == "cpu":
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
            same = True
        images = model_input(images, images.device, dtype or torch.float32)
    resized = images if same else resize_bilinear(images, size)
    return resized if dtype is None else resized.to(dtype)


def check_at_least_one(values: dict[str, int]) -> None:
    """Raise ValueError naming every one of these model sizes (name: value) that is below 1."""
    small = {name: value for name, value in values.items() if value < 1}
    if small:
        raise ValueError(f"{', '.join(small)} must be at least 1, got {small}")


def resize_bilinear(images: Tensor, size: tuple[int, int]) -> Tensor:
    """Anti-aliased bilinear resize in the images' dtype; on the CPU, float16 / bfloat16 run in float32 (PyTorch
    has no reduced-precision anti-aliased kernel there) and come back in their dtype."""
    if images.device.type == "cpu" and images.dtype in (torch.float16, torch.bfloat16):
        return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False,
                             antialias=True).to(images.dtype)
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


class DVTCascade(EarlyExitCascade):
    """Dynamic Vision Transformer: K timm ViT stages over the same image, few tokens first.

    Stage k sees the image at its own size and patch size (so its own token
    grid). With `feature_reuse`, stage k's MLPs also read a context embedding
    made from stage k-1's final tokens; with `relation_reuse`, stage k's
    attention logits get a bias made from all of stage k-1's attention logits.
    Both are modules of their own; `use_feature_reuse` / `use_relation_reuse`
    switch them off at run time (zeros context, no bias) without rebuilding.

    Args:
        stages: ViTs built with `dvt_stage` (blocks must be `ReuseBlock`; for
            feature reuse, stages 2..K with `context_dim` > 0).
        feature_reuse: build the feature-reuse modules.
        relation_reuse: build the relationship-reuse modules.
        feature_hidden: hidden width of the feature-reuse MLP (default: upstream width).
        relation_hidden: hidden channels of the relationship transform (default: L_down x H_down).
    """

    takes_uint8 = True  # each stage's input goes through resize_images, which converts uint8 (fast on the CPU)

    def __init__(self, stages: Sequence[VisionTransformer], feature_reuse: bool = True, relation_reuse: bool = True,
                 feature_hidden: int | None = None, relation_hidden: int | None = None) -> None:
        sizes = [_size(stage.patch_embed.img_size) for stage in stages]
        in_chans = {stage_in_chans(stage) for stage in stages}
        if len(in_chans) != 1:
            raise ValueError(f"all stages must take the same number of input channels, got {sorted(in_chans)}")
        input_size = max(sizes, key=lambda hw: hw[0] * hw[1])
        super().__init__(len(stages), (in_chans.pop(), *input_size))
        self.stages = nn.ModuleList(stages)
        for index, stage in enumerate(stages):
            if not all(isinstance(block, ReuseBlock) for block in stage.blocks):
                raise TypeError(f"stage {index}: blocks must be ReuseBlock; build stages with dvt_stage()")
        self.feature_reuse: nn.ModuleList | None = None
        self.relation_reuse: nn.ModuleList | None = None
        pairs = list(zip(stages[:-1], stages[1:]))
        if feature_reuse:
            modules = []
            for index, (up, down) in enumerate(pairs, start=1):
                width = down.blocks[0].context_dim
                if not width or any(block.context_dim != width for block in down.blocks):
                    raise ValueError(f"stage {index} needs context_dim > 0 in every block for feature reuse "
                                     f"(build it with dvt_stage(..., context_dim=48))")
                modules.append(FeatureReuse(up.embed_dim, width, up.patch_embed.grid_size, down.patch_embed.grid_size,
                                            up.num_prefix_tokens, down.num_prefix_tokens, feature_hidden))
            self.feature_reuse = nn.ModuleList(modules)
        if relation_reuse:
            modules = []
            for index, (up, down) in enumerate(pairs, start=1):
                if up.num_prefix_tokens != down.num_prefix_tokens:
                    raise ValueError(f"relationship reuse needs the same prefix tokens in stages {index - 1} and "
                                     f"{index}, got {up.num_prefix_tokens} and {down.num_prefix_tokens}")
                maps = len(up.blocks) * up.blocks[0].attn.num_heads
                modules.append(RelationReuse(maps, len(down.blocks), down.blocks[0].attn.num_heads,
                                             up.patch_embed.grid_size, down.patch_embed.grid_size,
                                             up.num_prefix_tokens, relation_hidden))
            self.relation_reuse = nn.ModuleList(modules)
        self.use_feature_reuse = feature_reuse
        self.use_relation_reuse = relation_reuse

    def run_stage(self, index: int, images: Tensor, carry: Any, hand_on: bool) -> tuple[Tensor, Any]:
        stage = self.stages[index]
        context = biases = None
        if index > 0:
            tokens, attention = carry
            if self.use_feature_reuse:
                if self.feature_reuse is None:
                    raise RuntimeError("use_feature_reuse is on but the cascade was built without feature reuse")
                context = self.feature_reuse[index - 1](tokens)
            if self.use_relation_reuse:
                if self.relation_reuse is None:
                    raise RuntimeError("use_relation_reuse is on but the cascade was built without relation reuse")
                biases = self.relation_reuse[index - 1](attention)
        inputs = resize_images(images, _size(stage.patch_embed.img_size), dtype=next(stage.parameters()).dtype)
        out: StageOutput = stage_forward(stage, inputs, context, biases,
                                         return_attention=hand_on and self.use_relation_reuse)
        hand = (out.tokens if hand_on and self.use_feature_reuse else None, out.attention)
        return out.logits, hand


def cascade_loss(model: EarlyExitCascade, images: Tensor, labels: Tensor) -> Tensor:
    """Joint training objective: the sum of the stages' cross-entropies."""
    return torch.stack([F.cross_entropy(logits, labels) for logits in model.forward_all(images)]).sum()


@dataclass(frozen=True)
class DVTConfig:
    """Everything needed to rebuild a `DVTCascade` (saved as JSON next to a trained run).

    `patch_sizes` sets the token grids; `image_sizes` (optional, one per stage)
    lets stages see the image downscaled instead, e.g. 112/160/224 px with
    patch 16 for the paper's 7x7 / 10x10 / 14x14. `conv_stem` (channels of
    stride-2 conv layers, e.g. (16, 32, 64)) puts a `ConvStemEmbed` before
    each stage's tokens, which makes from-scratch training on cluttered
    real images feasible in minutes; the token grids stay the same.
    """

    image_size: int = 28
    patch_sizes: tuple[int, ...] = (14, 7, 4)
    image_sizes: tuple[int, ...] | None = None
    in_chans: int = 1
    num_classes: int = 10
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    context_dim: int = 48
    conv_stem: tuple[int, ...] = ()
    feature_reuse: bool = True
    relation_reuse: bool = True
    vit_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_sizes", tuple(int(p) for p in self.patch_sizes))
        object.__setattr__(self, "conv_stem", tuple(int(c) for c in self.conv_stem))
        if self.image_sizes is not None:
            object.__setattr__(self, "image_sizes", tuple(int(s) for s in self.image_sizes))
        if len(self.patch_sizes) < 2:
            raise ValueError(f"a cascade needs at least 2 stages, got patch sizes {self.patch_sizes}")
        sizes = self.stage_image_sizes
        if len(sizes) != len(self.patch_sizes):
            raise ValueError(f"got {len(sizes)} image sizes for {len(self.patch_sizes)} stages")
        check_at_least_one({"image size": min(sizes), "in_chans": self.in_chans, "num_classes": self.num_classes,
                            "embed_dim": self.embed_dim, "depth": self.depth, "num_heads": self.num_heads,
                            "conv_stem widths": min(self.conv_stem, default=1)})
        if self.context_dim < 0:
            raise ValueError(f"context_dim must be >= 0, got {self.context_dim}")
        for size, patch in zip(sizes, self.patch_sizes):
            if patch < 1 or size % patch:
                raise ValueError(f"patch size {patch} does not divide image size {size}; "
                                 f"choose patch sizes that divide it (e.g. 14, 7, 4 for 28 px)")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")

    @property
    def stage_image_sizes(self) -> tuple[int, ...]:
        return self.image_sizes if self.image_sizes is not None else (self.image_size,) * len(self.patch_sizes)

    @property
    def grids(self) -> tuple[int, ...]:
        return tuple(size // patch for size, patch in zip(self.stage_image_sizes, self.patch_sizes))

    def build(self) -> DVTCascade:
        stages = [dvt_stage(size, patch, self.in_chans, self.num_classes, self.embed_dim, self.depth, self.num_heads,
                            context_dim=self.context_dim if self.feature_reuse and index > 0 else 0,
                            conv_stem=self.conv_stem, **self.vit_kwargs)
                  for index, (size, patch) in enumerate(zip(self.stage_image_sizes, self.patch_sizes))]
        return DVTCascade(stages, self.feature_reuse, self.relation_reuse)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["patch_sizes"] = list(self.patch_sizes)
        data["image_sizes"] = None if self.image_sizes is None else list(self.image_sizes)
        data["conv_stem"] = list(self.conv_stem)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DVTConfig":
        check_fields(cls, data, "DVT config")
        return cls(**data)


def dvt_cascade(**kwargs: Any) -> DVTCascade:
    """Build a `DVTCascade` from `DVTConfig` fields, e.g. `dvt_cascade(patch_sizes=(14, 7, 4))`."""
    return DVTConfig(**kwargs).build()
