"""Eventful versions of timm's transformer `Block` and its `Attention`.

Token-wise work (qkv projection, output projection, MLP, with the norms and
LayerScale between them) runs only on the tokens a gate lets through; a
buffer restores the full token set before each skip connection, as in figure
4 of the Eventful Transformers paper. Attention keeps its query/key/value and
its un-normalised weights between frames and updates them in the changed rows
and columns (`frugalvit.eventful.attention`), or recomputes densely with the
fused kernel when too many tokens changed for the update to pay.

These modules hold the timm block by plain reference (not as a child module):
the parameters belong to the original model, which the wrapping
`EventfulViT` registers once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from timm.layers import Attention, LayerScale
from timm.models.vision_transformer import Block

from frugalvit.eventful.attention import (AttentionSums, build_attention_sums, cancelled_rows, fused_attention,
                                         fused_row_attention, update_attention_sums_)
from frugalvit.eventful.gates import (ScratchPool, Selection, TokenBuffer, TokenGate, gather_tokens, scatter_tokens_,
                                     store_)
from frugalvit.eventful.policies import TokenPolicy
from frugalvit.eventful.relpos import DecomposedRelativeBias
from frugalvit.timm import split_qkv


def _store_sums(current: AttentionSums | None, fresh: AttentionSums) -> AttentionSums:
    """`fresh` kept as state, written into `current`'s tensors where their shapes allow (see `store_`)."""
    if current is None:
        return fresh
    return AttentionSums(store_(current.stabilizer, fresh.stabilizer), store_(current.numerator, fresh.numerator),
                         store_(current.denominator, fresh.denominator))


def merge_head_outputs(per_head: Tensor) -> Tensor:
    """(B, H, N, Dh) -> (B, N, H * Dh), a new tensor."""
    batch, heads, num_tokens, head_dim = per_head.shape
    return per_head.transpose(1, 2).reshape(batch, num_tokens, heads * head_dim)


class EventfulAttention(nn.Module):
    """Self-attention whose state survives between frames; input: the gated, normalised tokens."""

    q: Tensor | None
    k: Tensor | None
    v: Tensor | None
    output: Tensor | None  # per head: (B, H, N, Dh)

    def __init__(self, attention: Attention,
                 project: Callable[[nn.Module, Tensor], tuple[Tensor, Tensor, Tensor]] = split_qkv,
                 rotate: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None) -> None:
        """`project(attention, tokens) -> q, k, v`: the layer's q/k/v projection (default: timm ViT's);
        `rotate(attention, q_or_k, rows)`: rotary position embedding, with per-token rows set by `set_rotary`."""
        super().__init__()
        object.__setattr__(self, "attention", attention)
        self.project, self.rotate = project, rotate
        self.rotary: Tensor | None = None  # (N, 2 Dh) rotary embedding row of every token
        for name in ("q", "k", "v", "output"):
            self.register_buffer(name, None, persistent=False)
        self.sums: AttentionSums | None = None
        self.bias: DecomposedRelativeBias | None = None  # relative-position logit terms, if the layer has them
        # Leading tokens (class token, registers) whose rows `changed_rows_only` recomputes on every partial frame
        self.prefix_rows: int = 0
        self.last_path: str = "none"

    def prepare(self, grid: tuple[int, int], tables: tuple[Tensor, Tensor] | None, device: torch.device) -> None:
        """Set the relative-position tables over the token grid (once per sequence), or None for none."""
        del grid, device
        self.bias = None if tables is None else DecomposedRelativeBias(*tables)

    def reset(self) -> None:
        self.q = self.k = self.v = self.output = None
        self.sums = None
        if self.bias is not None:
            self.bias.reset()
        self.last_path = "none"

    def set_rotary(self, rows: Tensor | None) -> None:
        """The rotary embedding row of every token (N, 2 Dh), once per sequence; None: no rotation."""
        self.rotary = rows

    def _project(self, tokens: Tensor, selection: Selection | None) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.project(self.attention, tokens)
        if self.rotary is not None:  # queries and keys turn by their own tokens' positions
            rows = self.rotary[None, None] if selection is None else self.rotary[selection.indices].unsqueeze(1)
            q, k = self.rotate(self.attention, q, rows), self.rotate(self.attention, k, rows)
        return q, k, v

    def forward(self, selection: Selection | None, tokens: Tensor, incremental_max_fraction: float,
                keep_sums: bool = False, sync_free: bool = False, changed_rows_only: bool = False,
                prefix_selected: bool = False, selected_only: bool = False) -> Tensor:
        """Attention output for all N tokens (B, N, heads * head_dim), before the output norm/projection.

        `keep_sums`: on a full update, build the incremental path's sums (same
        MACs as the fused kernel, a little more wall time) so that the next,
        partial frame updates them instead of rebuilding them, which would cost
        a second dense attention pass. `changed_rows_only`: on a partial frame,
        recompute only the rows of the selected queries (against every key and
        value, fused kernel, 2 M N Dh per head), and those of the first
        `prefix_rows` tokens (unless `prefix_selected`: the selection holds them
        already, as a shared selection does), and keep the other rows' last
        output (`EventfulViT.attention_rows`). `selected_only`: on a partial
        frame return only the rows of `selection` (B, M, heads * head_dim), all
        the next gate passes when it follows the same selection; the full
        (B, N, D) merge of the heads is then skipped.
        """
        scale = self.attention.scale
        q, k, v = self._project(tokens, selection)
        if selection is None:
            self.q, self.k, self.v = store_(self.q, q), store_(self.k, k), store_(self.v, v)
            if keep_sums:
                self.sums = _store_sums(self.sums, build_attention_sums(self.q, self.k, self.v, scale, self.bias))
                mixed = self.sums.output(q.dtype)
                self.last_path = "dense+sums"
            else:
                self.sums = None
                mixed = fused_attention(self.q, self.k, self.v, scale, self.bias)
                self.last_path = "dense"
        elif selection.count == 0:
            self.last_path = "skipped"
            return merge_head_outputs(gather_tokens(self.output, selection) if selected_only else self.output)
        else:
            incremental = not changed_rows_only and selection.count <= incremental_max_fraction * selection.num_tokens
            if incremental:  # the sums need the keys and values being replaced
                old_k, old_v = gather_tokens(self.k, selection), gather_tokens(self.v, selection)
            for state, fresh in ((self.q, q), (self.k, k), (self.v, v)):
                scatter_tokens_(state, selection, fresh)
            if changed_rows_only:
                fresh = self._update_changed_rows(q, selection, scale, prefix_selected)
                if selected_only:  # the selected rows are exactly the fresh ones (the prefix among them)
                    return merge_head_outputs(fresh if prefix_selected else gather_tokens(self.output, selection))
                return merge_head_outputs(self.output)
            if not incremental:
                self.sums = None
                mixed = fused_attention(self.q, self.k, self.v, scale, self.bias)
                self.last_path = "dense"
            else:
                host_checks = not (sync_free or q.is_cuda)  # see the attention module's numerics
                if self.sums is not None:
                    rebuilt = update_attention_sums_(self.sums, self.q, self.k, self.v, selection, q, k, v,
                                                     old_k, old_v, scale, host_check=host_checks, bias=self.bias)
                    self.last_path = "rebuild" if rebuilt else "incremental"
                else:  # the last full frame kept no sums (a policy that was never going to need them)
                    self.sums = _store_sums(self.sums, build_attention_sums(self.q, self.k, self.v, scale, self.bias))
                    self.last_path = "rebuild"
                mixed = self.sums.output(q.dtype)
                if not host_checks:  # rows still cancelled keep last frame's output
                    mixed = torch.where(cancelled_rows(self.sums), self.output, mixed)
        # Kept per head (B, H, N, Dh): the next gate keeps the merged (B, N, D) copy, and two state tensors
        # holding one value in one layout could be merged into one buffer by a compiler (torch.compile does).
        self.output = store_(self.output, mixed)
        if selected_only and selection is not None:
            return merge_head_outputs(gather_tokens(mixed, selection))
        return merge_head_outputs(mixed)

    def selected_rows(self, selection: Selection | None, tokens: Tensor) -> Tensor:
        """A shared frame's attention (`EventfulViT.token_selection="shared"`) for the selected, normalised
        tokens (B, M, D) (every token on a full frame, `selection` None): their keys and values replace the
        cached ones, and their own output rows, against every key and value, are returned merged
        (B, M, heads * head_dim). Nothing else is kept: no query rows and no output rows (shared frames
        read neither; per-gate frames start again from a full frame)."""
        q, k, v = self._project(tokens, selection)
        scale = self.attention.scale
        if selection is None:
            self.k, self.v = store_(self.k, k), store_(self.v, v)
            self.last_path = "dense"
            return merge_head_outputs(fused_attention(q, self.k, self.v, scale, self.bias))
        scatter_tokens_(self.k, selection, k)
        scatter_tokens_(self.v, selection, v)
        self.last_path = "rows"
        return merge_head_outputs(fused_row_attention(q, self.k, self.v, scale, selection, self.bias))

    def drop_per_gate_state(self) -> None:
        """Release what only per-gate frames read (query rows, output rows, the incremental sums)."""
        self.q = self.output = None
        self.sums = None

    def _update_changed_rows(self, new_q: Tensor, selection: Selection, scale: float,
                             prefix_selected: bool = False) -> Tensor:
        """`changed_rows_only`: recompute the output rows of the selected queries `new_q` (B, H, M, Dh) and of the
        first `prefix_rows` tokens (unless `prefix_selected`: then they are among the selected) against the
        (updated) keys and values, in place; the other rows stay. Returns the selected queries' rows."""
        self.sums = None
        fresh = fused_row_attention(new_q, self.k, self.v, scale, selection, self.bias)
        scatter_tokens_(self.output, selection, fresh)
        if self.prefix_rows and not prefix_selected:  # the class token (and registers) every frame: their input never moves, but they
            # pool every token, and a classifier reads the class token; frozen, it would keep frame 1's answer
            count = self.prefix_rows
            prefix = Selection(torch.arange(count, device=new_q.device).expand(new_q.shape[0], count),
                               self.q.shape[2])
            self.output[:, :, :count] = fused_row_attention(self.q[:, :, :count], self.k, self.v, scale, prefix,
                                                            self.bias)
        self.last_path = "rows"
        return fresh

    def state_tensors(self) -> list[Tensor]:
        """Every tensor held between frames."""
        tensors = [self.q, self.k, self.v, self.output]
        if self.sums is not None:
            tensors += [self.sums.stabilizer, self.sums.numerator, self.sums.denominator]
        if self.bias is not None:
            tensors += self.bias.state_tensors()
        return [t for t in tensors if t is not None]


class EventfulBlock(nn.Module):
    """A timm pre-norm `Block` that recomputes only gated tokens; same parameters, no copies."""

    def __init__(self, block: Block, attention: nn.Module | None = None,
                 layer_scale: Callable[[nn.Module, int, Tensor], Tensor] | None = None,
                 pool: ScratchPool | None = None) -> None:
        """`attention`: the eventful attention to use (default: `EventfulAttention` over `block.attn`);
        `layer_scale(block, branch, x)`: the block's LayerScale of branch 1 or 2 (default: `block.ls1` / `ls2`);
        `pool`: the gates' shared work buffers."""
        super().__init__()
        object.__setattr__(self, "block", block)
        self.layer_scale = layer_scale or (lambda owner, branch, x: getattr(owner, f"ls{branch}")(x))
        self._timm_layer_scale = layer_scale is None  # ls1 / ls2 are timm's: a LayerScale fuses into its add
        self.attention = EventfulAttention(block.attn) if attention is None else attention
        self.attention_gate, self.projection_gate, self.mlp_gate = TokenGate(pool), TokenGate(pool), TokenGate(pool)
        self.projection_buffer, self.mlp_buffer = TokenBuffer(), TokenBuffer()

    def reset(self) -> None:
        for module in self.children():
            module.reset()

    def forward(self, x: Tensor, policy: TokenPolicy, incremental_max_fraction: float,
                update_all: bool = False, sync_free: bool = False, changed_rows_only: bool = False,
                indices: Tensor | None = None, shared: Selection | None = None, chooser: bool = False) -> Tensor:
        """One block over all tokens (B, N, D); `changed_rows_only`: see `EventfulAttention.forward`; `indices`
        (B, M): the tokens every gate passes on a partial frame (default: each gate chooses by its own error).

        `shared`: a partial frame's one selection for every gate (`EventfulViT.token_selection="shared"`, fewer
        than N tokens, the class token and registers among them), taken by a leaner path that computes the
        same values: the selection's flat row indices are built once for the frame, attention hands over only
        the selected rows, and only the gate that chose (`chooser`: the first block's attention gate) keeps
        its reference up to date.
        """
        if shared is not None and not update_all:
            return self._forward_shared(x, incremental_max_fraction, sync_free, changed_rows_only, shared, chooser)
        block, attn = self.block, self.block.attn
        selection, tokens = self.attention_gate(x, policy, update_all, indices)
        keep_sums = selection is None and not changed_rows_only \
            and policy.may_select_fewer_than(incremental_max_fraction, x.shape[1])
        # A shared selection holds the class token and registers (`EventfulViT.token_selection`)
        mixed = self.attention(selection, block.norm1(tokens), incremental_max_fraction, keep_sums, sync_free,
                               changed_rows_only, prefix_selected=indices is not None)
        selection, tokens = self.projection_gate(mixed, policy, update_all, indices)
        norm = getattr(attn, "norm", None)  # timm's ViT Attention has a norm before its projection; SAM's has none
        # The residual adds write into x: it is this frame's own tensor (the gates keep copies, and on a full
        # frame `tokens` is x itself but already consumed), and a fresh (B, N, D) tensor per add costs page
        # faults on the CPU at large N. The caller's input is copied once, before the first block.
        projected = attn.proj(tokens if norm is None else norm(tokens))
        x = x.add_(self.projection_buffer(selection, self.layer_scale(block, 1, projected)))
        selection, tokens = self.mlp_gate(x, policy, update_all, indices)
        return x.add_(self.mlp_buffer(selection, self.layer_scale(block, 2, block.mlp(block.norm2(tokens)))))

    def _forward_shared(self, x: Tensor, incremental_max_fraction: float, sync_free: bool, changed_rows_only: bool,
                        selection: Selection, chooser: bool) -> Tensor:
        """`forward` on a partial frame whose every gate passes `selection` (see `forward`'s `shared`)."""
        block, attn = self.block, self.block.attn
        tokens = gather_tokens(x, selection)
        self.attention_gate.follow(tokens, selection, keep_reference=chooser)
        mixed = self.attention(selection, block.norm1(tokens), incremental_max_fraction, False, sync_free,
                               changed_rows_only, prefix_selected=True, selected_only=True)
        self.projection_gate.follow(mixed, selection, keep_reference=False)
        norm = getattr(attn, "norm", None)
        projected = attn.proj(mixed if norm is None else norm(mixed))
        x = x.add_(self.projection_buffer(selection, self.layer_scale(block, 1, projected)))
        tokens = gather_tokens(x, selection)
        self.mlp_gate.follow(tokens, selection, keep_reference=False)
        return x.add_(self.mlp_buffer(selection, self.layer_scale(block, 2, block.mlp(block.norm2(tokens)))))

    def forward_selected(self, x: Tensor, selection: Selection | None, chooser: bool = False) -> Tensor:
        """The block over the selected tokens only (B, M, D) -> (B, M, D) (`EventfulViT._selected_tokens_frame`;
        every token for `selection` None): every gate passes `selection` (recorded for the diagnostics);
        `chooser`: the attention gate recorded it already (it chose)."""
        block, attn = self.block, self.block.attn
        if not chooser:
            self.attention_gate.follow(x, selection, keep_reference=False)
        mixed = self.attention.selected_rows(selection, block.norm1(x))
        self.projection_gate.follow(mixed, selection, keep_reference=False)
        norm = getattr(attn, "norm", None)
        x = self._add_branch(x, 1, attn.proj(mixed if norm is None else norm(mixed)))
        self.mlp_gate.follow(x, selection, keep_reference=False)
        return self._add_branch(x, 2, block.mlp(block.norm2(x)))

    def _add_branch(self, x: Tensor, branch: int, y: Tensor) -> Tensor:
        """x + the block's LayerScale of branch 1 or 2 applied to y; one fused multiply-add (`addcmul`) where
        that scale is timm's `LayerScale` (one kernel instead of two per branch: a shared GPU frame is bound by
        its kernel count)."""
        scale = getattr(self.block, f"ls{branch}", None) if self._timm_layer_scale else None
        if isinstance(scale, LayerScale):
            return torch.addcmul(x, y, scale.gamma)
        return x + self.layer_scale(self.block, branch, y)

    def drop_per_gate_state(self, chooser: bool = False) -> None:
        """Release the state only per-gate frames read (`EventfulViT.token_selection="shared"` keeps each
        layer's keys and values and the choosing gate's reference): buffers, the other gates' references,
        query and output rows."""
        gates = (self.projection_gate, self.mlp_gate) if chooser else (self.attention_gate, self.projection_gate,
                                                                        self.mlp_gate)
        for gate in gates:
            gate.reference = gate.indices = None
        self.projection_buffer.reset()
        self.mlp_buffer.reset()
        self.attention.drop_per_gate_state()

    def mark_held(self, batch: int, device: torch.device) -> None:
        """Record a held frame (`EventfulViT.hold_share`) of `batch` streams: no gate passed anything,
        attention did not run."""
        for gate in (self.attention_gate, self.projection_gate, self.mlp_gate):
            gate.mark_held(batch, device)
        self.attention.last_path = "held"

    def gate_counts(self) -> tuple[int | None, int | None, int | None]:
        """Tokens each gate let through on the last frame (attention, projection, MLP)."""
        return self.attention_gate.last_count, self.projection_gate.last_count, self.mlp_gate.last_count

    def state_tensors(self) -> list[Tensor]:
        """Every tensor held between frames (gates' references, buffers, attention caches; not the shared pool)."""
        tensors = [self.projection_buffer.state, self.mlp_buffer.state]
        for gate in (self.attention_gate, self.projection_gate, self.mlp_gate):
            tensors += [gate.reference, gate.indices]
        return self.attention.state_tensors() + [t for t in tensors if t is not None]
