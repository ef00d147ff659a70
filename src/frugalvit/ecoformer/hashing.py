"""Kernelized binary hash functions of EcoFormer, as pure functions.

A token `x` (one head, L2-normalised) is mapped to `b` bits by
`h(x) = sign(W (k(x) - mu))`, where `k_j(x) = exp(-||x - a_j||^2 / (2 sigma))`
is an RBF kernel against `m` anchor tokens `a_j`, `mu` centres the kernel
features on calibration data, and `W` (b x m) holds the hash functions. Codes
are exactly +-1 (sign(0) is +1) so that products with them are additions and
subtractions. The sign has a straight-through gradient (that of hard-tanh), so
the projection that produces `x` can still be trained.

Shapes: tokens `(..., H, N, D)`, anchors `(H, m, D)`, bandwidth `(H,)`,
mean `(H, m)`, weights `(H, b, m)`; H heads, N tokens, D head width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class _SignSTE(torch.autograd.Function):
    """sign with +1 at zero; backward passes the gradient where |u| <= 1 (hard-tanh)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, u: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(u)
        return (u >= 0).to(u.dtype) * 2 - 1

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (u,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return grad * (u.abs() <= 1).to(grad.dtype)


def sign_ste(u: Tensor) -> Tensor:
    """Exactly +-1 codes of `u` (+1 where u >= 0), with the straight-through hard-tanh gradient."""
    return _SignSTE.apply(u)


def l2_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Unit-length vectors along the last dimension (zero vectors stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def rbf_features(tokens: Tensor, anchors: Tensor, bandwidth: Tensor) -> Tensor:
    """RBF kernel of every token against every anchor of its head: `(..., H, N, m)`.

    Squared distances come from `||x||^2 + ||a||^2 - 2 x.a`, one matrix
    product; the `(N, m, D)` difference tensor is never formed.
    """
    dot = torch.matmul(tokens, anchors.transpose(-1, -2))
    squared = (tokens * tokens).sum(-1, keepdim=True) + (anchors * anchors).sum(-1).unsqueeze(-2) - 2 * dot
    return torch.exp(-squared.clamp_min(0) / (2 * bandwidth)[:, None, None])


def hash_projection(tokens: Tensor, anchors: Tensor, bandwidth: Tensor, mean: Tensor, weights: Tensor) -> Tensor:
    """Real-valued hash activations `W (k(x) - mu)` before the sign: `(..., H, N, b)`."""
    features = rbf_features(tokens, anchors, bandwidth) - mean.unsqueeze(-2)
    return torch.matmul(features, weights.transpose(-1, -2))


def hash_codes(tokens: Tensor, anchors: Tensor, bandwidth: Tensor, mean: Tensor, weights: Tensor) -> Tensor:
    """Binary codes in {-1, +1}: `(..., H, N, b)`, differentiable through the straight-through sign."""
    return sign_ste(hash_projection(tokens, anchors, bandwidth, mean, weights))


def paper_bias(bits: int) -> int:
    """The paper's similarity offset 2^c with c = ceil(log2(b + 1)): the smallest power of two above b.

    Like any offset above b it keeps every similarity `H(q)^T H(k) + bias`
    (which lies in [-b, b] + bias) strictly positive; multiplying by a power of
    two is a bit shift. The library default is b + 1 (the authors' code), which
    allows a wider range of attention weights; see docs/ecoformer.md.
    """
    return 2 ** math.ceil(math.log2(bits + 1))


def hamming_distance(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise Hamming distances between the rows of two +-1 code matrices `(..., N, b)`, `(..., M, b)`."""
    return (a.unsqueeze(-2) != b.unsqueeze(-3)).sum(-1)
