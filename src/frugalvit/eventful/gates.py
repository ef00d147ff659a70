"""Token gates and buffers: the stateful pieces that let a layer see only changed tokens.

A `TokenGate` keeps a reference copy of its input; each call it measures how
far every token moved from its reference, lets a policy pick M tokens, passes
those on (gathered, M x D) and moves their references to the current values.
A `TokenBuffer` keeps the last output of a token-wise operation for every
token and scatters in the M fresh results, so downstream layers again see all
N tokens. After `reset()` the first call passes (and stores) every token.

A gate's choice is a `Selection` of indices (B, M); `None` stands for "all
tokens" and skips the gather/scatter copies entirely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from frugalvit.eventful.policies import TokenPolicy


@dataclass(frozen=True)
class Selection:
    """Token indices (B, M), ascending per sample, chosen from N tokens.

    Rows are moved with `index_select`/`index_copy_` on flattened views (a
    memcpy per row), which on CPU is several times faster than `gather` with
    an expanded index; the flat indices are built once per selection.
    """

    indices: Tensor
    num_tokens: int
    _flat: dict[int, Tensor] = field(default_factory=dict, compare=False, repr=False)

    @property
    def count(self) -> int:
        return self.indices.shape[1]

    def flat(self, groups_per_sample: int = 1) -> Tensor:
        """Row indices into a (B * G * N, X) view of a (B, G, N, X) or (B, N, X) tensor."""
        if groups_per_sample not in self._flat:
            batch = self.indices.shape[0]
            if batch * groups_per_sample == 1:  # one sample, one group: the indices themselves (no kernel)
                self._flat[groups_per_sample] = self.indices.reshape(-1)
            else:  # two kernels (a strided arange and a broadcast add): a captured frame builds 48 of these
                groups = batch * groups_per_sample
                offsets = torch.arange(0, groups * self.num_tokens, self.num_tokens, device=self.indices.device)
                rows = self.indices.unsqueeze(1) + offsets.view(batch, groups_per_sample, 1)
                self._flat[groups_per_sample] = rows.reshape(-1)
        return self._flat[groups_per_sample]


def gather_tokens(tokens: Tensor, selection: Selection | None) -> Tensor:
    """Rows `selection` of `tokens` (B, N, D) or (B, G, N, D); all of them for None."""
    if selection is None:
        return tokens
    *lead, num_tokens, width = tokens.shape
    groups = tokens.shape[1] if tokens.dim() == 4 else 1
    picked = tokens.reshape(-1, width).index_select(0, selection.flat(groups))
    return picked.view(*lead, selection.count, width)


def store_(current: Tensor | None, value: Tensor) -> Tensor:
    """`value` kept as state: copied into `current` when it has the same shape, dtype and device, else cloned.

    Writing in place keeps every state tensor at one address from frame to
    frame (full frames included), which is what a captured CUDA graph that
    reads and writes the state needs; the clone never aliases `value`.
    """
    if current is not None and current.shape == value.shape and current.dtype == value.dtype \
            and current.device == value.device:
        current.copy_(value)
        return current  # the same object (not copy_'s return value, which a compiler may treat as a new view)
    return value.detach().clone(memory_format=torch.contiguous_format)


def scatter_tokens_(target: Tensor, selection: Selection, values: Tensor) -> Tensor:
    """Write `values` into rows `selection` of contiguous `target` (B, N, D) or (B, G, N, D), in place.

    Off the CPU a strided `values` (keys and values split from one qkv
    projection are views) goes in with one `scatter_` (`scatter_rows_strided_`)
    instead of a copy and an `index_copy_`: a captured GPU frame is bound by
    its kernel count. On the CPU `index_copy_` over flat rows is several times
    faster than `scatter_`, and the copy of a few rows costs little.
    """
    if values.device.type != "cpu" and not values.is_contiguous():
        return scatter_rows_strided_(target, selection, values)
    groups = target.shape[1] if target.dim() == 4 else 1
    target.view(-1, target.shape[-1]).index_copy_(0, selection.flat(groups), values.reshape(-1, target.shape[-1]))
    return target


def scatter_rows_strided_(target: Tensor, selection: Selection, values: Tensor) -> Tensor:
    """`scatter_tokens_` as one `scatter_` along the token axis, over the selection's indices expanded to
    `values`' shape: no copy of `values`, whatever its strides."""
    indices = selection.indices
    index = indices.view(indices.shape[0], *([1] * (values.dim() - 3)), indices.shape[1], 1)
    return target.scatter_(-2, index.expand_as(values), values)


def token_errors(reference: Tensor, tokens: Tensor, policy: TokenPolicy, out: Tensor | None = None) -> Tensor:
    """Per-token error (B, N) that `policy` selects on: the L2 norm of reference - tokens (B, N, D), divided by
    the reference's norm for a relative policy. `out`: a work buffer shaped like `tokens` for the difference."""
    errors = torch.linalg.vector_norm(torch.sub(reference, tokens, out=out), dim=-1)
    if policy.relative:
        errors = errors / torch.linalg.vector_norm(reference, dim=-1).clamp_min(1e-6)
    return errors


class ScratchPool:
    """One reusable work buffer per (shape, dtype, device), shared by the gates of a model.

    Gates run one after another, so one (B, N, D) buffer serves them all for
    the difference they take the norm of (a fresh one per gate would cost
    page faults on the CPU at large N; one per gate would hold a (B, N, D)
    tensor per gate: 61 MiB for ViT-B at 384 px).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[tuple[int, ...], torch.dtype, torch.device], Tensor] = {}

    def get(self, like: Tensor) -> Tensor:
        key = (tuple(like.shape), like.dtype, like.device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
        return self._buffers[key]

    def tensors(self) -> list[Tensor]:
        return list(self._buffers.values())

    def clear(self) -> None:
        self._buffers.clear()


class TokenGate(nn.Module):
    """Passes on only the tokens that changed enough since they were last passed."""

    reference: Tensor | None

    def __init__(self, pool: ScratchPool | None = None) -> None:
        """`pool`: where the error buffer comes from (shared by a model's gates; default: the gate's own)."""
        super().__init__()
        self.register_buffer("reference", None, persistent=False)
        self.pool = pool if pool is not None else ScratchPool()
        self.register_buffer("indices", None, persistent=False)  # the last selection, written in place
        self.last_count: int | None = None
        self.last_indices: Tensor | None = None  # (B, M) tokens passed on the last call; None: all of them

    def reset(self) -> None:
        """Forget the reference: the next call passes every token."""
        self.reference = None
        self.indices = None
        self.last_count = None
        self.last_indices = None

    def mark_held(self, batch: int, device: torch.device) -> None:
        """Record a frame this gate did not run on (a held frame of `batch` streams): nothing passed, the
        reference unchanged."""
        self.last_count = 0
        self.last_indices = torch.empty(batch, 0, dtype=torch.long, device=device)

    def forward(self, tokens: Tensor, policy: TokenPolicy, update_all: bool = False,
                indices: Tensor | None = None) -> tuple[Selection | None, Tensor]:
        """Return (selection, or None for all tokens; the selected tokens (B, M, D)); update the reference.

        `indices` (B, M), ascending: pass these tokens instead of choosing by this gate's own error (one
        selection shared by every gate of a frame, `EventfulViT.token_selection`).
        """
        if self.reference is None or update_all:
            self.reference = store_(self.reference, tokens)
            self.last_count, self.last_indices = tokens.shape[1], None
            return None, tokens
        if indices is None:
            indices = self.choose(tokens, policy)
        self.last_count = indices.shape[1]
        if indices.shape[1] == tokens.shape[1]:
            self.reference.copy_(tokens)
            self.last_indices = None
            return None, tokens
        self.indices = self.last_indices = store_(self.indices, indices)
        selection = Selection(indices, tokens.shape[1])
        selected = gather_tokens(tokens, selection)
        scatter_tokens_(self.reference, selection, selected)
        return selection, selected

    def follow(self, tokens: Tensor, selection: Selection | None, keep_reference: bool) -> None:
        """Record passing `tokens` (B, M, D), the rows `selection` that another gate chose for the whole frame
        (`EventfulViT.token_selection="shared"`; None: every token, a full frame); the reference moves only if
        `keep_reference`.

        Only the gate that chooses needs its reference: the others pass what it chose, so keeping theirs would
        cost a scatter per gate per frame for nothing; they go stale, and the model refreshes in full before
        these gates choose again (switching back to per-gate selection).
        """
        if selection is None:
            self.last_count, self.last_indices = tokens.shape[1], None
            if keep_reference:
                self.reference = store_(self.reference, tokens)
            return
        self.last_count, self.last_indices = selection.count, selection.indices
        if keep_reference:
            scatter_tokens_(self.reference, selection, tokens)

    def choose(self, tokens: Tensor, policy: TokenPolicy, always: int = 0) -> Tensor:
        """The tokens (B, M), ascending, that `policy` picks by their error against this gate's reference; the
        first `always` tokens (class token, registers) count as changed without limit, so they are among them."""
        errors = token_errors(self.reference, tokens, policy, out=self.pool.get(tokens))
        if always:
            errors[:, :always] = float("inf")
        return policy.select(errors)


class TokenBuffer(nn.Module):
    """Holds a token-wise op's output for all tokens; fresh rows are scattered in."""

    state: Tensor | None

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("state", None, persistent=False)

    def reset(self) -> None:
        self.state = None

    def forward(self, selection: Selection | None, values: Tensor) -> Tensor:
        """Store `values` at `selection` (all tokens when None) and return the full buffer (B, N, D).

        The returned tensor is the buffer itself: read it, do not modify it in place.
        """
        if selection is None:
            self.state = store_(self.state, values)
        elif self.state is None:
            raise RuntimeError("TokenBuffer received a partial update before any full one; call reset() first")
        else:
            scatter_tokens_(self.state, selection, values)
        return self.state
