"""Feature and relationship reuse between consecutive cascade stages (DVT, section 3.3 of the paper).

Two pure functions resize token-grid data between stages with different
grids; two small modules turn an upstream stage's output into what the
downstream stage consumes:

* `FeatureReuse`: upstream final tokens (before the final norm) -> LN + MLP
  (D_up -> D') -> grid resize -> a "context embedding" per downstream token,
  zeros at the prefix (class) tokens. Concatenated to every downstream MLP input.
* `RelationReuse`: all upstream attention logits (L_up x H_up maps) -> 1x1
  convs with GELU -> one map per downstream layer and head -> row-wise grid
  resize -> added to the downstream attention logits.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

Grid = tuple[int, int]


def linear_resize_matrix(source: int, target: int, device: torch.device | None = None,
                         dtype: torch.dtype | None = None) -> Tensor:
    """(target, source) weights of a 1-D linear resize as `F.interpolate` (align_corners=False) computes them.

    Bilinear resizing is this along each grid axis, so a grid is resized by
    two small matmuls. Matmuls, because CUDA's upsampling kernels run one
    thread per output pixel over all batch x channel planes: on a (batch x
    maps) stack of 5x5 grids that took 4x a whole DVT training step on an H200.
    """
    basis = torch.eye(source, device=device, dtype=torch.float32)[:, None]
    weights = F.interpolate(basis, size=target, mode="linear", align_corners=False)[:, 0].T
    return weights.to(dtype) if dtype is not None else weights


def _resize_last_axis(values: Tensor, source: Grid, target: Grid) -> Tensor:
    """Resize the last axis (a flattened H*W grid) of `values` to H'*W', bilinearly (separable)."""
    rows = linear_resize_matrix(source[0], target[0], values.device, values.dtype)
    columns = linear_resize_matrix(source[1], target[1], values.device, values.dtype)
    # both as one large 2-D matmul each (flattened explicitly: a strided view would make torch.matmul expand
    # the small matrix into a batch of tiny products, 7x slower on the CPU)
    grid = values.reshape(-1, source[1]) @ columns.T  # (L*h, w')
    grid = grid.reshape(-1, source[0], target[1]).transpose(1, 2).reshape(-1, source[0]) @ rows.T  # (L*w', h')
    grid = grid.reshape(-1, target[1], target[0]).transpose(1, 2)  # (L, h', w')
    return grid.reshape(*values.shape[:-1], target[0] * target[1])


def resize_token_grid(tokens: Tensor, source: Grid, target: Grid) -> Tensor:
    """Resize (..., H*W, C) grid tokens to (..., H'*W', C) by bilinear interpolation on the grid."""
    if tuple(source) == tuple(target):
        return tokens
    if tokens.shape[-2] != source[0] * source[1]:
        raise ValueError(f"expected {source[0]}x{source[1]}={source[0] * source[1]} tokens, got {tokens.shape[-2]}")
    return _resize_last_axis(tokens.transpose(-1, -2), source, target).transpose(-1, -2)


def resize_attention_rows(maps: Tensor, source: Grid, target: Grid, num_prefix_tokens: int = 0) -> Tensor:
    """Resize (B, C, N, N) token-to-token maps from a `source` token grid to a `target` grid.

    Each row holds one query's relation to all keys, so it is reshaped to the
    key grid, resized and flattened; the same is done over the query axis.
    A naive 2-D resize of the N x N map would mix unrelated grid positions.
    Prefix (class/register) rows and columns are kept as they are; the prefix
    block of a row is not resized, only its grid part.
    """
    p = num_prefix_tokens
    n_source = p + source[0] * source[1]
    if maps.shape[-1] != n_source or maps.shape[-2] != n_source:
        raise ValueError(f"expected maps over {n_source} tokens ({p} prefix + {source[0]}x{source[1]}), "
                         f"got shape {tuple(maps.shape)}")
    if tuple(source) == tuple(target):
        return maps
    columns = torch.cat([maps[..., :p], _resize_last_axis(maps[..., p:], source, target)], dim=-1)
    rows = columns.transpose(-1, -2)
    rows = torch.cat([rows[..., :p], _resize_last_axis(rows[..., p:], source, target)], dim=-1)
    return rows.transpose(-1, -2)


class FeatureReuse(nn.Module):
    """Context embedding for a downstream stage from the upstream stage's final tokens."""

    def __init__(self, upstream_dim: int, context_dim: int, upstream_grid: Grid, downstream_grid: Grid,
                 upstream_prefix: int = 1, downstream_prefix: int = 1, hidden_dim: int | None = None) -> None:
        super().__init__()
        self.upstream_grid, self.downstream_grid = tuple(upstream_grid), tuple(downstream_grid)
        self.upstream_prefix, self.downstream_prefix = upstream_prefix, downstream_prefix
        self.context_dim = context_dim
        self.norm = nn.LayerNorm(upstream_dim, eps=1e-6)
        self.mlp = Mlp(upstream_dim, hidden_dim or upstream_dim, context_dim)
        nn.init.zeros_(self.mlp.fc2.weight)  # starts as a no-op, so joint training starts from plain stages
        nn.init.zeros_(self.mlp.fc2.bias)

    def forward(self, upstream_tokens: Tensor) -> Tensor:
        """(B, P_up + H*W, D_up) tokens -> (B, P_down + H'*W', D') context, zeros at the prefix."""
        patches = upstream_tokens[:, self.upstream_prefix:]
        context = resize_token_grid(self.mlp(self.norm(patches)), self.upstream_grid, self.downstream_grid)
        prefix = context.new_zeros(context.shape[0], self.downstream_prefix, self.context_dim)
        return torch.cat([prefix, context], dim=1)


class RelationReuse(nn.Module):
    """Attention-logit bias for every downstream layer from all upstream attention logits."""

    def __init__(self, upstream_maps: int, downstream_depth: int, downstream_heads: int, upstream_grid: Grid,
                 downstream_grid: Grid, num_prefix_tokens: int = 1, hidden_channels: int | None = None) -> None:
        super().__init__()
        self.upstream_grid, self.downstream_grid = tuple(upstream_grid), tuple(downstream_grid)
        self.num_prefix_tokens = num_prefix_tokens
        self.downstream_depth, self.downstream_heads = downstream_depth, downstream_heads
        out_channels = downstream_depth * downstream_heads
        hidden = hidden_channels or out_channels
        self.transform = nn.Sequential(nn.Conv2d(upstream_maps, hidden, 1), nn.GELU(),
                                       nn.Conv2d(hidden, out_channels, 1))
        nn.init.zeros_(self.transform[-1].weight)  # starts as a no-op
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, upstream_logits: Sequence[Tensor]) -> list[Tensor]:
        """L_up tensors (B, H_up, N_up, N_up) -> L_down tensors (B, H_down, N_down, N_down)."""
        maps = self.transform(torch.cat(list(upstream_logits), dim=1))
        maps = resize_attention_rows(maps, self.upstream_grid, self.downstream_grid, self.num_prefix_tokens)
        return list(maps.split(self.downstream_heads, dim=1))
