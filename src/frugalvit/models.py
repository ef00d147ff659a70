"""Model construction: the project's small ViTs, and timm models from the hub, a file or random weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from timm.models.vision_transformer import VisionTransformer
from torch import nn

from frugalvit.saliency import SaliencyViT, saliency_vit  # the real pretrained ViT that works offline


def small_vit(image_size: int = 28, patch_size: int = 7, in_chans: int = 1, num_classes: int = 10,
              embed_dim: int = 192, depth: int = 6, num_heads: int = 3, **kwargs: object) -> VisionTransformer:
    """The project's reference small ViT: 6 blocks, 192 wide; on MNIST 28 px with 7 px patches (4x4 tokens).

    Extra keyword arguments go to timm's `VisionTransformer` (e.g. `class_token=False,
    global_pool="avg"`, `init_values=1e-5` for LayerScale, `reg_tokens=4`).
    """
    return VisionTransformer(img_size=image_size, patch_size=patch_size, in_chans=in_chans,
                             num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, **kwargs)


def load_timm_model(name: str, image_size: int | None = None, checkpoint: Path | None = None,
                    random_init: bool = False, **kwargs: Any) -> nn.Module:
    """A timm model in eval mode: pretrained from the hub, from a local checkpoint, or randomly initialised.

    Position embeddings are resampled when `image_size` differs from the weights'.
    Raises ValueError with the fix when the model name is unknown or weights cannot be had.
    """
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; list candidates with timm.list_models('vit_*')")
    if checkpoint is not None and random_init:
        raise ValueError("choose either a checkpoint or random initialisation, not both")
    size = {"img_size": image_size} if image_size is not None else {}
    if random_init:
        try:
            return timm.create_model(name, pretrained=False, **size, **kwargs).eval()
        except TypeError as error:
            raise ValueError(f"{name} cannot be built with {size or kwargs} ({error}); "
                             "frugalvit converts timm VisionTransformer models") from error
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: no such checkpoint file")
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(checkpoint)},
                                     **size, **kwargs).eval()
        except (RuntimeError, KeyError, OSError, ValueError) as error:
            raise ValueError(f"{checkpoint}: cannot load into {name} ({str(error).splitlines()[0][:300]})") from error
    try:
        return timm.create_model(name, pretrained=True, **size, **kwargs).eval()
    except Exception as error:  # the hub raises many kinds: offline, not found, HTTP errors
        raise ValueError(f"cannot get pretrained weights for {name} ({type(error).__name__}); with no internet, "
                         "pass a local weights file (--checkpoint FILE) or use random weights (--random-init)"
                         ) from error
