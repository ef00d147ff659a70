"""Eventful windowed self-attention (SAM / ViTDet window blocks): recompute only the windows with changed tokens.

A windowed block cuts the (H, W) token grid, zero-padded after the norm to
multiples of the window side, into windows of ws x ws tokens and attends
within each. When M tokens change, only the windows that hold one of them
see any change: their keys and values changed, so every row of such a window
is recomputed densely (fused attention over ws^2 tokens, plus the window's
relative-position terms); every other window keeps last frame's output. Per
window this costs 2 ws^4 Dh per head, against per-window incremental sums at
6 ws^2 m Dh for m changed tokens in it: dense recompute is the cheaper one
once a window holds ws^2 / 3 changed tokens, and within a factor of about
three below that, while it keeps no sums (state O(N D)); at the sizes SAM
uses (ws = 14) the windows' attention is a few percent of the block's work,
so this is the simpler choice, not a costly one.

Padding tokens are zeros after the norm, so their query/key/value are the
qkv layer's bias: one extra row (index N) of the q/k/v state holds them, and
every window reads its tokens from the state through a fixed index map.
With host checks the touched windows are found with one host sync per
block; `sync_free` recomputes every window instead (fixed shapes).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from frugalvit.eventful.block import merge_head_outputs
from frugalvit.eventful.gates import Selection, gather_tokens, store_
from frugalvit.eventful.relpos import decomposed_bias
from frugalvit.timm import split_qkv


class WindowGeometry:
    """Where each window's tokens sit in the flat (row-major) token order of an (H, W) grid."""

    def __init__(self, grid: tuple[int, int], window: int, device: torch.device) -> None:
        height, width = grid
        padded_h, padded_w = math.ceil(height / window) * window, math.ceil(width / window) * window
        rows = torch.arange(padded_h, device=device)[:, None].expand(padded_h, padded_w)
        cols = torch.arange(padded_w, device=device)[None, :].expand(padded_h, padded_w)
        num_tokens = height * width
        token = torch.where((rows < height) & (cols < width), rows * width + cols, num_tokens)  # N: a padding token
        per_row = padded_w // window
        self.num_tokens = num_tokens
        self.num_windows = (padded_h // window) * per_row
        self.window = window
        # (windows, ws * ws): token index (or N) of each window position, windows in timm's partition order
        self.window_tokens = token.view(padded_h // window, window, per_row, window).permute(0, 2, 1, 3).reshape(
            self.num_windows, window * window)
        window_of = (rows // window) * per_row + cols // window
        self.token_window = window_of[:height, :width].reshape(-1)  # (N,) window of each real token


def _rows(samples: Tensor, tokens: Tensor, heads: int, stride: int) -> Tensor:
    """Flat row indices into a (B, heads, stride, X) tensor seen as (B * heads * stride, X).

    `samples` (T,) and `tokens` (T, P): for every t, head and position p the row of (samples[t], head,
    tokens[t, p]); shape (T, heads, P).
    """
    head = torch.arange(heads, device=tokens.device)
    return ((samples[:, None] * heads + head[None, :]) * stride)[:, :, None] + tokens[:, None, :]


class EventfulWindowAttention(nn.Module):
    """Windowed self-attention whose per-token q/k/v and per-window outputs survive between frames."""

    q: Tensor | None
    k: Tensor | None
    v: Tensor | None
    output: Tensor | None

    def __init__(self, attention: nn.Module, window: int) -> None:
        super().__init__()
        object.__setattr__(self, "attention", attention)
        self.window = window
        for name in ("q", "k", "v", "output"):  # (B, heads, N + 1, Dh): row N is the padding token
            self.register_buffer(name, None, persistent=False)
        self.geometry: WindowGeometry | None = None
        self.tables: tuple[Tensor, Tensor] | None = None  # relative-position tables over a window
        self.last_path: str = "none"
        self.last_windows: int | None = None

    def prepare(self, grid: tuple[int, int], tables: tuple[Tensor, Tensor] | None, device: torch.device) -> None:
        """Set the token grid (once per sequence) and the window's relative-position tables (or None)."""
        self.geometry = WindowGeometry(grid, self.window, device)
        self.tables = tables

    def reset(self) -> None:
        self.q = self.k = self.v = self.output = None
        self.last_path, self.last_windows = "none", None

    def _project(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return split_qkv(self.attention, tokens)

    def forward(self, selection: Selection | None, tokens: Tensor, incremental_max_fraction: float,
                keep_sums: bool = False, sync_free: bool = False, changed_rows_only: bool = False,
                prefix_selected: bool = False, selected_only: bool = False) -> Tensor:
        """Attention output for all N tokens (B, N, heads * head_dim), before the output projection; with
        `selected_only` on a partial frame, the rows of `selection` only (see `EventfulAttention.forward`)."""
        del incremental_max_fraction, keep_sums, changed_rows_only, prefix_selected  # windows: always recomputed
        merged = self._forward(selection, tokens, sync_free)
        return gather_tokens(merged, selection) if selected_only and selection is not None else merged

    def _forward(self, selection: Selection | None, tokens: Tensor, sync_free: bool) -> Tensor:
        geometry = self.geometry
        if geometry is None:
            raise RuntimeError("EventfulWindowAttention.prepare(grid, ...) must run before the first frame")
        batch = tokens.shape[0]
        q, k, v = self._project(tokens)
        if selection is None:
            pad = self._project(tokens.new_zeros(1, 1, tokens.shape[-1]))
            self.q, self.k, self.v = (store_(state, torch.cat([fresh, row.expand(batch, -1, -1, -1)], dim=2))
                                      for state, fresh, row in zip((self.q, self.k, self.v), (q, k, v), pad))
            if self.output is None or self.output.shape != self.q.shape:
                self.output = torch.empty_like(self.q)
            windows = torch.arange(batch * geometry.num_windows, device=tokens.device)
            self.last_path = "dense"
        elif selection.count == 0:
            self.last_path, self.last_windows = "skipped", 0
            return self._merged()
        else:
            heads, stride = q.shape[1], geometry.num_tokens + 1
            samples = torch.arange(batch, device=tokens.device)
            changed = _rows(samples, selection.indices, heads, stride).reshape(-1)
            for state, fresh in ((self.q, q), (self.k, k), (self.v, v)):
                state.view(-1, state.shape[-1]).index_copy_(0, changed, fresh.reshape(-1, fresh.shape[-1]))
            if sync_free:  # fixed shapes: every window
                windows = torch.arange(batch * geometry.num_windows, device=tokens.device)
            else:  # the windows holding a changed token (one host sync)
                touched = torch.zeros(batch, geometry.num_windows, dtype=torch.bool, device=tokens.device)
                touched.scatter_(1, geometry.token_window[selection.indices], True)
                windows = touched.flatten().nonzero().squeeze(1)
            self.last_path = "windows"
        self._recompute_windows(windows)
        self.last_windows = windows.shape[0]
        return self._merged()

    def _recompute_windows(self, windows: Tensor) -> None:
        """Dense attention in the given windows (flat ids sample * num_windows + window), written to `output`."""
        geometry, attn = self.geometry, self.attention
        heads, head_dim, stride = self.q.shape[1], self.q.shape[-1], geometry.num_tokens + 1
        rows = _rows(windows // geometry.num_windows, geometry.window_tokens[windows % geometry.num_windows],
                     heads, stride)  # (T, heads, ws * ws)
        flat = rows.reshape(-1)
        picked = [state.view(-1, head_dim).index_select(0, flat).view(*rows.shape, head_dim)
                  for state in (self.q, self.k, self.v)]
        mask = None if self.tables is None else decomposed_bias(picked[0], *self.tables).to(picked[0].dtype)
        mixed = F.scaled_dot_product_attention(*picked, attn_mask=mask, scale=attn.scale)
        # Padding positions all write to row N (a scratch row nobody reads).
        self.output.view(-1, head_dim).index_copy_(0, flat, mixed.reshape(-1, head_dim))

    def _merged(self) -> Tensor:
        """(B, N, heads * Dh) copy of the real tokens' outputs (the padding row left out)."""
        return merge_head_outputs(self.output[:, :, :-1])

    def state_tensors(self) -> list[Tensor]:
        return [t for t in (self.q, self.k, self.v, self.output) if t is not None]
