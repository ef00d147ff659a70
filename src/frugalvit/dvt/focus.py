"""Glance, then focus: a two-look cascade over one pretrained timm ViT (frozen; only small heads are learnt).

A resolution cascade (`ResolutionCascade`) pays for more pixels everywhere:
its second look at a small object costs the whole image at a higher
resolution. Here the first stage sees the whole image at a low resolution
(the *glance*), answers what it can, and locates the object (`TokenLocator`:
a score per patch token); the second stage sees only a square crop around
that point, resized to the glance resolution (the *focus*): the same cost as
the glance, with `input_size / crop` times the pixels on the object. Further
stages, if any, see the whole image at higher resolutions, as in a resolution
cascade. This is the glance-and-focus idea (Wang et al., GFNet, NeurIPS 2020,
by DVT's authors) with a fixed crop and a located centre, on a frozen backbone.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torch.nn import functional as F

from frugalvit.data import model_input
from frugalvit.dvt.cascade import resize_bilinear, resize_images
from frugalvit.dvt.exit import EarlyExitCascade
from frugalvit.dvt.resolution import check_backbone, pixel_sizes, register_normalization, tokens_at_resolution
from frugalvit.dvt.stage import stage_in_chans


class TokenLocator(nn.Module):
    """Where the object is: one score per patch token (LayerNorm + a small MLP), the best patch's centre.

    Trained as a classifier over the patch grid (cross-entropy to the patch holding the object's centre) on
    the frozen backbone's final tokens.
    """

    def __init__(self, dim: int, hidden: int = 128, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.score = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, tokens: Tensor) -> Tensor:
        """Final tokens (B, N, D), prefix tokens first -> a score per patch token (B, N - prefix)."""
        return self.score(tokens[:, self.num_prefix_tokens:].to(self.score[0].weight.dtype)).squeeze(-1)

    @staticmethod
    def patch_centers(patch: Tensor, grid: tuple[int, int], image_size: int) -> Tensor:
        """Row-major patch indices (B,) -> their centres (B, 2) as (y, x) in pixels of an `image_size` image."""
        rows = torch.div(patch, grid[1], rounding_mode="floor")
        columns = patch - rows * grid[1]
        return torch.stack([(rows + 0.5) * image_size / grid[0], (columns + 0.5) * image_size / grid[1]], dim=-1)

    def centers(self, tokens: Tensor, grid: tuple[int, int], image_size: int) -> Tensor:
        """The best-scoring patch's centre (B, 2), (y, x) in pixels of the `image_size` input."""
        return self.patch_centers(self(tokens).argmax(dim=-1), grid, image_size)


class SizedTokenLocator(TokenLocator):
    """A `TokenLocator` that also sizes the object: a small MLP on the located patch's token regresses the
    object's side (log, as a fraction of the image side), so the focus crop can follow the object's size.

    Why the located token and not all of them: a regression over the whole
    flattened grid (`BoxLocator`) grows with the grid and, on a frozen ViT-S's
    8x8 grid trained on 4,000 images, located worse than the patch scores;
    the token at the object's centre alone sizes it well (scratch: located /
    true side 0.83-1.44 between the 10th and 90th percentile).
    """

    def __init__(self, dim: int, hidden: int = 128, num_prefix_tokens: int = 1) -> None:
        super().__init__(dim, hidden, num_prefix_tokens)
        self.size = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def log_sides(self, tokens: Tensor, patch: Tensor) -> Tensor:
        """The object's log side as a fraction of the image side (B,), from the token of patch `patch` (B,)."""
        token = tokens[torch.arange(tokens.shape[0], device=tokens.device), self.num_prefix_tokens + patch]
        return self.size(token.to(self.size[0].weight.dtype)).squeeze(-1).float()

    def boxes(self, tokens: Tensor, grid: tuple[int, int], image_size: int) -> tuple[Tensor, Tensor]:
        """The best-scoring patch's centre (B, 2) as (y, x) and the object's side (B,), in image pixels."""
        patch = self(tokens).argmax(dim=-1)
        return self.patch_centers(patch, grid, image_size), self.log_sides(tokens, patch).exp() * image_size


def crop_origin(centers: Tensor, side: int, full: int) -> Tensor:
    """Top-left corners (B, 2) of `side`-pixel squares around `centers` (B, 2), moved inside a `full`-pixel image."""
    return torch.round(centers.float() - side / 2).long().clamp(0, full - side)


def _check_square(images: Tensor) -> None:
    if images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"expected square images (B, C, S, S), got shape {tuple(images.shape)}")


def _matrix_path(images: Tensor, by_matrices: bool | None) -> bool:
    """Whether to resize and crop by matrix products: `by_matrices` when given, else off the CPU."""
    return images.device.type != "cpu" if by_matrices is None else by_matrices


def crop_around(images: Tensor, centers: Tensor, side: int, size: int, dtype: torch.dtype | None = None,
                rows: Tensor | None = None) -> Tensor:
    """Square crops of `side` pixels around `centers` (B, 2) as (y, x), moved inside the image, resized to `size`.

    Bilinear with antialiasing (`resize_images`: uint8 images are cropped and
    resized as uint8 on the CPU, PyTorch's fast path, and come back as floats
    in [0, 1] of `dtype`, default float32; float images keep their dtype); the
    crop's origin is the centre minus half the side, rounded, then clamped so
    the crop stays inside. `rows` (B,): crop these images of `images`, one per
    centre (default: every image, `centers` one per image).
    """
    _check_square(images)
    full = images.shape[-1]
    if not 1 <= side <= full:
        raise ValueError(f"crop side must lie in [1, {full}] (the image side), got {side}")
    count = images.shape[0] if rows is None else rows.shape[0]
    if centers.shape != (count, 2):
        raise ValueError(f"expected one (y, x) centre per cropped image, shape ({count}, 2), got "
                         f"{tuple(centers.shape)}")
    origin = crop_origin(centers, side, full)
    if images.device.type == "cpu":
        crops = squares_by_slicing(images, origin, side, rows, channels_last=images.dtype == torch.uint8)
    else:
        crops = squares_by_gather(images if rows is None else images.index_select(0, rows), origin, side)
    if images.dtype == torch.uint8:
        return resize_images(crops, (size, size), dtype=dtype)
    if side == size:
        return crops
    return resize_bilinear(crops, (size, size))


def squares_by_gather(images: Tensor, origin: Tensor, side: int) -> Tensor:
    """The `side`-pixel squares at `origin` (B, 2) of each image (B, C, H, W): two gathers, no host sync."""
    batch, channels, _, width = images.shape
    offsets = torch.arange(side, device=images.device)
    rows = (origin[:, 0, None] + offsets).view(batch, 1, side, 1).expand(batch, channels, side, width)
    columns = (origin[:, 1, None] + offsets).view(batch, 1, 1, side).expand(batch, channels, side, side)
    return images.gather(2, rows).gather(3, columns)


def squares_by_slicing(images: Tensor, origin: Tensor, side: int, rows: Tensor | None = None,
                       channels_last: bool = False) -> Tensor:
    """`squares_by_gather` by slicing each image: 3-4x faster on the CPU (reads the origins on the host).

    `rows` (B,): the images of `images` to cut, one per origin (default: all, in order), so that a subset is
    cut without first copying its whole images out. `channels_last`: the squares in that memory layout (the
    same values; PyTorch's uint8 anti-aliased resize on the CPU runs about twice as fast from it, its float
    resize slower).
    """
    if origin.shape[0] == 0:
        return images.new_empty(0, images.shape[1], side, side)
    indices = range(origin.shape[0]) if rows is None else rows.tolist()
    layout = (1, 2, 0) if channels_last else (0, 1, 2)  # stacked as (B, S, S, C): channels-last once permuted
    squares = torch.stack([images[i, :, top:top + side, left:left + side].permute(*layout)
                           for i, (top, left) in zip(indices, origin.tolist())])
    return squares.permute(0, 3, 1, 2) if channels_last else squares


class FocusCascade(EarlyExitCascade):
    """Glance (the whole image at `glance` px), focus (a `crop`-px square around the located object, at `glance`
    px), optionally closer looks (`zooms`: smaller squares where the previous look's head points, at `glance`
    px), then optionally the whole image at each of `resolutions` px; per-sample early exit after each.

    Args:
        model: a timm `VisionTransformer` (frozen, shared by every stage) with a plain patch embedding.
        glance: the first two stages' input size (divisible by the patch size).
        crop: the focus crop's side in pixels of the cascade's input (`input_size`).
        heads: one classifier per stage on its final tokens (e.g. `AttentionPoolHead`).
        locator: a module mapping the glance's final tokens to one score per patch (e.g. `TokenLocator`,
            trained on object positions); None: the glance head's own `patch_scores` (e.g. an
            `AttentionPoolHead`'s attention, learnt from class labels alone).
        zooms: sides in input pixels of further crops, each centred where the previous look's head
            points (its `patch_scores`, e.g. an `AttentionPoolHead`); each costs a glance (may be empty).
        crop_sides: with a locator that also sizes the object (`SizedTokenLocator`), the focus crop follows
            it: `margin` x the located side, rounded up to one of these sides or `crop` (the largest it may
            take); empty: the fixed `crop`. Not with zooms.
        resolutions: sizes of the later whole-image stages, increasing (may be empty).
        input_size: side of the images the cascade takes.
        mean / std: per-channel normalisation applied after resizing (callers pass [0, 1] images).
    """

    def __init__(self, model: VisionTransformer, glance: int, crop: int, heads: Sequence[nn.Module],
                 locator: nn.Module | None, input_size: int, resolutions: Sequence[int] = (),
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 zooms: Sequence[int] = (), crop_sides: Sequence[int] = (), margin: float = 1.3) -> None:
        input_size = pixel_sizes([input_size], "input_size")[0]
        sizes = pixel_sizes([glance, *resolutions], "glance and resolutions")
        if sizes[1:] != sorted(set(sizes[1:])):
            raise ValueError(f"resolutions must be strictly increasing, got {list(resolutions)}")
        check_backbone(model, sizes, "sizes", type(self).__name__)
        sides = pixel_sizes([crop, *zooms], "crop and zooms")
        if not all(1 <= side <= input_size for side in sides):
            raise ValueError(f"crop and zooms must lie in [1, input_size={input_size}] pixels, got {sides}")
        stages = 1 + len(sides) + len(resolutions)
        if len(heads) != stages:
            raise ValueError(f"got {len(heads)} heads for {stages} stages (glance, focus, one per zoom, then one per "
                             "resolution)")
        pointing = [head for head in heads[1:len(sides)] if not callable(getattr(head, "patch_scores", None))]
        if pointing:
            raise ValueError(f"a zoom is centred where the previous look's head points: the heads of the focus and "
                             f"every zoom but the last need patch_scores (e.g. AttentionPoolHead), got "
                             f"{type(pointing[0]).__name__}")
        if crop_sides:
            if not callable(getattr(locator, "boxes", None)):
                raise ValueError("crop_sides size the focus crop to the located object: give a locator that sizes "
                                 f"it (SizedTokenLocator), got {type(locator).__name__}")
            if zooms:
                raise ValueError("crop_sides (a sized focus crop) cannot be combined with zooms")
            if not all(1 <= int(side) <= input_size for side in crop_sides) or not margin > 0:
                raise ValueError(f"crop_sides must lie in [1, input_size={input_size}] pixels and margin be > 0, "
                                 f"got {list(crop_sides)} and {margin}")
        if locator is None and not callable(getattr(heads[0], "patch_scores", None)):
            raise ValueError(f"no locator and the glance head ({type(heads[0]).__name__}) has no patch_scores: "
                             "give a locator (e.g. TokenLocator) or a glance head that has one (AttentionPoolHead)")
        channels = model.patch_embed.proj.in_channels
        super().__init__(stages, (channels, int(input_size), int(input_size)))
        self.model, self.locator, self.heads = model, locator, nn.ModuleList(heads)
        self.glance, self.resolutions = int(glance), tuple(int(size) for size in resolutions)
        self.sides = tuple(sides)  # the focus's and every zoom's crop
        # a sized focus crop: the sides it may take (none above `crop`), and the context around the object
        self.crop_sides = tuple(sorted({int(side) for side in crop_sides if side <= crop} | {int(crop)})) \
            if crop_sides else ()
        self.margin = float(margin)
        patch = model.patch_embed.patch_size
        self.grid = (self.glance // patch[0], self.glance // patch[1])
        self.normalized = register_normalization(self, mean, std, channels)

    @property
    def crop(self) -> int:
        """The focus crop's side in input pixels."""
        return self.sides[0]

    def _normalize(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std if self.normalized else images

    def stage_input(self, index: int, images: Tensor, centers: Any = None) -> Tensor:
        """The model's input at stage `index` (normalised): the resized image, or for the focus and the zooms
        the crop around `centers` (B, 2), (y, x) in input pixels (for a sized focus crop, the tuple (centres,
        sides) that `focus_carry` gives)."""
        dtype = next(self.model.parameters()).dtype
        if 1 <= index <= len(self.sides):
            if centers is None:
                raise ValueError("a focus or zoom stage needs the located centres of the look before it")
            images = model_input(images, images.device, dtype)  # uint8 -> [0, 1], as resize_images does
            if self.crop_sides:  # index 1: the focus, sized to the object
                located, sides = centers
                return self._normalize(crop_boxes(images, located, sides * self.margin, self.glance,
                                                  self.crop_sides))
            return self._normalize(crop_around(images, centers, self.sides[index - 1], self.glance))
        size = self.glance if index == 0 else self.resolutions[index - 1 - len(self.sides)]
        return self._normalize(resize_images(images, (size, size), dtype=dtype))

    def run_stage(self, index: int, images: Tensor, carry: Any, hand_on: bool) -> tuple[Tensor, Any]:
        looks = len(self.sides)  # the stages after the glance that crop
        tokens = tokens_at_resolution(self.model, self.stage_input(index, images, carry if index <= looks else None))
        if not hand_on or index >= looks:  # nothing after it, or the next stage sees the whole image
            return self.heads[index](tokens), None
        head = self.heads[index]
        if self.crop_sides:  # the glance hands on boxes: centres and sizes
            return head(tokens), self.focus_carry(tokens)
        if index == 0 and self.locator is not None:
            logits, scores = head(tokens), self.locator(tokens)
        elif callable(getattr(head, "forward_with_patch_scores", None)):  # one pass for both (AttentionPoolHead)
            logits, scores = head.forward_with_patch_scores(tokens)
        else:
            logits, scores = head(tokens), head.patch_scores(tokens)
        return logits, self._centers(index, scores, carry)

    def next_centers(self, index: int, tokens: Tensor, centers: Tensor | None = None) -> Tensor:
        """Where the look after stage `index` goes (B, 2), (y, x) in input pixels, from stage `index`'s final
        tokens: the glance's located object, or where a focus / zoom head points inside its crop (cut around
        `centers`), mapped back to input pixels."""
        scores = (self.locator(tokens) if index == 0 and self.locator is not None
                  else self.heads[index].patch_scores(tokens))
        return self._centers(index, scores, centers)

    def focus_carry(self, tokens: Tensor) -> Any:
        """What the glance hands the focus, from the glance's final tokens: the located centres (B, 2), or for
        a sized focus crop the tuple (centres (B, 2), object sides (B,)), in input pixels."""
        if self.crop_sides:
            assert self.locator is not None
            return self.locator.boxes(tokens, self.grid, self.input_shape[-1])
        return self.next_centers(0, tokens)

    def _centers(self, index: int, scores: Tensor, centers: Tensor | None) -> Tensor:
        """The best-scoring patch of stage `index`'s view, in input pixels (its crop's origin added after a crop)."""
        if index == 0:
            return TokenLocator.patch_centers(scores.argmax(dim=-1), self.grid, self.input_shape[-1])
        side = self.sides[index - 1]
        if centers is None:
            raise ValueError("a focus or zoom stage's centres need the centres its crop was cut around")
        return crop_origin(centers, side, self.input_shape[-1]) + TokenLocator.patch_centers(
            scores.argmax(dim=-1), self.grid, side)


# -- glance and focus with trained models: a box (centre and size) from the glance -----------------------

class BoxLocator(nn.Module):
    """Where the object is and how large: (centre y, centre x, log side) as fractions of the input side, regressed
    by a small MLP from all of a ViT's final patch tokens (LayerNorm per token, flattened).

    Why a box and not a patch: a crop sized to the object puts it on the whole
    token grid whatever its size (a fixed crop cuts large objects and wastes
    tokens on small ones), and a regressed centre is finer than a coarse
    grid's patch centres (a 3x3 grid's patches are a third of the image wide).
    Trained with `loss` on known boxes (`target`), jointly with the glance.
    Suited to small token grids: the flattened MLP grows with the grid (on a
    frozen ViT-S/14's 8x8 grid, trained on 4,000 images, it located digits
    worse than a `TokenLocator`: 16 px median centre error).
    """

    def __init__(self, dim: int, num_patches: int, hidden: int = 256, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens, self.num_patches = num_prefix_tokens, num_patches
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(num_patches * dim, hidden), nn.GELU(), nn.Linear(hidden, 3))

    def forward(self, tokens: Tensor) -> Tensor:
        """Final tokens (B, prefix + num_patches, D) -> (B, 3): centre y, centre x, log side, as fractions."""
        patches = tokens[:, self.num_prefix_tokens:]
        if patches.shape[1] != self.num_patches:
            raise ValueError(f"BoxLocator was built for {self.num_patches} patch tokens, got {patches.shape[1]}")
        patches = self.norm(patches.to(self.norm.weight.dtype))
        return self.mlp(patches.flatten(1)).float()

    @staticmethod
    def target(top: Tensor, left: Tensor, size: Tensor, input_size: int) -> Tensor:
        """Known boxes (top, left, side in pixels of an `input_size` image) -> the regression target (B, 3)."""
        top, left, size = (value.float() for value in (top, left, size))
        return torch.stack([(top + size / 2) / input_size, (left + size / 2) / input_size,
                            torch.log(size / input_size)], dim=-1)

    @staticmethod
    def loss(predicted: Tensor, target: Tensor) -> Tensor:
        """Mean L1 distance over centre and log side (a centre off by 5 % of the image costs 0.05)."""
        return (predicted.float() - target.float()).abs().mean()

    @staticmethod
    def to_pixels(boxes: Tensor, input_size: int) -> tuple[Tensor, Tensor]:
        """(B, 3) fractions -> centres (B, 2) as (y, x) and sides (B,), in pixels of an `input_size` image."""
        return boxes[:, :2].float() * input_size, boxes[:, 2].float().exp() * input_size


def crop_boxes(images: Tensor, centers: Tensor, sides: Tensor, size: int, choices: Sequence[int],
               dtype: torch.dtype | None = None, table: Tensor | None = None,
               by_matrices: bool | None = None) -> Tensor:
    """Square crops around `centers` (B, 2) as (y, x), each of the smallest side in `choices` that holds its
    requested side (B,) (the largest choice where none does), moved inside the image, resized to `size`
    (uint8 images come back as floats in [0, 1] of `dtype`, as from `crop_around`).

    Quantising the side to a few choices keeps each crop an exact, anti-aliased
    resize (`crop_around`) instead of a per-image sampling grid that would
    alias when shrinking. On the CPU each side that occurs is cut for its
    images only (`crops_by_side`); elsewhere every crop is two batched matrix
    products (`crops_by_matrices`: a handful of kernels whatever the sides,
    no host sync; `table`: its weights, built once by the caller, default
    here). `by_matrices` True / False picks a path on any device.
    """
    options = sorted({int(side) for side in choices})
    if not options:
        raise ValueError("crop side choices must not be empty")
    if sides.shape != (images.shape[0],):
        raise ValueError(f"expected one side per image, shape ({images.shape[0]},), got {tuple(sides.shape)}")
    if centers.shape != (images.shape[0], 2):
        raise ValueError(f"expected one (y, x) centre per image, shape ({images.shape[0]}, 2), got "
                         f"{tuple(centers.shape)}")
    # each side's choice: how many choices are smaller (the last one at most), compared with scalars so that
    # nothing is copied to the device (capturable as a CUDA graph)
    requested = sides.float()
    which = torch.zeros(sides.shape, dtype=torch.long, device=sides.device)
    for option in options[:-1]:
        which += requested > float(option)
    out_dtype = (dtype or torch.float32) if images.dtype == torch.uint8 else images.dtype
    if not _matrix_path(images, by_matrices):
        return crops_by_side(images, centers, which, options, size, out_dtype)
    return crops_by_matrices(images, centers, which, options, size, out_dtype, table)


def crops_by_side(images: Tensor, centers: Tensor, which: Tensor, options: Sequence[int], size: int,
                  dtype: torch.dtype) -> Tensor:
    """`crop_boxes`' crops, each side cut for the images that use it (`which`: an index into `options` per image);
    reads which sides occur on the host."""
    out = torch.empty(images.shape[0], images.shape[1], size, size, dtype=dtype, device=images.device)
    for index, side in enumerate(options):
        members = (which == index).nonzero().squeeze(1)
        if members.numel():
            out[members] = crop_around(images, centers[members], side, size, dtype=dtype, rows=members)
    return out


def resize_weights(side: int, size: int, device: torch.device | None = None) -> Tensor:
    """The anti-aliased bilinear resize from `side` to `size` samples as a matrix (side, size): row i holds
    what input sample i contributes to each output sample (PyTorch's own weights, read off by resizing the
    identity), so that `x @ resize_weights(...)` resizes the last axis of x as `F.interpolate` does."""
    identity = torch.eye(side, dtype=torch.float32, device=device).view(1, 1, side, side)
    return F.interpolate(identity, size=(side, size), mode="bilinear", align_corners=False, antialias=True)[0, 0]


@torch.library.custom_op("frugalvit::resize_crops", mutates_args=())
def resize_crops(pixels: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    """rowsᵀ · image · columns for each image: (B, C, S, S) images, (B, S, size) weights -> (B, C, size, size),
    the products of `crops_by_matrices`.

    A registered operator, so that `CostCounter` counts it as it counts
    `F.interpolate`, the CPU's crop resize (nothing): a crop adds no model
    MACs on any device, where plain products would add millions per image.
    """
    return rows.transpose(1, 2)[:, None] @ (pixels @ columns[:, None])


@resize_crops.register_fake
def _resize_crops_fake(pixels: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
    return pixels.new_empty(pixels.shape[0], pixels.shape[1], rows.shape[2], columns.shape[2])


def crop_weight_table(options: Sequence[int], full: int, size: int, device: torch.device | None = None) -> Tensor:
    """(len(options), full, size): for each crop side, its `resize_weights` in the first `side` rows, zeros below
    (what `crops_by_matrices` shifts to each crop's origin; a cascade keeps one as a buffer)."""
    table = torch.zeros(len(options), full, size, dtype=torch.float32, device=device)
    for index, side in enumerate(options):
        table[index, :side] = resize_weights(side, size, device)
    return table


def crops_by_matrices(images: Tensor, centers: Tensor, which: Tensor, options: Sequence[int], size: int,
                      dtype: torch.dtype, table: Tensor | None = None) -> Tensor:
    """`crop_boxes`' crops without a host sync or a loop over the sides: crop and resize are linear, so each
    image's crop is Rᵀ image R', with R and R' (S, size) its side's resize weights (`resize_weights`) shifted
    to its origin's row and column; two batched matrix products for all images (`resize_crops`, which the
    cost counter does not count, as it does not count a resize). `table`: the sides' `crop_weight_table`
    (default: built here).

    The float anti-aliased resize of each crop, returned in `dtype` (uint8 images scaled to [0, 1]):
    computed in float32 to its rounding, or, for a float16 / bfloat16 `dtype`, in that dtype (tensor cores;
    within about two of its rounding steps: `_matrix_resize`). On the CPU `crops_by_side` resizes uint8 as
    uint8, within one grey level of this.
    """
    _check_square(images)
    batch, _, full, _ = images.shape
    device = images.device
    table = crop_weight_table(options, full, size, device) if table is None else table.to(device)
    origin = torch.stack([crop_origin(centers, side, full) for side in options])  # (sides, B, 2)
    origin = origin[which, torch.arange(batch, device=device)]  # each image's own side's origin (B, 2)
    compute = _compute_dtype(dtype)
    weights = table.to(compute)[which]  # (B, S, size)

    def shifted(start: Tensor) -> Tensor:
        """(B, S, size): each image's weights moved down to start at its row `start` (B,), zeros above."""
        offset = torch.arange(full, device=device) - start[:, None]  # the table row each row reads
        moved = weights.gather(1, offset.clamp(min=0)[:, :, None].expand(batch, full, size))
        return moved * (offset >= 0)[:, :, None]

    return _matrix_resize(images, shifted(origin[:, 0]), shifted(origin[:, 1]), dtype)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a matrix resize computes in for output `dtype`: half precision as asked, anything else in float32."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def _matrix_resize(images: Tensor, rows: Tensor, columns: Tensor, dtype: torch.dtype) -> Tensor:
    """rowsᵀ · image · columns for each image (`resize_crops`) in `_compute_dtype(dtype)`, returned in `dtype`;
    uint8 images (exact in any float dtype) are scaled to [0, 1] after the products, on the small outputs.

    In half precision the weights are rounded to it (the products accumulate in float32 on tensor cores), so
    the result is within about two of that dtype's rounding steps of the float32 one: as close as the model's
    own half-precision input can be. Float32 reads and multiplies 2-4x the bytes, without tensor cores.
    """
    compute = _compute_dtype(dtype)
    out = resize_crops(images.to(compute), rows.to(compute), columns.to(compute))
    if images.dtype == torch.uint8:
        out = out * (1.0 / 255.0)
    return out.to(dtype)


def resize_by_matrices(images: Tensor, weights: Tensor, dtype: torch.dtype) -> Tensor:
    """The anti-aliased bilinear resize of square (B, C, S, S) images to (size, size) as Wᵀ X W with
    `weights` W = `resize_weights(S, size)` (S, size), two matrix products for all images, returned in
    `dtype` (uint8 images scaled to [0, 1]; computed as `_matrix_resize` says).

    `F.interpolate`'s result up to rounding, in a few kernels on tensor cores
    off the CPU, where PyTorch's anti-aliased kernel is slow (on an H200 it
    took 0.35 ms of a 3 ms glance-and-focus pass over 1,024 images of 112 px
    in bfloat16). Not counted as MACs, like the resize it replaces.
    """
    _check_square(images)
    if weights.shape[0] != images.shape[-1]:
        raise ValueError(f"resize weights for {weights.shape[0]} px images, got {images.shape[-1]} px; build them "
                         f"with resize_weights({images.shape[-1]}, size)")
    expanded = weights.to(images.device)[None].expand(images.shape[0], *weights.shape)
    return _matrix_resize(images, expanded, expanded, dtype)


def _input_size(vit: VisionTransformer) -> int:
    size = vit.patch_embed.img_size
    if size is None or size[0] != size[1]:
        raise ValueError(f"expected a timm ViT built for a fixed square input, got img_size {size}")
    return int(size[0])


class GlanceFocusCascade(EarlyExitCascade):
    """Glance and focus with trained models: a small ViT (`glance`) sees the whole image at its input size and a
    `BoxLocator` on its tokens says where the object is and how large; a second ViT (`focus`) sees a square crop
    of about that size (`margin` times it, quantised to `crop_sides`) around it, at its own input size; optional
    `later` ViTs see the whole image at theirs. Per-sample early exit after each.

    The stages are plain timm `VisionTransformer`s (e.g. `dvt_stage`, conv stem allowed) built for fixed square
    inputs; each stage costs what its model costs, so a focus as small as the glance doubles the glance's cost
    while putting a small object on all of its tokens.

    Args:
        glance / focus: the first two stages' models (logits from their heads).
        locator: a `BoxLocator` on the glance's final tokens.
        input_size: side of the images the cascade takes (uint8 or float in [0, 1]).
        crop_sides: the crop sides (input pixels) the focus may use.
        margin: crop side / located object side (context around the object).
        later: whole-image stages after the focus (e.g. the full-resolution single model as a last resort).

    Off the CPU the glance's resize and the focus crops are batched matrix products (no host sync: the
    every-stage and within-capacity forms capture as one CUDA graph), on the CPU PyTorch's uint8 resize and
    per-side slices (faster there); set the attribute `by_matrices` to True / False to force either path.
    """

    takes_uint8 = True

    def __init__(self, glance: VisionTransformer, locator: BoxLocator, focus: VisionTransformer, input_size: int,
                 crop_sides: Sequence[int], margin: float = 1.2, later: Sequence[VisionTransformer] = ()) -> None:
        models = [glance, focus, *later]
        sizes = [_input_size(model) for model in models]
        if any(size > input_size for size in sizes):
            raise ValueError(f"stage input sizes {sizes} must not exceed the cascade's input_size {input_size}")
        if not crop_sides or not all(1 <= int(side) <= input_size for side in crop_sides):
            raise ValueError(f"crop_sides must be sides in [1, input_size={input_size}] pixels, got {list(crop_sides)}")
        if not margin > 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        channels = {stage_in_chans(model) for model in models}
        if len(channels) != 1:
            raise ValueError(f"every stage must take the same image channels, got {sorted(channels)}")
        super().__init__(len(models), (channels.pop(), int(input_size), int(input_size)))
        self.glance, self.locator, self.focus = glance, locator, focus
        self.later = nn.ModuleList(later)
        self.sizes = tuple(sizes)
        self.crop_sides = tuple(sorted({int(side) for side in crop_sides}))
        self.margin = float(margin)
        # Off the CPU the crops and the glance's resize are matrix products (`crops_by_matrices`,
        # `resize_by_matrices`): their weights, built once where the models are, follow the cascade's device
        device = next(glance.parameters()).device
        self.register_buffer("crop_weights", crop_weight_table(self.crop_sides, int(input_size), self.sizes[1],
                                                               device), persistent=False)
        self.register_buffer("glance_weights", resize_weights(int(input_size), self.sizes[0], device),
                             persistent=False)
        # None: the matrix paths off the CPU, slicing and PyTorch's resize on it; True / False: on any device
        self.by_matrices: bool | None = None

    def _dtype(self) -> torch.dtype:
        return next(self.glance.parameters()).dtype

    def glance_tokens(self, images: Tensor) -> Tensor:
        """The glance's final tokens on the whole image (resized to its input size)."""
        size, dtype = self.sizes[0], self._dtype()
        if _matrix_path(images, self.by_matrices) and size != images.shape[-1]:
            small = resize_by_matrices(images, self.glance_weights, dtype)
        else:
            small = resize_images(images, (size, size), dtype=dtype)
        return self.glance.forward_features(small)

    def locate(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Centres (B, 2) as (y, x) and object sides (B,) in input pixels, from the glance's final tokens."""
        return BoxLocator.to_pixels(self.locator(tokens), self.input_shape[-1])

    def focus_input(self, images: Tensor, centers: Tensor, sides: Tensor) -> Tensor:
        """The focus's input: `margin` x `sides` crops around `centers` (input pixels), at the focus's size."""
        if images.dtype != torch.uint8:  # uint8 stays uint8 until resized (faster on the CPU)
            images = model_input(images, images.device, self._dtype())
        return crop_boxes(images, centers, sides * self.margin, self.sizes[1], self.crop_sides, self._dtype(),
                          self.crop_weights, self.by_matrices)

    def run_stage(self, index: int, images: Tensor, carry: Any, hand_on: bool) -> tuple[Tensor, Any]:
        if index == 0:
            tokens = self.glance_tokens(images)
            return self.glance.forward_head(tokens), (self.locate(tokens) if hand_on else None)
        if index == 1:
            if carry is None:
                raise ValueError("the focus stage needs the glance's located boxes")
            return self.focus(self.focus_input(images, *carry)), None
        model, size = self.later[index - 2], self.sizes[index]
        return model(resize_images(images, (size, size), dtype=self._dtype())), None
