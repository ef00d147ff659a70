"""Incremental self-attention over a token set in which only some tokens changed.

State per layer, besides each token's query, key and value: for every query
row i, a stabiliser `m_i`, the numerator `n_i = sum_j exp(s q_i.k_j - m_i) v_j`
and the denominator `d_i = sum_j exp(s q_i.k_j - m_i)`. The output
`n_i / d_i` is exactly softmax(s q k^T) v.

Why un-normalised sums: `exp` is element-wise, so when the keys/values of M
tokens C change, each row's sums change only by those M terms, and a row
whose query is unchanged is corrected without touching the other N - M:
  every row i:            n_i += sum_{j in C} w'_ij v'_j - w_ij v_j   (and d_i alike)
  rows R of new queries:  recomputed in full against all keys and values
where w_ij = exp(s q_i.k_j - m_i) is recomputed from the stored key k_j
rather than stored: the N x N weight matrix is never kept (state stays
O(N D)), at the price of one more N M Dh product. Multiply-accumulates per
head: 4 N M Dh (columns: logits of new and old keys, then their values) +
2 M N Dh (rows) = 6 N M Dh, against 2 N^2 Dh for a dense pass: the
incremental path pays while M < N / 3, the default switch point. A softmax
would couple every entry of a row to all others; the fixed stabiliser moves
only the changed terms. The column pass also touches the M changed rows,
which the row pass then overwrites: M^2 wasted terms buy contiguous access.

Numerics: a row's stabiliser is its largest logit when the row was last
recomputed. If a new logit rises far above it (risk of overflow) or a
denominator shrinks far below 1 (cancellation), the sums are rebuilt densely;
both are rare on video. Rounding drift of rows that are never recomputed is
about float32 epsilon per update; a periodic refresh bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from frugalvit.eventful.gates import Selection, scatter_tokens_

# exp(MAX_LOGIT_GROWTH) must stay far from float32 overflow even summed over many tokens.
MAX_LOGIT_GROWTH = 30.0
# Below this, a denominator has lost most of its mass to subtractions: rebuild for precision.
MIN_DENOMINATOR = 1e-4
# Multiply-accumulates per head: incremental 6 M N Dh, dense 2 N^2 Dh (see module docstring).
INCREMENTAL_BREAK_EVEN_FRACTION = 1.0 / 3.0


@dataclass
class AttentionSums:
    """Per-row stabilised softmax sums for the incremental path (see module docstring)."""

    stabilizer: Tensor  # (B, H, N, 1)
    numerator: Tensor  # (B, H, N, Dh)
    denominator: Tensor  # (B, H, N, 1)

    def output(self) -> Tensor:
        return self.numerator / self.denominator


def _stabilized_sums(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    logits = torch.matmul(q * scale, k.transpose(-2, -1))  # scale the (often fewer) query rows, not all keys
    stabilizer = logits.amax(dim=-1, keepdim=True)
    weights = logits.sub_(stabilizer).exp_()
    return stabilizer, torch.matmul(weights, v), weights.sum(dim=-1, keepdim=True)


def build_attention_sums(q: Tensor, k: Tensor, v: Tensor, scale: float) -> AttentionSums:
    """Dense pass that also keeps the sums the incremental path needs."""
    return AttentionSums(*_stabilized_sums(q, k, v, scale))


def fused_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Dense attention with the fused kernel; keeps no state."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def update_attention_sums_(sums: AttentionSums, q: Tensor, k: Tensor, v: Tensor, selection: Selection,
                           new_q: Tensor, new_k: Tensor, new_v: Tensor, old_k: Tensor, old_v: Tensor,
                           scale: float) -> bool:
    """Bring `sums` up to date after tokens `selection` changed; in place.

    `q, k, v` (B, H, N, Dh) already hold the new values; `new_*` (B, H, M, Dh)
    are those new rows, `old_k`, `old_v` the keys and values they replaced.
    Returns False (sums left unusable) when numerics call for a dense rebuild.
    """
    changed = selection.count
    # Every row: add the new keys' terms, remove the old keys' terms.
    keys = torch.cat([new_k, old_k], dim=-2).transpose(-2, -1) * scale
    logits = torch.matmul(q, keys).sub_(sums.stabilizer)  # (B, H, N, 2M)
    if logits[..., :changed].amax().item() > MAX_LOGIT_GROWTH:
        return False
    weights = logits.exp_()
    weights[..., changed:].neg_()
    sums.numerator.add_(torch.matmul(weights, torch.cat([new_v, old_v], dim=-2)))
    sums.denominator.add_(weights.sum(-1, keepdim=True))

    # Rows of changed queries: recompute in full against all (updated) keys and values.
    for state, fresh in zip((sums.stabilizer, sums.numerator, sums.denominator),
                            _stabilized_sums(new_q, k, v, scale)):
        scatter_tokens_(state, selection, fresh)
    return bool(sums.denominator.amin().item() >= MIN_DENOMINATOR)
