"""Training glance and focus (`GlanceFocusCascade`) on images whose objects have known boxes.

The cascade that met the DVT target on the scaled-digits task (docs/dvt.md):
a small ViT glances at the whole image at a low resolution and a `BoxLocator`
on its tokens regresses where the object is and how large; a second small ViT
sees a crop sized to the object at the same resolution. Two phases, each the
library's `train` loop (checkpointed every epoch, resumable):

1. the glance and its locator, jointly: cross-entropy of the glance's class
   logits + `box_weight` x the L1 error of the located box (centre and log
   side, `BoxLocator.loss`) against the recorded one;
2. the focus on the crops the *trained* glance makes of the training images,
   centre and side jittered (so the focus learns the locator's errors too),
   cross-entropy.

`GlanceFocusConfig` rebuilds the untrained cascade from JSON (what a run
directory records); `frugalvit dvt train --kind glance-focus` drives it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from frugalvit.data import Split
from frugalvit.dvt.cascade import check_at_least_one, resize_images
from frugalvit.ioutil import check_fields
from frugalvit.dvt.focus import BoxLocator, GlanceFocusCascade
from frugalvit.dvt.stage import dvt_stage
from frugalvit.training import CHECKPOINT_NAME, TrainConfig, cross_entropy_loss, save_atomically, train

GLANCE_DIR, FOCUS_DIR, PHASE_MODEL = "glance", "focus", "model.pt"


@dataclass(frozen=True)
class GlanceFocusConfig:
    """Everything needed to rebuild an untrained `GlanceFocusCascade` (saved as JSON next to a trained run).

    The defaults are the scaled-digits cascade of docs/dvt.md: 112 px images,
    both looks at 48 px with 16 px patches behind a stride-2 conv stem (3x3
    tokens each), crops 1.2x the located side, rounded up to one of
    `crop_sides`.
    """

    image_size: int = 112
    look_size: int = 48
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 10
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    conv_stem: tuple[int, ...] = (16, 32, 64)
    crop_sides: tuple[int, ...] = (24, 32, 40, 48, 56, 64, 80, 96, 112)
    margin: float = 1.2
    locator_hidden: int = 256

    def __post_init__(self) -> None:
        object.__setattr__(self, "conv_stem", tuple(int(c) for c in self.conv_stem))
        object.__setattr__(self, "crop_sides", tuple(sorted({int(side) for side in self.crop_sides})))
        if self.patch_size < 1 or self.look_size % self.patch_size:
            raise ValueError(f"patch size {self.patch_size} does not divide the look size {self.look_size}; choose "
                             "one that does (e.g. 16 for 48 px)")
        if not 1 <= self.look_size <= self.image_size:
            raise ValueError(f"look size {self.look_size} must lie in [1, image size {self.image_size}]")
        if not self.crop_sides or not all(1 <= side <= self.image_size for side in self.crop_sides):
            raise ValueError(f"crop sides must lie in [1, image size {self.image_size}], got {list(self.crop_sides)}")
        check_at_least_one({"in_chans": self.in_chans, "num_classes": self.num_classes, "embed_dim": self.embed_dim,
                            "depth": self.depth, "num_heads": self.num_heads, "locator_hidden": self.locator_hidden,
                            "conv_stem widths": min(self.conv_stem, default=1)})
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads}")
        if not 0 < self.margin < float("inf"):
            raise ValueError(f"margin must be a finite number > 0, got {self.margin}")

    @property
    def grid(self) -> int:
        """Tokens per side of each look."""
        return self.look_size // self.patch_size

    def stage(self) -> nn.Module:
        """One untrained look: a timm ViT at `look_size` px (drawn from the global RNG, as `build` draws)."""
        return dvt_stage(self.look_size, self.patch_size, self.in_chans, self.num_classes, self.embed_dim,
                         self.depth, self.num_heads, conv_stem=self.conv_stem)

    def build(self) -> GlanceFocusCascade:
        """The untrained cascade: glance, its locator, focus, drawn in that order."""
        glance = self.stage()
        locator = BoxLocator(self.embed_dim, self.grid ** 2, hidden=self.locator_hidden)
        focus = self.stage()
        return GlanceFocusCascade(glance, locator, focus, self.image_size, self.crop_sides, self.margin).eval()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["conv_stem"], data["crop_sides"] = list(self.conv_stem), list(self.crop_sides)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GlanceFocusConfig":
        check_fields(cls, data, "glance-and-focus config")
        return cls(**data)


def box_classification_loss(vit: nn.Module, locator: nn.Module, images: Tensor, targets: Tensor, image_size: int,
                            look_size: int, box_weight: float) -> Tensor:
    """Cross-entropy of `vit` seeing `images` (image_size px, float) resized to `look_size` px + `box_weight` x
    its `locator`'s L1 box error. `targets` (B, 4): label, top, left, side (pixels of the image)."""
    tokens = vit.forward_features(resize_images(images, (look_size, look_size)))
    boxes = BoxLocator.target(targets[:, 1], targets[:, 2], targets[:, 3], image_size)
    return (F.cross_entropy(vit.forward_head(tokens), targets[:, 0])
            + box_weight * BoxLocator.loss(locator(tokens), boxes))


@torch.no_grad()
def focus_training_crops(cascade: GlanceFocusCascade, images: Tensor, jitter: tuple[float, float] = (0.05, 0.1),
                         seed: int = 0, batch_size: int = 1024) -> Tensor:
    """The focus's training inputs: crops where the (trained) glance locates each object, its centre moved by
    N(0, jitter[0] x side) per axis and its side scaled by exp(N(0, jitter[1])), drawn from `seed` batch by
    batch; floats in [0, 1] at the focus's size, on the cascade's device."""
    generator = torch.Generator().manual_seed(seed)
    crops = []
    for start in range(0, images.shape[0], batch_size):
        batch = cascade.prepare_input(images[start:start + batch_size])
        centers, sides = cascade.locate(cascade.glance_tokens(batch))
        count = batch.shape[0]
        shift = torch.randn(count, 2, generator=generator).to(batch.device) * jitter[0] * sides[:, None]
        scale = torch.exp(torch.randn(count, generator=generator) * jitter[1]).to(batch.device)
        crops.append(cascade.focus_input(batch, centers + shift, sides * scale))
    return torch.cat(crops) if crops else images.new_empty(0, cascade.input_shape[0], cascade.sizes[1],
                                                           cascade.sizes[1], dtype=torch.float32)


def train_glance_focus(cascade: GlanceFocusCascade, data: Split, boxes: Tensor, config: TrainConfig,
                       run_dir: Path | None = None, box_weight: float = 5.0,
                       jitter: tuple[float, float] = (0.05, 0.1), progress: bool = True,
                       amp_dtype: torch.dtype | None = None,
                       on_phase: Callable[[str], None] | None = None) -> GlanceFocusCascade:
    """Train `cascade` (in place, on its device) on `data` whose objects lie at `boxes` (N, 3): top, left, side
    in pixels of the image, one row per training image.

    Phase 1 trains the glance and locator (`box_classification_loss`), phase 2
    the focus on `focus_training_crops` of the trained glance (jitter drawn
    from `config.seed` + 1). With `run_dir`, each phase checkpoints every
    epoch in its own folder (`glance/`, `focus/`) and leaves its weights there
    when done, so an interrupted run resumes where it stopped.
    `on_phase(name)` is called as each phase starts (e.g. to print it).
    """
    boxes = torch.as_tensor(boxes)
    if boxes.shape != (len(data), 3):
        raise ValueError(f"expected one box (top, left, side) per training image, shape ({len(data)}, 3), got "
                         f"{tuple(boxes.shape)}")
    if tuple(data.images.shape[1:]) != tuple(cascade.input_shape):
        raise ValueError(f"the cascade takes images {tuple(cascade.input_shape)}, the data has "
                         f"{tuple(data.images.shape[1:])}; build it with the data's image size")
    device = next(cascade.parameters()).device
    image_size, look_size = cascade.input_shape[-1], cascade.sizes[0]
    top, left, side = boxes.double().unbind(1)
    if len(data) and not bool(((side >= 1) & (top >= 0) & (left >= 0) & (top + side <= image_size)
                               & (left + side <= image_size)).all()):
        raise ValueError(f"every box (top, left, side) must have a side >= 1 and lie inside the {image_size} px "
                         "image")
    table = torch.cat([data.labels.reshape(-1, 1).long(), boxes.long()], dim=1).to(device)
    glance = nn.ModuleDict({"vit": cascade.glance, "locator": cascade.locator})  # the same modules, trained in place

    def glance_loss(model: nn.Module, images: Tensor, rows: Tensor) -> Tensor:
        return box_classification_loss(model["vit"], model["locator"], images, table[rows], image_size, look_size,
                                        box_weight)

    rows = Split(data.images, torch.arange(len(data)))  # the loop hands on row numbers: the loss reads the boxes
    targets = {"label_sum": int(data.labels.sum()), "box_sum": int(boxes.long().sum()),  # what the rows stand for
               "box_weighted_sum": int((boxes.long() * torch.arange(1, len(data) + 1)[:, None]).sum())}
    _phase(GLANCE_DIR, glance, rows, config, run_dir, glance_loss, progress, amp_dtype, on_phase,
           depends_on={"targets": targets, "box_weight": box_weight})
    cascade.eval()
    trained = data.subset(config.max_train_samples)  # the images phase 1 trained on
    focus_data = Split(focus_training_crops(cascade, trained.images, jitter, config.seed + 1), trained.labels)
    _phase(FOCUS_DIR, cascade.focus, focus_data, replace(config, max_train_samples=None), run_dir,
           cross_entropy_loss, progress, amp_dtype, on_phase, depends_on={"jitter": list(jitter)})
    return cascade.eval()


def _phase(name: str, model: nn.Module, data: Split, config: TrainConfig, run_dir: Path | None,
           loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor], progress: bool, amp_dtype: torch.dtype | None,
           on_phase: Callable[[str], None] | None, depends_on: dict[str, Any]) -> None:
    """One phase, trained in `run_dir/name` (resuming its checkpoint; a finished phase's checkpoint holds its
    final weights, so a re-run checks that it belongs to these settings and data and trains nothing). A folder
    with the phase's weights but no checkpoint (an older run) is loaded as it is."""
    folder = run_dir / name if run_dir is not None else None
    finished = folder is not None and (folder / PHASE_MODEL).is_file()
    if finished and not (folder / CHECKPOINT_NAME).is_file():
        model.load_state_dict(torch.load(folder / PHASE_MODEL, map_location=next(model.parameters()).device))
        return
    if on_phase is not None and not finished:
        on_phase(name)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    train(model, data, config, folder, loss_fn=loss_fn, progress=progress, amp_dtype=amp_dtype,
          depends_on=depends_on)
    if folder is not None and not finished:
        save_atomically({key: value.cpu() for key, value in model.state_dict().items()}, folder / PHASE_MODEL)
