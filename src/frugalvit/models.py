"""Small timm ViTs this project trains itself (no pretrained weights can be downloaded here)."""

from __future__ import annotations

from timm.models.vision_transformer import VisionTransformer


def small_vit(image_size: int = 28, patch_size: int = 7, in_chans: int = 1, num_classes: int = 10,
              embed_dim: int = 192, depth: int = 6, num_heads: int = 3, **kwargs: object) -> VisionTransformer:
    """The project's reference small ViT: 6 blocks, 192 wide; on MNIST 28 px with 7 px patches (4x4 tokens).

    Extra keyword arguments go to timm's `VisionTransformer` (e.g. `class_token=False,
    global_pool="avg"`, `init_values=1e-5` for LayerScale, `reg_tokens=4`).
    """
    return VisionTransformer(img_size=image_size, patch_size=patch_size, in_chans=in_chans,
                             num_classes=num_classes, embed_dim=embed_dim, depth=depth,
                             num_heads=num_heads, **kwargs)
