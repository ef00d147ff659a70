"""DVT (Dynamic Vision Transformer): cascades of ViTs with few tokens first and real per-sample early exit.

* `DVTCascade` / `DVTConfig` / `dvt_cascade`: trained cascades with feature and relationship reuse.
* `ResolutionCascade`: a training-free cascade over one pretrained timm ViT at increasing resolutions
  (with `TokenPoolHead` or `AttentionPoolHead` heads per resolution for a head-less backbone).
* `FocusCascade`: glance then focus over one pretrained ViT: the whole image at a low resolution, then a
  crop around the object it located (`TokenLocator`, `crop_around`) at the same cost.
* `GlanceFocusCascade`: glance and focus with trained models: a small ViT on the whole image, a `BoxLocator`
  (centre and size) on its tokens, a second small ViT on a crop sized to the object (`crop_boxes`);
  `GlanceFocusConfig` / `train_glance_focus` build and train it on images with recorded boxes.
* `thresholds`: pure threshold searches for a mean-MACs budget (exact, geometric rule, genetic).
"""

from frugalvit.dvt.cascade import DVTCascade, DVTConfig, cascade_loss, dvt_cascade, resize_images
from frugalvit.dvt.exit import Calibration, CascadeOutput, EarlyExitCascade
from frugalvit.dvt.focus import (BoxLocator, FocusCascade, GlanceFocusCascade, SizedTokenLocator, TokenLocator,
                                crop_around, crop_boxes)
from frugalvit.dvt.glance_training import GlanceFocusConfig, train_glance_focus
from frugalvit.dvt.resolution import (AttentionPoolHead, ResolutionCascade, TokenPoolHead, tokens_at_resolution,
                                     vit_at_resolution)
from frugalvit.dvt.reuse import FeatureReuse, RelationReuse, resize_attention_rows, resize_token_grid
from frugalvit.dvt.stage import ConvStemEmbed, ReuseBlock, attention_with_bias, dvt_stage, stage_forward
from frugalvit.dvt.thresholds import (ExitResult, evaluate_thresholds, genetic_search, geometric_search,
                                      geometric_thresholds, search_thresholds)

__all__ = [
    "AttentionPoolHead", "BoxLocator", "Calibration", "CascadeOutput", "ConvStemEmbed", "DVTCascade", "DVTConfig",
    "EarlyExitCascade", "ExitResult", "FeatureReuse", "FocusCascade", "GlanceFocusCascade", "GlanceFocusConfig",
    "RelationReuse", "ResolutionCascade", "ReuseBlock", "SizedTokenLocator", "TokenLocator", "TokenPoolHead",
    "attention_with_bias", "crop_around", "crop_boxes", "cascade_loss", "dvt_cascade", "dvt_stage",
    "evaluate_thresholds", "genetic_search", "geometric_search", "geometric_thresholds", "resize_attention_rows",
    "resize_images", "resize_token_grid", "search_thresholds", "stage_forward", "tokens_at_resolution",
    "train_glance_focus", "vit_at_resolution",
]
