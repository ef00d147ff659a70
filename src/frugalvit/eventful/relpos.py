"""Decomposed relative positions (MViTv2, SAM, ViTDet) as logit terms the incremental attention can update.

On an (H, W) grid, the logit of query i (row r_i, column c_i) and key j gains
  q_i . T_h[r_i, r_j] + q_i . T_w[c_i, c_j]
with tables T_h (H, H, Dh) and T_w (W, W, Dh) and the query before scaling.
The term depends on the query and only the key's position, so per query row
it is two short vectors, rel_h[i] = (q_i . T_h[r_i, r])_r of length H and
rel_w[i] of length W, and a key's term is one entry of each. Caching them per
row (float32, (B, heads, N, H + W), a fraction of q's size when H, W << Dh *
N) lets the incremental path read the terms of M changed columns for all N
rows at the cost of a gather, and recompute only the changed rows'.
"""

from __future__ import annotations

import torch
from torch import Tensor

from frugalvit.eventful.gates import Selection, scatter_tokens_, store_


def _row_terms(q: Tensor, height_rows: Tensor, width_rows: Tensor) -> tuple[Tensor, Tensor]:
    """(rel_h (B, H, R, Hg), rel_w (B, H, R, Wg)) for queries q (B, H, R, Dh) with their per-row tables."""
    q = q.float()
    return (torch.einsum("bnrc,brkc->bnrk", q, height_rows.float()),
            torch.einsum("bnrc,brkc->bnrk", q, width_rows.float()))


def _expand(rel_h: Tensor, rel_w: Tensor) -> Tensor:
    """(..., Hg) and (..., Wg) -> (..., Hg * Wg): the term of every key in row-major grid order."""
    return (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).flatten(-2)


def _grid_terms(q: Tensor, height: Tensor, width: Tensor) -> tuple[Tensor, Tensor]:
    """(rel_h (B, H, N, Hg), rel_w (B, H, N, Wg)) float32 for queries q (B, H, N, Dh) covering the whole grid."""
    grid_h, grid_w = height.shape[0], width.shape[0]
    batch, heads, _, dim = q.shape
    grid_q = q.float().reshape(batch, heads, grid_h, grid_w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, height.float()).reshape(batch, heads, grid_h * grid_w, grid_h)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, width.float()).reshape(batch, heads, grid_h * grid_w, grid_w)
    return rel_h, rel_w


def decomposed_bias(q: Tensor, height: Tensor, width: Tensor) -> Tensor:
    """(B, H, N, N) float32 terms for queries q (B, H, N, Dh) on the whole (Hg, Wg) grid, no caching."""
    return _expand(*_grid_terms(q, height, width))


class DecomposedRelativeBias:
    """`LogitBias` of one attention layer over a fixed grid, with the per-row terms cached between frames."""

    def __init__(self, height: Tensor, width: Tensor) -> None:
        self.height, self.width = height, width  # (Hg, Hg, Dh), (Wg, Wg, Dh)
        grid_w = width.shape[0]
        tokens = torch.arange(height.shape[0] * grid_w, device=height.device)
        self.row_of, self.column_of = tokens // grid_w, tokens % grid_w  # (N,) grid position of each token
        self.rel_h: Tensor | None = None  # (B, H, N, Hg) float32
        self.rel_w: Tensor | None = None  # (B, H, N, Wg)

    def state_tensors(self) -> list[Tensor]:
        return [t for t in (self.rel_h, self.rel_w) if t is not None]

    def full(self, q: Tensor) -> Tensor:
        rel_h, rel_w = _grid_terms(q, self.height, self.width)
        self.rel_h, self.rel_w = store_(self.rel_h, rel_h), store_(self.rel_w, rel_w)
        return _expand(self.rel_h, self.rel_w)

    def rows(self, q: Tensor, selection: Selection) -> Tensor:
        rel_h, rel_w = _row_terms(q, self.height[self.row_of[selection.indices]],
                                  self.width[self.column_of[selection.indices]])
        scatter_tokens_(self.rel_h, selection, rel_h)
        scatter_tokens_(self.rel_w, selection, rel_w)
        return _expand(rel_h, rel_w)

    def columns(self, selection: Selection) -> Tensor:
        batch, heads, num_tokens, _ = self.rel_h.shape
        rows = self.row_of[selection.indices][:, None, None, :].expand(batch, heads, num_tokens, -1)
        columns = self.column_of[selection.indices][:, None, None, :].expand(batch, heads, num_tokens, -1)
        return self.rel_h.gather(-1, rows) + self.rel_w.gather(-1, columns)

    def rows_at(self, rows: Tensor) -> Tensor:
        pick = rows.unsqueeze(-1)
        return _expand(self.rel_h.gather(2, pick.expand(-1, -1, -1, self.rel_h.shape[-1])),
                       self.rel_w.gather(2, pick.expand(-1, -1, -1, self.rel_w.shape[-1])))

    def reset(self) -> None:
        self.rel_h = self.rel_w = None
