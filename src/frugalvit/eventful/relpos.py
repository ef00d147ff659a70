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


def _add_terms_(logits: Tensor, rel_h: Tensor, rel_w: Tensor) -> None:
    """logits (..., Hg * Wg) += rel_h (..., Hg) at each key's row + rel_w (..., Wg) at its column, in place."""
    grid = logits.unflatten(-1, (rel_h.shape[-1], rel_w.shape[-1]))
    grid.add_(rel_h.unsqueeze(-1)).add_(rel_w.unsqueeze(-2))


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
    """`LogitBias` of one attention layer over a fixed grid, with the per-row terms cached between frames.

    The cache is kept key-position-major, (B, H, Hg, N) and (B, H, Wg, N): the
    terms of the keys at M changed positions for all N rows are then M whole
    rows of it (a fast row gather), in the key-major layout of the column pass.
    """

    def __init__(self, height: Tensor, width: Tensor) -> None:
        self.height, self.width = height, width  # (Hg, Hg, Dh), (Wg, Wg, Dh)
        grid_w = width.shape[0]
        tokens = torch.arange(height.shape[0] * grid_w, device=height.device)
        self.row_of, self.column_of = tokens // grid_w, tokens % grid_w  # (N,) grid position of each token
        self.rel_h: Tensor | None = None  # (B, H, Hg, N) float32: [b, h, r, i] = q_i . T_h[r_i, r]
        self.rel_w: Tensor | None = None  # (B, H, Wg, N)

    def state_tensors(self) -> list[Tensor]:
        return [t for t in (self.rel_h, self.rel_w) if t is not None]

    def _refresh(self, q: Tensor) -> tuple[Tensor, Tensor]:
        rel_h, rel_w = _grid_terms(q, self.height, self.width)
        self.rel_h = store_(self.rel_h, rel_h.transpose(-2, -1))
        self.rel_w = store_(self.rel_w, rel_w.transpose(-2, -1))
        return rel_h, rel_w

    def add_full_(self, logits: Tensor, q: Tensor) -> None:
        _add_terms_(logits, *self._refresh(q))

    def mask(self, q: Tensor) -> Tensor:
        return _expand(*self._refresh(q))

    def add_rows_(self, logits: Tensor, q: Tensor, selection: Selection) -> None:
        rel_h, rel_w = _row_terms(q, self.height[self.row_of[selection.indices]],
                                  self.width[self.column_of[selection.indices]])
        for cache, fresh in ((self.rel_h, rel_h), (self.rel_w, rel_w)):  # columns of the key-major cache
            for sample in range(cache.shape[0]):
                cache[sample].index_copy_(-1, selection.indices[sample], fresh[sample].transpose(-2, -1))
        _add_terms_(logits, rel_h, rel_w)

    def add_columns_(self, logits: Tensor, selection: Selection, blocks: int = 1) -> None:
        count = selection.count
        for sample in range(logits.shape[0]):  # per sample: whole rows of the key-major cache
            indices = selection.indices[sample]
            terms = self.rel_h[sample].index_select(-2, self.row_of[indices])
            terms += self.rel_w[sample].index_select(-2, self.column_of[indices])  # (H, M, N)
            for block in range(blocks):
                logits[sample, :, block * count:(block + 1) * count] += terms

    def add_rows_at_(self, logits: Tensor, rows: Tensor) -> None:
        pick = rows.unsqueeze(-2)  # (B, H, 1, R)
        rel_h = self.rel_h.gather(-1, pick.expand(-1, -1, self.rel_h.shape[-2], -1)).transpose(-2, -1)
        rel_w = self.rel_w.gather(-1, pick.expand(-1, -1, self.rel_w.shape[-2], -1)).transpose(-2, -1)
        _add_terms_(logits, rel_h, rel_w)

    def reset(self) -> None:
        self.rel_h = self.rel_w = None


class TableBias:
    """`LogitBias` from a fixed (H, N, N) table of per query-key terms (BEiT's relative position bias).

    Nothing depends on the queries, so nothing is cached per frame; the table
    is also kept transposed, so the terms of M changed keys for all rows are
    M whole rows of it, in the key-major layout of the column pass.
    """

    def __init__(self, table: Tensor) -> None:
        self.table = table.float()  # (H, N query, N key)
        self.by_key = self.table.transpose(-2, -1).contiguous()  # (H, N key, N query)

    def state_tensors(self) -> list[Tensor]:
        return []

    def add_full_(self, logits: Tensor, q: Tensor) -> None:
        logits += self.table

    def mask(self, q: Tensor) -> Tensor:
        return self.table.expand(q.shape[0], -1, -1, -1)

    def add_rows_(self, logits: Tensor, q: Tensor, selection: Selection) -> None:
        for sample in range(logits.shape[0]):
            logits[sample] += self.table.index_select(-2, selection.indices[sample])

    def add_columns_(self, logits: Tensor, selection: Selection, blocks: int = 1) -> None:
        count = selection.count
        for sample in range(logits.shape[0]):
            terms = self.by_key.index_select(-2, selection.indices[sample])  # (H, M, N)
            for block in range(blocks):
                logits[sample, :, block * count:(block + 1) * count] += terms

    def add_rows_at_(self, logits: Tensor, rows: Tensor) -> None:
        batch, heads, count = rows.shape
        table = self.table.expand(batch, -1, -1, -1)
        logits += table.gather(2, rows.unsqueeze(-1).expand(-1, -1, -1, table.shape[-1]))

    def reset(self) -> None:
        pass
