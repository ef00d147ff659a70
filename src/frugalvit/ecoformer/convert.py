"""Convert a ViT's attention layers to EcoFormer hashed attention, and back (layers swapped by `frugalvit.timm`)."""

from __future__ import annotations

import copy
from typing import Literal, Sequence

from torch import nn
from timm.layers import Attention

from frugalvit.ecoformer.attention import EcoFormerAttention, Normaliser
from frugalvit.timm import replace_modules


def convertible_layers(model: nn.Module) -> list[str]:
    """Names of the timm `Attention` layers (subclasses included) of `model` that `ecoformer` can convert, in order."""
    return [name for name, module in model.named_modules()
            if isinstance(module, Attention) and not isinstance(module, EcoFormerAttention)]


def ecoformer_layers(model: nn.Module) -> dict[str, EcoFormerAttention]:
    """The converted attention layers of `model`, by name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, EcoFormerAttention)}


def ecoformer(model: nn.Module, bits: int = 16, anchors: int = 25, layers: Sequence[int | str] | None = None,
              bias: float | None = None, normaliser: Normaliser = "consistent",
              init: Literal["mean", "query", "key"] = "mean", inplace: bool = False) -> nn.Module:
    """Replace attention layers of a timm ViT by EcoFormer hashed linear attention.

    Args:
        model: a timm model with `timm.layers.Attention` layers or subclasses of it (ViT, DeiT, ...).
        bits: hash code length b per head (1..64).
        anchors: number m of RBF anchor tokens per head (2..4096).
        layers: which attention layers to convert, as indices into
            `convertible_layers(model)` or module names; None converts all.
        bias: similarity offset (> bits); None takes b + 1, the smallest that
            keeps similarities positive (as in the authors' code; the paper's
            power of two is `paper_bias(bits)`).
        normaliser: "consistent" (weights sum to one, paper Eq. 9) or "authors"
            (the released code's formula); see `frugalvit.ecoformer.attention`.
        init: tied query/key projection initialised from the mean of the
            pretrained query and key weights, or from one of them.
        inplace: modify `model` itself; by default a deep copy is converted and
            `model` is left untouched.

    Returns:
        The converted model. Its hash functions are not fitted yet: call
        `frugalvit.fit_hashes(model, images)` before using it.
    """
    candidates = convertible_layers(model)
    if not candidates:
        found = sorted({type(m).__name__ for m in model.modules() if "attn" in type(m).__name__.lower()})
        already = " (it is already converted)" if ecoformer_layers(model) else ""
        raise ValueError(f"model has no timm Attention layer to convert{already}; attention-like modules found: "
                         f"{found or 'none'}. EcoFormer converts timm.layers.Attention (ViT, DeiT, ...)")
    if layers is None:
        chosen = candidates
    elif isinstance(layers, (str, int)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"layers must be a list of attention layer indices or names (e.g. [0, 1] or "
                         f"[{candidates[0]!r}]), got {layers!r}")
    else:
        chosen = []
        for item in layers:
            if isinstance(item, int) and not isinstance(item, bool):
                if not -len(candidates) <= item < len(candidates):
                    raise ValueError(f"layer index {item} out of range: the model has {len(candidates)} "
                                     f"convertible attention layers")
                chosen.append(candidates[item])
            elif isinstance(item, str) and item in candidates:
                chosen.append(item)
            else:
                raise ValueError(f"{item!r} is not a convertible attention layer; choose indices or names "
                                 f"from {candidates}")
        if not chosen:
            raise ValueError("layers is empty: name at least one attention layer to convert, or pass None for all")
    target = model if inplace else copy.deepcopy(model)
    selected = set(chosen)
    replace_modules(target, lambda name, _: name in selected,
                    lambda _, layer: EcoFormerAttention(layer, bits=bits, anchors=anchors, bias=bias,
                                                        normaliser=normaliser, init=init))
    return target


def remove_ecoformer(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The inverse of `ecoformer`: attention layers of the original class with the (possibly fine-tuned) weights.

    `inplace` as in `ecoformer`.
    """
    if not ecoformer_layers(model):
        raise ValueError("model has no EcoFormer attention layer to remove")
    target = model if inplace else copy.deepcopy(model)
    replace_modules(target, lambda _, layer: isinstance(layer, EcoFormerAttention), lambda _, layer: layer.to_source())
    return target
