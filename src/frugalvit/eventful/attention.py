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
incremental path pays while M < N / 3, the CPU's default switch point (on
CUDA one fused kernel over all queries is faster at every budget measured:
`EventfulViT.attention_switch`). A softmax would couple every entry of a
row to all others; the fixed stabiliser moves only the changed terms. The
column pass also touches the M changed rows, which the row pass then
overwrites: M^2 wasted terms buy contiguous access.

Numerics. The sums are kept in float32 whatever the model's dtype (float16
would overflow or cancel), and the logits are formed in float32. On CUDA with
a half-precision model the products run on the tensor cores with float32
output (`product_f32`): half inputs, float32 accumulation, weights rounded to
the model's dtype before they multiply the values, as a fused attention
kernel (flash attention) does; elsewhere they run in float32. A row's
stabiliser only rises: when a new logit exceeds it, the row's sums are
rescaled by exp(old - new) first (the online-softmax step), so no exponential
ever exceeds 1 and nothing can overflow. Removing the terms of old keys can
cancel most of a row's mass (its denominator falls below `MIN_DENOMINATOR`
and its relative rounding error grows); it happens when an "attention sink"
token that many rows attend to changes (up to ~10% of rows on a few frames
of real video with DINOv2 weights). Two ways to handle both, chosen by
`update_attention_sums_`'s `host_check`:
- on the CPU with host checks (they cost nothing there): only the rising rows
  are rescaled, and a frame with a cancelled row is rebuilt densely (exact);
- on CUDA, or without host checks (no host sync, fixed shapes, so a frame can
  be captured as a CUDA graph): every row is rescaled, each update also
  recomputes the ceil(M / 8) rows with the smallest denominators where they
  fell below the floor, and `cancelled_rows` marks any row still cancelled,
  whose previous output the caller keeps for this frame.
Rounding drift of rows that are never recomputed is about float32 epsilon per
update; a periodic refresh bounds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

import torch
from torch import Tensor
from torch.nn import functional as F

from frugalvit.eventful.gates import Selection, scatter_tokens_

# Below this a denominator has lost most of its mass to subtractions: the row is recomputed.
MIN_DENOMINATOR = 1e-4
# Rows recomputed per update for cancellation repair: ceil(M / REPAIR_DIVISOR), the smallest denominators.
REPAIR_DIVISOR = 8
# Multiply-accumulates per head: incremental 6 M N Dh (+ 2 N Dh ceil(M / 8) repair on the device path),
# dense 2 N^2 Dh.
INCREMENTAL_BREAK_EVEN_FRACTION = 1.0 / 3.0


@dataclass
class AttentionSums:
    """Per-row stabilised softmax sums for the incremental path (see module docstring)."""

    stabilizer: Tensor  # (B, H, N, 1)
    numerator: Tensor  # (B, H, N, Dh)
    denominator: Tensor  # (B, H, N, 1)

    def output(self, dtype: torch.dtype | None = None) -> Tensor:
        """softmax(s q k^T) v for every row, in `dtype` (default: the sums' float32)."""
        out = self.numerator / self.denominator
        return out if dtype is None else out.to(dtype)


class LogitBias(Protocol):
    """Additive logit terms that depend on query and key positions (e.g. relative positions).

    Each method adds the terms into a logits tensor in place (nothing of size
    rows x keys is materialised besides the logits). Implementations may
    cache per-row terms: `add_full_`, `mask` and `add_rows_` refresh that
    cache for the rows they are given, `add_columns_` and `add_rows_at_` read it.
    """

    def add_full_(self, logits: Tensor, q: Tensor) -> None:
        """logits (B, H, N, N) += the terms of every query row `q` (B, H, N, Dh) against every key."""

    def mask(self, q: Tensor) -> Tensor:
        """The same terms as a (B, H, N, N) float32 tensor (an additive mask for a fused kernel)."""

    def add_rows_(self, logits: Tensor, q: Tensor, selection: Selection) -> None:
        """logits (B, H, M, N) += the terms of the new query rows `q` (B, H, M, Dh) at `selection`."""

    def add_columns_(self, logits: Tensor, selection: Selection, blocks: int = 1) -> None:
        """Key-major logits (B, H, blocks * M, N) += the terms of the keys at `selection` against every row, in
        each of `blocks` consecutive blocks of M keys."""

    def add_rows_at_(self, logits: Tensor, rows: Tensor) -> None:
        """logits (B, H, R, N) += the terms of the current query rows at `rows` (B, H, R)."""


def product_f32(a: Tensor, b: Tensor, scale: float = 1.0) -> Tensor:
    """scale * (a @ b) (broadcast leading dims) in float32. On CUDA, when either side is half precision, both
    multiply in that dtype on the tensor cores with float32 accumulation and output (`bmm`'s `out_dtype`), and
    the float32 product is scaled; elsewhere both are converted to float32, the smaller one is scaled, and they
    multiply in float32 (no rounding on the CPU, where half precision buys no speed)."""
    half = next((t.dtype for t in (a, b) if t.dtype in (torch.float16, torch.bfloat16)), None)
    if a.is_cuda and half is not None:
        lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a3 = a.to(half).expand(*lead, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
        b3 = b.to(half).expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
        product = torch.bmm(a3, b3, out_dtype=torch.float32).view(*lead, a.shape[-2], b.shape[-1])
        return product if scale == 1.0 else product.mul_(scale)
    a, b = a.float(), b.float()
    if scale != 1.0:  # scale the smaller operand
        a, b = (a * scale, b) if a.numel() <= b.numel() else (a, b * scale)
    return torch.matmul(a, b)


def _stabilized_sums(q: Tensor, k: Tensor, v: Tensor, scale: float,
                     add_bias: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """float32 (stabiliser, numerator, denominator) of rows `q` against all of `k`, `v` (`add_bias(logits)` adds
    position terms in place)."""
    logits = product_f32(q, k.transpose(-2, -1), scale)
    if add_bias is not None:
        add_bias(logits)
    stabilizer = logits.amax(dim=-1, keepdim=True)
    weights = logits.sub_(stabilizer).exp_()
    return stabilizer, product_f32(weights, v), weights.sum(dim=-1, keepdim=True)


def build_attention_sums(q: Tensor, k: Tensor, v: Tensor, scale: float,
                         bias: LogitBias | None = None) -> AttentionSums:
    """Dense pass that also keeps the sums the incremental path needs (float32)."""
    return AttentionSums(*_stabilized_sums(q, k, v, scale, None if bias is None else partial(bias.add_full_, q=q)))


def fused_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, bias: LogitBias | None = None) -> Tensor:
    """Dense attention with the fused kernel; keeps no state (refreshes `bias`'s row cache)."""
    mask = None if bias is None else bias.mask(q).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def fused_row_attention(q_rows: Tensor, k: Tensor, v: Tensor, scale: float, selection: Selection,
                        bias: LogitBias | None = None) -> Tensor:
    """Attention of the query rows `q_rows` (B, H, M, Dh), the tokens at `selection`, against all keys and
    values (B, H, N, Dh), with the fused kernel: (B, H, M, Dh). 2 M N Dh multiply-accumulates per head."""
    mask = None
    if bias is not None:
        mask = q_rows.new_zeros(*q_rows.shape[:-1], k.shape[-2], dtype=torch.float32)
        bias.add_rows_(mask, q=q_rows, selection=selection)
        mask = mask.to(q_rows.dtype)
    return F.scaled_dot_product_attention(q_rows, k, v, attn_mask=mask, scale=scale)


def _scatter_rows_(state: Tensor, rows: Tensor, values: Tensor) -> None:
    """state[b, h, rows[b, h, i]] = values[b, h, i] for (B, H, N, X) state and (B, H, R) rows."""
    state.scatter_(2, rows.unsqueeze(-1).expand(-1, -1, -1, state.shape[-1]), values)


def update_attention_sums_(sums: AttentionSums, q: Tensor, k: Tensor, v: Tensor, selection: Selection,
                           new_q: Tensor, new_k: Tensor, new_v: Tensor, old_k: Tensor, old_v: Tensor,
                           scale: float, host_check: bool = True, bias: LogitBias | None = None) -> bool:
    """Bring `sums` up to date after tokens `selection` changed; in place.

    `q, k, v` (B, H, N, Dh) already hold the new values; `new_*` (B, H, M, Dh)
    are those new rows, `old_k`, `old_v` the keys and values they replaced.
    On CUDA, or with `host_check=False`, nothing syncs with the host (every
    row is rescaled, the ceil(M/8) smallest denominators are repaired) and the
    result is always False (see `cancelled_rows`). On the CPU with host checks,
    where they cost nothing, only rising rows are rescaled, no repair rows are
    computed, and a frame with a cancelled row is rebuilt densely (exact);
    returns True then.
    """
    changed = selection.count
    host = host_check and not q.is_cuda  # the CPU: a host check is free, so do only the work a frame needs
    # Every row: add the new keys' terms, remove the old keys' terms, after raising the stabiliser if needed.
    # With position terms the logits are laid out key-major, (B, H, 2M, N): a key's terms for all rows are one
    # contiguous run to add; without, row-major (B, H, N, 2M), which reduces faster over the few keys.
    key_major = bias is not None
    keys = torch.cat([new_k, old_k], dim=-2)
    if key_major:
        logits = product_f32(keys, q.transpose(-2, -1), scale)
        bias.add_columns_(logits, selection, blocks=2)  # new and old keys sit at the same positions
    else:
        logits = product_f32(q, keys.transpose(-2, -1), scale)
    key_dim = -2 if key_major else -1
    as_rows = (lambda t: t.transpose(-2, -1)) if key_major else (lambda t: t)  # per-row (.., N, 1) view
    stabilizer = torch.maximum(sums.stabilizer, as_rows(logits.narrow(key_dim, 0, changed).amax(key_dim, True)))
    if host:
        _rescale_rising_rows_(sums, stabilizer)
    else:
        rescale = torch.exp(sums.stabilizer - stabilizer)
        sums.numerator.mul_(rescale)
        sums.denominator.mul_(rescale)
        sums.stabilizer.copy_(stabilizer)
    weights = logits.sub_(as_rows(stabilizer)).exp_()
    weights.narrow(key_dim, changed, changed).neg_()
    sums.numerator.add_(product_f32(as_rows(weights), torch.cat([new_v, old_v], dim=-2)))
    sums.denominator.add_(as_rows(weights.sum(key_dim, keepdim=True)))

    # Rows of changed queries: recompute in full against all (updated) keys and values.
    row_bias = None if bias is None else partial(bias.add_rows_, q=new_q, selection=selection)
    for state, fresh in zip((sums.stabilizer, sums.numerator, sums.denominator),
                            _stabilized_sums(new_q, k, v, scale, row_bias)):
        scatter_tokens_(state, selection, fresh)

    if host:  # exact: rebuild densely in the rare frame where a row lost most of its mass
        if not bool(cancelled_rows(sums).any()):
            return False
        full_bias = None if bias is None else partial(bias.add_full_, q=q)
        for state, fresh in zip((sums.stabilizer, sums.numerator, sums.denominator),
                                _stabilized_sums(q, k, v, scale, full_bias)):
            state.copy_(fresh)
        return True
    # Cancellation repair on the device: recompute the rows with the smallest denominators where they fell
    # below the floor; the caller holds the previous output of any row still cancelled.
    repair = min(q.shape[-2], -(-changed // REPAIR_DIVISOR))
    rows = sums.denominator.squeeze(-1).topk(repair, dim=-1, largest=False).indices  # (B, H, R)
    picked_q = q.gather(2, rows.unsqueeze(-1).expand(-1, -1, -1, q.shape[-1]))
    cancelled = sums.denominator.gather(2, rows.unsqueeze(-1)) < MIN_DENOMINATOR  # (B, H, R, 1)
    for state, fresh in zip((sums.stabilizer, sums.numerator, sums.denominator),
                            _stabilized_sums(picked_q, k, v, scale,
                                             None if bias is None else partial(bias.add_rows_at_, rows=rows))):
        current = state.gather(2, rows.unsqueeze(-1).expand(-1, -1, -1, state.shape[-1]))
        _scatter_rows_(state, rows, torch.where(cancelled, fresh, current))
    return False


def _rescale_rising_rows_(sums: AttentionSums, stabilizer: Tensor) -> None:
    """Raise the stabiliser of the rows where `stabilizer` exceeds it, rescaling only those rows' sums."""
    rising = (stabilizer > sums.stabilizer).flatten().nonzero().squeeze(1)
    if rising.numel() == 0:
        return
    width = sums.numerator.shape[-1]
    old, new = sums.stabilizer.view(-1).index_select(0, rising), stabilizer.view(-1).index_select(0, rising)
    factor = torch.exp(old - new)
    numerator, denominator = sums.numerator.view(-1, width), sums.denominator.view(-1)
    numerator.index_copy_(0, rising, numerator.index_select(0, rising) * factor[:, None])
    denominator.index_copy_(0, rising, denominator.index_select(0, rising) * factor)
    sums.stabilizer.view(-1).index_copy_(0, rising, new)


def cancelled_rows(sums: AttentionSums) -> Tensor:
    """(B, H, N, 1) bool: rows whose denominator is below `MIN_DENOMINATOR` (their output is unreliable)."""
    return sums.denominator < MIN_DENOMINATOR
