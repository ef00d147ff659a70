"""Token selection policies: which tokens a gate recomputes this frame.

A policy sees the L2 norm of every token's error (reference minus current,
shape (B, N)) and returns the indices to update, shape (B, M), ascending.
Every sample of a batch updates the same number M of tokens (the largest any
sample asks for), so the batch stays one dense tensor.

Write your own by subclassing `TokenPolicy` and implementing `count` (how many
tokens to update per sample); `select` then takes the M largest errors. For a
selection that is not "the M largest errors", override `select` itself.
Policies are plain values: assign a new one to the model between any two
frames (`ev.policy = TopR(64)`) to change the budget at run time.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from frugalvit.kernels import top_k_ascending


class TokenPolicy(ABC):
    """Chooses, from per-token error norms (B, N), the tokens to recompute.

    `relative` (a class attribute) says which error the gate hands over: False,
    the L2 norm of (reference - current); True, that norm divided by the
    reference token's own norm, a scale-free change that means the same in
    every layer although token norms grow several-fold with depth.
    """

    relative: bool = False
    # True where the count depends only on the token count, not on the data: such a frame has fixed shapes,
    # needs no host synchronisation and can be captured as a CUDA graph.
    fixed_size: bool = False

    def may_select_fewer_than(self, share: float, num_tokens: int) -> bool:
        """Whether a frame may update at most `share` of `num_tokens` (so attention would run incrementally).

        A full frame keeps the attention sums only when this holds, since
        building them costs more wall time than the fused kernel.
        """
        return True

    @abstractmethod
    def count(self, error_norms: Tensor) -> int:
        """How many tokens each sample updates (0..N)."""

    def select(self, error_norms: Tensor) -> Tensor:
        """Indices (B, M), ascending within each sample, of the M tokens with the largest errors."""
        num_tokens = error_norms.shape[-1]
        count = self.count(error_norms)
        if not 0 <= count <= num_tokens:
            raise ValueError(f"{self!r} selected {count} tokens; it must select between 0 and {num_tokens}")
        if count == num_tokens:
            return torch.arange(num_tokens, device=error_norms.device).expand(error_norms.shape[0], -1)
        return top_k_ascending(error_norms, count)  # one fused kernel on CUDA


def is_real(value: object) -> bool:
    """A real number (Python or NumPy), not a bool: what a share, a threshold or a ratio setting may be."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_whole(value: object) -> bool:
    """A whole number (Python or NumPy), not a bool: what a token or frame count may be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class TopR(TokenPolicy):
    """Update the `r` tokens with the largest error: a fixed compute budget per frame."""

    r: int
    fixed_size = True

    def __post_init__(self) -> None:
        if not is_whole(self.r) or self.r < 0:
            raise ValueError(f"TopR(r={self.r!r}): r must be a non-negative integer number of tokens")
        object.__setattr__(self, "r", int(self.r))  # a NumPy integer too

    def may_select_fewer_than(self, share: float, num_tokens: int) -> bool:
        return self.r <= share * num_tokens

    def count(self, error_norms: Tensor) -> int:
        num_tokens = error_norms.shape[-1]
        if self.r > num_tokens:
            raise ValueError(f"TopR(r={self.r}) asks for more tokens than the {num_tokens} this layer has; "
                             f"use r <= {num_tokens} or TopFraction")
        return self.r


@dataclass(frozen=True)
class TopFraction(TokenPolicy):
    """Update the `fraction` of tokens (rounded up) with the largest error; independent of input size."""

    fraction: float
    fixed_size = True

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"TopFraction(fraction={self.fraction!r}): fraction must lie in [0, 1]")

    def may_select_fewer_than(self, share: float, num_tokens: int) -> bool:
        return self._count(num_tokens) <= share * num_tokens

    def count(self, error_norms: Tensor) -> int:
        return self._count(error_norms.shape[-1])

    def _count(self, num_tokens: int) -> int:
        """ceil(fraction x N), exact where the product is whole (0.14 x 50 is 7.000000000000001 in floats)."""
        return min(num_tokens, math.ceil(self.fraction * num_tokens - 1e-9))


@dataclass(frozen=True)
class Threshold(TokenPolicy):
    """Update every token whose error norm exceeds `threshold`: compute follows the amount of change."""

    threshold: float

    def __post_init__(self) -> None:
        if isinstance(self.threshold, bool) or not self.threshold >= 0.0:
            raise ValueError(f"Threshold(threshold={self.threshold!r}): threshold must be >= 0")

    def count(self, error_norms: Tensor) -> int:
        return _count_above(error_norms, self.threshold)


@dataclass(frozen=True)
class RelativeThreshold(TokenPolicy):
    """Update every token that moved by more than `threshold` times its own norm since it was last computed.

    One value means the same at every gate (token norms grow from about 1 to
    about 10 over a DINOv2 ViT-S, so an absolute `Threshold` updates almost
    nothing early and almost everything late). Compute follows the content:
    a still frame costs next to nothing, a pan or a cut costs up to a dense
    frame. With real weights on real video this is the setting that beats
    keyframe-and-hold at equal mean MACs (docs/eventful.md). Like `Threshold`,
    the count is data-dependent: one host sync per gate.
    """

    threshold: float
    relative = True

    def __post_init__(self) -> None:
        if not self.threshold >= 0.0:
            raise ValueError(f"RelativeThreshold(threshold={self.threshold!r}): threshold must be >= 0 "
                             "(a share of each token's norm, e.g. 0.2)")

    def count(self, error_norms: Tensor) -> int:
        return _count_above(error_norms, self.threshold)


def _count_above(error_norms: Tensor, threshold: float) -> int:
    """The largest number of tokens of any sample whose error exceeds `threshold` (one host sync)."""
    return int((error_norms > threshold).sum(dim=-1).max().item()) if error_norms.numel() else 0


def parse_policy(spec: str) -> TokenPolicy:
    """Parse `topr:R` (R tokens, a whole number), `fraction:F`, `threshold:H`, `relative:T`; `topr:F` (0 < F < 1) is `fraction:F`.

    A token count written as a decimal (`topr:1.0`, `topr:64.0`) is rejected:
    it is ambiguous between one token and all of them.
    """
    name, _, value = spec.partition(":")
    name = name.strip().lower()
    if not value:
        raise ValueError(f"policy {spec!r}: expected NAME:VALUE, e.g. topr:64, fraction:0.25, threshold:0.1")
    try:
        number = float(value)
    except ValueError as error:
        raise ValueError(f"policy {spec!r}: {value!r} is not a number") from error
    if name == "topr":
        if 0.0 < number < 1.0:  # kept for old command lines; fraction:F says it explicitly
            return TopFraction(number)
        if not value.strip().lstrip("+").isdigit():
            raise ValueError(f"policy {spec!r}: topr takes a whole number of tokens (e.g. topr:64); "
                             f"for a share of the tokens use fraction:F (fraction:1 = all tokens)")
        return TopR(int(number))
    if name in ("fraction", "topfraction"):
        return TopFraction(number)
    if name == "threshold":
        return Threshold(number)
    if name in ("relative", "relthreshold"):
        return RelativeThreshold(number)
    raise ValueError(f"unknown policy {name!r} in {spec!r}: use topr:R, fraction:F, threshold:H or relative:T")
