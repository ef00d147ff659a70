"""`EventfulViT`: a timm VisionTransformer that, frame after frame, recomputes only changed tokens.

Integration glue: it reuses the wrapped model's patch embedding, position
embedding, final norm and head as they are (these are cheap, or run once per
frame on pooled features), and runs each transformer block through an
`EventfulBlock`. It shares every parameter with the original model and
leaves it unchanged; the original stays usable on its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from frugalvit.eventful.attention import INCREMENTAL_BREAK_EVEN_FRACTION, AttentionSums
from frugalvit.eventful.block import EventfulAttention, EventfulBlock
from frugalvit.eventful.gates import ScratchPool, Selection, TokenBuffer, gather_tokens, store_
from frugalvit.eventful.neck import EventfulNeck
from frugalvit.eventful.policies import TokenPolicy, is_real, is_whole
from frugalvit.eventful.relpos import TableBias
from frugalvit.eventful.windowed import EventfulWindowAttention
from frugalvit.timm import beit, embed_tokens, eva, sam

DEFAULT_INCREMENTAL_MAX_FRACTION = INCREMENTAL_BREAK_EVEN_FRACTION  # the CPU's default: where the MACs break even
# CUDA's default: every partial frame runs the fused attention kernel over the cached queries, keys and values
# (the same result). On an H100 in bfloat16 the incremental sums' many small products cost more than one fused
# kernel at every budget measured (ViT-B/16: 576 tokens, 1/8: 4.65 vs 2.35 ms per captured frame; 4,096 tokens:
# 29.2 vs 5.9 ms; benchmarks/results/eventful_gpu_explore.json).
CUDA_INCREMENTAL_MAX_FRACTION = 0.0
NONFINITE_MODES = ("error", "refresh")
ATTENTION_ROWS = ("all", "changed")
TOKEN_SELECTIONS = ("per_gate", "shared")


class _InferenceOnly(torch.autograd.Function):
    """Identity whose backward names the problem: eventful outputs carry no gradient."""

    @staticmethod
    def forward(ctx: object, output: Tensor, anchor: Tensor) -> Tensor:  # noqa: ARG004 - anchor only links the graph
        return output.view_as(output)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[None, None]:  # noqa: ARG004
        raise RuntimeError("eventful inference does not train: EventfulViT reuses cached tokens and records no "
                           "gradients; train (or fine-tune) the original model, then convert it with "
                           "frugalvit.eventful(model, policy)")


def _inference_only(method):  # noqa: ANN001, ANN202 - decorator over EventfulViT methods
    """Run `method` without autograd; where gradients are on, make a backward through its output fail clearly."""

    def wrapper(self: "EventfulViT", *args: object, **kwargs: object) -> Tensor:
        grad_enabled = torch.is_grad_enabled()
        with torch.no_grad():
            output = method(self, *args, **kwargs)
        anchor = next((p for p in self.model.parameters() if p.requires_grad), None) if grad_enabled else None
        return output if anchor is None else _InferenceOnly.apply(output, anchor)

    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = method.__name__, method.__qualname__, method.__doc__
    return wrapper


# Partial frames run eagerly before a capture: the first creates the last lazily allocated state (gate scratch,
# selection buffers), so a compiled `step` sees its final guards (and compiles for them) before the capture.
CAPTURE_WARM_UP_FRAMES = 2
# What the eventful modules record about a frame in plain attributes (`gate_counts`, `updated_tokens`,
# `attention_paths`): a graph replay runs no Python and a one-stream pass must not overwrite them.
_DIAGNOSTICS = ("last_count", "last_indices", "last_path", "last_windows")


class CudaGraphFrame:
    """One partial frame's work recorded as a CUDA graph over static input and output buffers.

    Capturing records the kernels without running them, so the state is not
    touched; every replay then reads and writes the state tensors in place
    (their addresses never change: see `store_`).
    """

    @staticmethod
    def available(device: torch.device) -> bool:
        return device.type == "cuda"

    @staticmethod
    def warm_up(frame: Callable[[Tensor], Tensor], tokens: Tensor) -> Tensor:
        """Run `frame` eagerly on a side stream, so that lazy initialisation stays out of the capture."""
        side, current = torch.cuda.Stream(tokens.device), torch.cuda.current_stream(tokens.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            features = frame(tokens)
        current.wait_stream(side)
        return features

    def __init__(self, key: tuple[object, ...], frame: Callable[[Tensor], Tensor], example: Tensor) -> None:
        self.key = key
        self.input = torch.empty_like(example)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = frame(self.input)

    def replay(self, tokens: Tensor) -> Tensor:
        self.input.copy_(tokens)
        self.graph.replay()
        return self.output.clone()  # the static output is overwritten by the next replay


class UnsupportedModelError(TypeError):
    """The model (or one of its modules) has a structure the conversion does not handle."""


def check_convertible(model: nn.Module) -> None:
    """Raise `UnsupportedModelError` naming the first module that cannot be made eventful."""
    for family, glue, matches in (("SAM backbone", sam, sam.is_sam), ("BEiT model", beit, beit.is_beit),
                                  ("EVA model", eva, eva.is_eva)):
        if matches(model):
            try:
                glue.check_supported(model)
            except TypeError as error:
                raise UnsupportedModelError(f"cannot make this {family} eventful: {error}") from None
            return
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(
            f"frugalvit.eventful supports timm VisionTransformer, VisionTransformerSAM, Beit and Eva models (and "
            f"their subclasses); got {type(model).__name__}")
    for index, block in enumerate(model.blocks):
        name = f"blocks.{index}"
        if not isinstance(block, Block):
            raise UnsupportedModelError(
                f"cannot make {name} ({type(block).__name__}) eventful: only timm's pre-norm Block is supported")
        if not isinstance(block.attn, Attention):
            raise UnsupportedModelError(
                f"cannot make {name}.attn ({type(block.attn).__name__}) eventful: only timm's Attention is supported")
        # The eventful blocks compute timm's Block and Attention from their layers: a subclass with its own
        # forward (e.g. EcoFormer's hashed attention) would silently be replaced by timm's arithmetic.
        for part, module, base in ((name, block, Block), (f"{name}.attn", block.attn, Attention)):
            if type(module).forward is not base.forward:
                raise UnsupportedModelError(
                    f"cannot make {part} ({type(module).__name__}) eventful: it overrides timm's "
                    f"{base.__name__}.forward, which the eventful blocks would replace with timm's own arithmetic; "
                    "convert the original timm model (e.g. before frugalvit.ecoformer)")
        if getattr(block.attn, "gate", None) is not None:
            raise UnsupportedModelError(f"cannot make {name}.attn eventful: gated attention is not supported")


class EventfulViT(nn.Module):
    """Stateful frame-by-frame inference over a timm ViT. Call `reset()` between sequences.

    Attributes (plain, settable between any two frames):
        policy: the `TokenPolicy` every gate uses (the compute budget).
        incremental_max_fraction: attention updates incrementally while at most
            this fraction of tokens changed, and recomputes densely (fused) above it;
            None (default) picks by device: 1/3 on the CPU (where the
            multiply-accumulates break even), 0 on CUDA (the fused kernel over the
            cached tokens is faster there at every budget; see
            `attention_switch`).
        attention_rows: which attention rows a partial frame brings up to date.
            "all" (default): every row, exactly for the gated queries, keys and
            values (the incremental sums or the fused kernel above). "changed":
            only the rows of the queries the gate let through, and those of
            the class token and registers (they pool every token, and a
            classifier reads the class token; their own input never moves, so
            otherwise they would never update), recomputed against every key
            and value with the fused kernel; every other row
            keeps its last output although M keys and values changed under it
            (an approximation on top of the gating: such a token sees the change
            through attention only once its own input moves enough, or on the
            next full frame). Attention then costs 2 M N Dh per head instead of
            the incremental 6 M N Dh or the fused 2 N^2 Dh, so a frame's cost
            shrinks with the budget at large N (at 4,096 tokens and 1/8 on an
            H100, the fused pass over all queries took 1.6 of 5.9 ms). Selecting
            every token through this path reproduces the dense model. With
            `token_selection="shared"` on a plain token sequence neither
            setting (nor `incremental_max_fraction`) applies: a shared frame
            computes only the selected rows, which is exact for it.
        token_selection: how a partial frame chooses its tokens. "per_gate"
            (default, the paper's): each of the 3 x depth gates picks, with the
            policy, the tokens whose own input moved most since that gate last
            passed them. "shared": the first gate picks (its input is the
            embedded frame; the class token and registers always, as they
            pool every token) and every gate passes those same tokens, so a token
            is recomputed through the whole network or not at all; the other
            gates compute no error and run no selection (at 4,096 tokens on an
            H100, the 36 top-k selections of a ViT-B frame took 41% of its
            GPU kernel time). On a plain token sequence (no windowed attention,
            no neck) only the selected tokens then go through the blocks:
            attention computes their own rows (the others' would be dropped by
            the next gate, so `attention_rows` changes nothing here), and every
            other token's output is its fresh embedding plus what the blocks
            added to it when it was last computed (`residual`). Switching
            between the two mid-sequence computes the next frame in full. A
            data-dependent policy (`Threshold`, `RelativeThreshold`)
            synchronises once per frame instead of once per gate. With
            `capture=True` this is the GPU configuration (H200, bf16, 1/8,
            ViT-B at 4,096 tokens: 1.76 ms per frame; dense captured 3.75 ms
            in the same run; dense compiled and captured 3.52 ms in an earlier
            run). Fidelity on
            real weights and the GPU runs: docs/eventful.md, "One selection
            per frame".
        refresh_every: if set, every K-th frame recomputes all tokens (bounds drift).
        cut_share: if set, a frame in which more than this share of the input
            tokens moved by more than `cut_relative_error` of their own norm
            (since they were last computed) is a scene cut and is recomputed in full.
        cut_relative_error: see `cut_share` and `hold_share`.
        hold_share: if set (with `cut_share` above it), a frame in which more
            than this share of the input tokens moved by more than
            `cut_relative_error` since last computed, but no more than
            `cut_share`, is held: nothing is computed beyond the patch
            embedding, and the output of the last computed frame is returned
            (`last_frame_held`). Why: when a change is widespread (a pan), a
            partial update mixes fresh and stale tokens into an output worse
            than the stale frame itself, while holding costs nothing; the
            change since last computed keeps growing while held, so a full
            frame follows once it passes `cut_share`, or after
            `max_held_frames` held frames in a row. Small, local changes still
            get partial updates. With several streams, a frame is held only
            when every stream would hold. The decision costs one host
            synchronisation per frame, before the frame runs, also with
            `sync_free` or `capture` (the frame itself stays sync-free and
            captured; cuts are then applied at once, not a frame late).
        max_held_frames: at most this many frames in a row are held; the next
            frame that would hold is computed in full instead (bounds staleness).
        nonfinite: what a frame with a NaN or infinite value does. "error"
            (default) raises ValueError; "refresh" returns the dense model's
            output for it (non-finite, as the dense model's is) and computes the
            next frame in full, since the cached state cannot be trusted across
            it. Checking costs one host synchronisation per frame.
        sync_free: False (default) keeps the host checks above and, on the
            CPU, the exact dense rebuild of attention rows that stay cancelled.
            True removes every host synchronisation from a frame with a
            fixed-size policy (`TopR`, `TopFraction`): non-finite frames are
            not checked (they yield non-finite outputs and state, as in the
            dense model, until `reset()`), cancelled attention rows keep their
            previous output for a frame, as on CUDA, and a `cut_share` scene
            cut is flagged per stream on the device and that stream is
            recomputed in full on the next frame (one frame late; the host
            reads the previous frame's flags, never waits for this frame's).
            `step` is then one graph: `torch.compile(ev.step, fullgraph=True)`
            traces it with no break (tested), which is what CUDA-graph capture
            needs. `Threshold` policies keep one sync per gate.
        capture: True replays each partial frame on CUDA as one captured CUDA
            graph (all blocks: a few hundred kernels for one launch), which
            removes the host from the frame; implies `sync_free` and needs a
            fixed-size policy (`TopR`, `TopFraction`). The first two partial
            frames after a change of policy, `incremental_max_fraction`,
            `attention_rows`, `token_selection`, frame shape or dtype, or after `reset()`, run
            eagerly (warm-up) and the next one captures; full frames (first,
            refresh, scene cut) run eagerly and write into the same state buffers. Outputs are copies, safe
            to keep. On the CPU there is no graph: the frame runs as with
            `sync_free`.

    `recorder` (class attribute) records and replays a captured frame:
    `CudaGraphFrame`; tests substitute a CPU recorder with the same semantics.

    Inference only: `train()` raises (the wrapped model is shared and stays as
    it is), and a backward pass through an output raises a clear error.
    """

    recorder: type[CudaGraphFrame] = CudaGraphFrame

    def __init__(self, model: VisionTransformer, policy: TokenPolicy,
                 incremental_max_fraction: float | None = None,
                 refresh_every: int | None = None, cut_share: float | None = None,
                 cut_relative_error: float = 0.5, nonfinite: str = "error", capture: bool = False,
                 hold_share: float | None = None, max_held_frames: int = 3, attention_rows: str = "all",
                 token_selection: str = "per_gate") -> None:
        super().__init__()
        check_convertible(model)
        self.model = model
        self._sam, self._beit, self._eva = sam.is_sam(model), beit.is_beit(model), eva.is_eva(model)
        self._scratch = ScratchPool()  # the gates' shared work buffer
        if self._eva:
            blocks = (EventfulBlock(block, EventfulAttention(block.attn, eva.split_qkv, eva.rotate), eva.layer_scale,
                                    self._scratch) for block in model.blocks)
        elif self._beit:
            blocks = (EventfulBlock(block, EventfulAttention(block.attn, beit.split_qkv), beit.layer_scale,
                                    self._scratch) for block in model.blocks)
        else:
            blocks = (EventfulBlock(block, EventfulWindowAttention(block.attn, block.window_size)
                                    if self._sam and block.window_size > 0 else None, pool=self._scratch)
                      for block in model.blocks)
        self.eventful_blocks = nn.ModuleList(blocks)
        self._prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)  # class token, registers
        for block in self.eventful_blocks:  # attention_rows="changed" recomputes the class token and registers too
            if isinstance(block.attention, EventfulAttention):
                block.attention.prefix_rows = self._prefix_tokens
        self._grid: tuple[int, int] | None = None  # the token grid of this sequence (SAM backbones)
        neck = sam.conv_neck(model) if self._sam else None
        self.eventful_neck = None if neck is None else EventfulNeck(neck, self._scratch)
        # token_selection="shared" on a plain token sequence (global attention, no neck) runs only the selected
        # tokens through the blocks (`_selected_tokens_frame`); it keeps what the blocks add to every token
        self._selected_tokens_path = not self._sam and self.eventful_neck is None and all(
            type(block.attention) is EventfulAttention for block in self.eventful_blocks)
        self.residual = TokenBuffer()
        self.policy = policy
        self.incremental_max_fraction = incremental_max_fraction
        self.attention_rows = attention_rows
        self.token_selection = token_selection
        self.refresh_every = refresh_every
        self.cut_share = cut_share
        self.cut_relative_error = cut_relative_error
        self.hold_share = hold_share
        self.max_held_frames = max_held_frames
        self.nonfinite = nonfinite
        self.sync_free = False
        self.capture = capture
        self._graph: CudaGraphFrame | None = None
        self._graph_diagnostics: list[tuple[dict[str, object], str, object]] = []
        self._warm_up: tuple[tuple[object, ...] | None, int] = (None, 0)  # (key, eager partial frames run)
        self.last_frame_full = False
        self.last_frame_held = False
        self._last_features: Tensor | None = None  # the last computed frame's output, for held frames
        self._held_in_a_row = 0
        self._frame_shape: tuple[int, ...] | None = None
        self._frame_kind: tuple[torch.dtype, torch.device] | None = None  # the sequence's frame dtype and device
        self._frames_since_refresh = 0
        self._refresh_pending = False
        self._streams_pending: set[int] = set()
        # sync-free scene cuts: (host copy of the last frame's per-stream flags, its CUDA event or None,
        # streams that frame recomputed in full anyway)
        self._pending_cuts: tuple[Tensor, torch.cuda.Event | None, frozenset[int]] | None = None

    def __setattr__(self, name: str, value: object) -> None:
        if name == "policy" and not isinstance(value, TokenPolicy):
            raise TypeError(f"policy must be a frugalvit TokenPolicy (TopR, TopFraction, Threshold, ...), "
                            f"got {type(value).__name__}")
        if name == "incremental_max_fraction" and value is not None \
                and not (is_real(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"incremental_max_fraction must be None (by device) or lie in [0, 1], got {value!r}")
        if name == "attention_rows" and value not in ATTENTION_ROWS:
            raise ValueError(f"attention_rows must be one of {', '.join(ATTENTION_ROWS)}, got {value!r}")
        if name == "token_selection" and value not in TOKEN_SELECTIONS:
            raise ValueError(f"token_selection must be one of {', '.join(TOKEN_SELECTIONS)}, got {value!r}")
        if name == "token_selection" and getattr(self, "token_selection", value) != value:
            # Shared frames keep only the choosing gate's reference and the residual sums, per-gate frames
            # the other gates' references and buffers instead: a mid-sequence switch costs one full frame.
            super().__setattr__("_refresh_pending", True)
        if name == "refresh_every" and value is not None and not (is_whole(value) and value >= 1):
            raise ValueError(f"refresh_every must be None or an integer >= 1, got {value!r}")
        if name == "cut_share" and value is not None and not (is_real(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"cut_share must be None or lie in [0, 1], got {value!r}")
        if name == "hold_share" and value is not None and not (is_real(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"hold_share must be None or lie in [0, 1], got {value!r}")
        if name == "max_held_frames" and not (is_whole(value) and value >= 1):
            raise ValueError(f"max_held_frames must be an integer >= 1, got {value!r}")
        if name == "cut_relative_error" and not (is_real(value) and value >= 0.0):
            raise ValueError(f"cut_relative_error must be >= 0, got {value!r}")
        if name in ("sync_free", "capture") and not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
        if name == "nonfinite" and value not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {', '.join(NONFINITE_MODES)}, got {value!r}")
        super().__setattr__(name, value)

    def reset(self, stream: int | None = None) -> None:
        """Forget all state: the next frame starts a new sequence and is computed in full.

        `stream=i`: only stream (batch row) i starts over: on the next frame its
        row is computed in full (a batch-of-one dense pass through the eventful
        blocks, written into its rows of the state), while the other streams
        go on incrementally, undisturbed (a server adding or replacing a camera).
        """
        if stream is not None:
            self._reset_stream(stream)
            return
        for block in self.eventful_blocks:
            block.reset()
        if self.eventful_neck is not None:
            self.eventful_neck.reset()
        self.residual.reset()
        self._scratch.clear()
        self._graph, self._warm_up = None, (None, 0)  # the state is reallocated on the next frame
        self._grid = None
        self._frame_shape = None
        self._frame_kind = None
        self._frames_since_refresh = 0
        self._refresh_pending = False
        self._streams_pending = set()
        self._pending_cuts = None
        self._last_features = None
        self._held_in_a_row = 0
        self.last_frame_held = False

    def refresh(self, stream: int | None = None) -> None:
        """Recompute every token on the next frame (e.g. after a scene cut), keeping the sequence.

        `stream=i`: recompute only stream i's row in full on the next frame (see `reset(stream=i)`; for one
        stream, refreshing and starting over are the same: its whole state is rewritten).
        """
        if stream is not None:
            self._reset_stream(stream)
            return
        self._refresh_pending = True

    def _reset_stream(self, stream: int) -> None:
        if not isinstance(stream, int) or isinstance(stream, bool):
            raise TypeError(f"stream must be an integer batch row, got {stream!r}")
        if self._frame_shape is not None and not 0 <= stream < self._frame_shape[0]:
            raise ValueError(f"stream {stream} does not exist: this sequence has {self._frame_shape[0]} streams "
                             f"(batch rows 0..{self._frame_shape[0] - 1})")
        if self._frame_shape is not None:  # before the first frame every stream is computed in full anyway
            self._streams_pending.add(stream)

    def _check_frame(self, images: Tensor) -> None:
        if images.dim() != 4:
            raise ValueError(f"expected a batch of frames shaped (B, C, H, W), got shape {tuple(images.shape)}")
        embed = self.model.patch_embed  # a hybrid's proj reads its CNN's features, not the frame: no check there
        channels = embed.proj.in_channels if hasattr(embed, "proj") and not hasattr(embed, "backbone") else None
        if channels is not None and images.shape[1] != channels:
            raise ValueError(f"the model takes {channels}-channel frames, got {images.shape[1]} channels "
                             f"(shape {tuple(images.shape)})")
        if self._frame_shape is not None and tuple(images.shape) != self._frame_shape:
            raise ValueError(f"frame shape {tuple(images.shape)} differs from this sequence's {self._frame_shape}; "
                             "call reset() to start a new sequence with a different batch or frame size")
        reference = self.eventful_blocks[0].attention_gate.reference
        if reference is not None and reference.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError("this sequence started under torch.inference_mode(), whose state tensors cannot be "
                             "updated outside it: run every frame of a sequence under inference_mode (or every one "
                             "under no_grad), or call reset() to start again")
        if self._frame_kind is not None and (images.dtype, images.device) != self._frame_kind:
            # the state (references, caches, the held output) is in the sequence's dtype and on its device
            raise ValueError(f"frame dtype/device {images.dtype} on {images.device} differs from this sequence's "
                             f"{self._frame_kind[0]} on {self._frame_kind[1]}; call reset() after moving or casting "
                             "the model (ev.to(...)) to start a new sequence in the new dtype or on the new device")

    def train(self, mode: bool = True) -> "EventfulViT":
        """`eval()` as usual; `train()` raises instead of switching the shared wrapped model to training mode."""
        if mode:
            raise RuntimeError("eventful inference does not train, and ev.train() would switch the shared original "
                               "model to training mode: train the original model (ev.model.train()) and convert it "
                               "again with frugalvit.eventful(model, policy)")
        return super().train(False)

    @_inference_only
    def forward_features(self, images: Tensor) -> Tensor:
        """Final-normed tokens (B, N, D) of this frame, as the wrapped model's `forward_features` gives."""
        if self.model.training:
            raise RuntimeError("EventfulViT is for inference: call .eval() on it (or the wrapped model) first")
        self._check_frame(images)
        if self.hold_share is not None:
            if self.cut_share is None or self.hold_share >= self.cut_share:
                raise ValueError(f"hold_share ({self.hold_share}) needs a larger cut_share (now {self.cut_share}): "
                                 "held frames end with a full frame once the change passes cut_share; set e.g. "
                                 "ev.cut_share = 0.5 with ev.hold_share = 0.15")
        if self.capture and not self.policy.fixed_size:
            raise ValueError(f"capture=True needs a fixed-size policy (TopR, TopFraction): {self.policy!r} selects "
                             "a data-dependent number of tokens, so a frame has no fixed shapes to capture; "
                             "use TopFraction, or set ev.capture = False")
        # One host sync: the cache must not absorb NaN/inf.
        if not self._sync_free and not bool(torch.isfinite(images).all()):
            if self.nonfinite == "error":
                raise ValueError("frame contains NaN or infinite values; check the input pipeline, or set "
                                 "ev.nonfinite = 'refresh' to get the dense model's output for such frames")
            self.reset()
            self.last_frame_full = True
            return self.model.forward_features(images)
        update_all = self._frame_shape is None or self._refresh_pending or (
            self.refresh_every is not None and self._frames_since_refresh >= self.refresh_every)
        x = self._embed(images)
        # With hold_share the host decides each frame (one sync, before any block runs); otherwise a sync-free
        # cut is decided on the device and applied on the next frame.
        if self._sync_free and self.cut_share is not None and self.hold_share is None:
            self._apply_deferred_cuts(x.shape[0])
            if len(self._streams_pending) == x.shape[0]:  # every stream is cut: one full frame
                update_all, self._streams_pending = True, set()
            if not update_all:
                self._detect_cuts_async(x)
        else:
            cut, hold = (False, False) if update_all else self._cut_or_hold(x)  # no sync when already full
            update_all = update_all or cut
            if hold and not update_all and not self._streams_pending:  # a stream reset is never held off
                if self._held_in_a_row < self.max_held_frames:
                    return self._hold()
                update_all = True  # held long enough: staleness is bounded by a full frame
        self.last_frame_full, self.last_frame_held, self._held_in_a_row = update_all, False, 0
        if self.capture and not update_all and self.recorder.available(x.device):
            features = self._captured_step(x)
        else:
            features = self.step(x, update_all)
        if self._streams_pending and not update_all:
            for stream in sorted(self._streams_pending):
                features[stream:stream + 1] = self._full_stream(x[stream:stream + 1], stream)
        self._streams_pending = set()
        self._frame_shape = tuple(images.shape)
        self._frame_kind = (images.dtype, images.device)
        self._refresh_pending = False
        self._frames_since_refresh = 1 if update_all else self._frames_since_refresh + 1
        if self.hold_share is not None:  # a copy: the caller may write into the output it gets
            self._last_features = store_(self._last_features, features)
        else:  # not kept up to date while held frames are off: none may be held from it when they come back on
            self._last_features = None
        return features

    def _hold(self) -> Tensor:
        """A held frame: the state is untouched, the last computed output returned (a copy, safe to keep)."""
        self.last_frame_full, self.last_frame_held = False, True
        self._held_in_a_row += 1  # (the frame shape was checked against the sequence's: nothing to record)
        self._frames_since_refresh += 1
        reference = self.eventful_blocks[0].attention_gate.reference
        for block in self.eventful_blocks:  # diagnostics: no gate let anything through
            block.mark_held(reference.shape[0], reference.device)
        return self._last_features.clone()

    def _eventful_modules(self) -> list[nn.Module]:
        """The modules that hold per-frame state (not the wrapped model's)."""
        modules = list(self.eventful_blocks.modules()) + [self.residual]
        return modules + ([] if self.eventful_neck is None else list(self.eventful_neck.modules()))

    def _diagnostics(self) -> list[tuple[dict[str, object], str, object]]:
        """(attribute dict, name, value) of every diagnostic attribute now set, for restoring it later."""
        return [(module.__dict__, name, module.__dict__[name]) for module in self._eventful_modules()
                for name in _DIAGNOSTICS if name in module.__dict__]

    def _full_stream(self, tokens: Tensor, stream: int) -> Tensor:
        """One stream's frame computed in full, its state rows rewritten in place; other streams untouched.

        Every state tensor is batch-first: for the pass, each is swapped for
        its row `stream` (a view), so the full-frame code writes into that row;
        then the batch tensors and the last batch frame's diagnostics return.
        """
        swapped = self._diagnostics()
        for module in self._eventful_modules():
            for name, tensor in list(module._buffers.items()):
                if tensor is not None:
                    swapped.append((module._buffers, name, tensor))
                    module._buffers[name] = tensor[stream:stream + 1]
            sums = module.__dict__.get("sums")
            if "sums" in module.__dict__:  # restored afterwards, None too: the stream's own sums must not stay
                swapped.append((module.__dict__, "sums", sums))
            if sums is not None:
                module.__dict__["sums"] = AttentionSums(*(t[stream:stream + 1] for t in
                                                          (sums.stabilizer, sums.numerator, sums.denominator)))
            bias = module.__dict__.get("bias")  # per-row position terms, where the bias caches them
            if getattr(bias, "rel_h", None) is not None:
                swapped += [(bias.__dict__, "rel_h", bias.rel_h), (bias.__dict__, "rel_w", bias.rel_w)]
                bias.rel_h, bias.rel_w = bias.rel_h[stream:stream + 1], bias.rel_w[stream:stream + 1]
        try:
            return self.step(tokens, True)
        finally:
            for owner, name, value in reversed(swapped):
                owner[name] = value

    def step(self, tokens: Tensor, update_all: bool) -> Tensor:
        """The per-frame tensor work: embedded tokens (B, N, D) -> final-normed tokens, updating the state.

        `forward_features` embeds the frame, decides `update_all` (first frame,
        refresh, scene cut) and calls this. With `sync_free` and a fixed-size
        policy it contains no host synchronisation and no data-dependent Python
        branch, so it can be compiled whole (`fullgraph=True`) and captured.
        """
        embedded = tokens
        first = self.eventful_blocks[0].attention_gate
        shared_frame = self.token_selection == "shared"
        if shared_frame and self._selected_tokens_path and (update_all or first.reference is None):
            return self._selected_tokens_frame(embedded, None)
        indices = shared = None  # token_selection="shared": the first gate's choice, passed by every gate
        if shared_frame and not update_all and first.reference is not None:
            # The class token and registers always: their input never moves, but they pool every token (and a
            # classifier reads the class token), so chosen by their input alone they would never update.
            indices = first.choose(tokens, self.policy, always=self._prefix_tokens)
            if indices.shape[1] < tokens.shape[1]:  # else every gate passes all tokens, as on a full frame
                # Kept in the choosing gate's state buffer: every gate's diagnostics point at one tensor whose
                # address a captured frame keeps (a replay rewrites it)
                first.indices = store_(first.indices, indices)
                shared, indices = Selection(first.indices, tokens.shape[1]), None
                if self._selected_tokens_path:
                    return self._selected_tokens_frame(embedded, shared)
            elif self._selected_tokens_path:  # the policy chose every token
                return self._selected_tokens_frame(embedded, None)
        # The blocks add their residuals in place: never into the caller's tensor. Row-major copy: an embedding
        # may hand over a permuted view (SAM's patch embedding is channels-first in memory), and every gate
        # and residual add over such a layout runs several times slower.
        tokens = tokens.clone(memory_format=torch.contiguous_format)
        switch = self.attention_switch(tokens.device)
        changed_rows = self.attention_rows == "changed"
        for index, block in enumerate(self.eventful_blocks):
            tokens = block(tokens, self.policy, switch, update_all, self._sync_free, changed_rows, indices,
                           shared=shared, chooser=index == 0)
        if self.eventful_neck is not None:
            return self.eventful_neck(tokens, self._grid, self.policy, update_all)
        if self._sam:
            return sam.finish_grid(self.model, tokens, self._grid)
        return self.model.norm(tokens)

    def _selected_tokens_frame(self, embedded: Tensor, selection: Selection | None) -> Tensor:
        """A shared frame on a plain token sequence: only the selected tokens go through the blocks (every
        token on a full frame, `selection` None).

        With one selection for every gate, a token is recomputed through the
        whole network or not at all, so the frame is the same as running the
        per-gate machinery with that selection everywhere, in less work: the
        selected rows (B, M, D) flow through the blocks (attention over their
        own query rows against every key and value: the other rows' outputs
        would be dropped by the next gate anyway), and every other token's
        output is its fresh embedding plus what the blocks added to it when it
        was last computed (`residual`, (B, N, D), rewritten at the selected
        rows). No buffer, no full-size residual add per block, one gather and
        one scatter per frame instead of 3 x depth of each. The state is the
        first gate's reference, each layer's keys and values and `residual`
        (ViT-B in bf16 at 4,096 tokens: 162 MiB per stream instead of 654 MiB
        per gate): a full frame drops what only per-gate frames use.
        """
        first = self.eventful_blocks[0].attention_gate
        if selection is None:
            for index, block in enumerate(self.eventful_blocks):
                block.drop_per_gate_state(chooser=index == 0)
        start = embedded if selection is None else gather_tokens(embedded, selection)
        first.follow(start, selection, keep_reference=True)
        tokens = start
        for index, block in enumerate(self.eventful_blocks):
            tokens = block.forward_selected(tokens, selection, chooser=index == 0)
        added = self.residual(selection, tokens - start)
        return self.model.norm(tokens if selection is None else embedded + added)

    def _embed(self, images: Tensor) -> Tensor:
        """Tokens (B, N, D) entering the first block; on a SAM backbone, also fixes the sequence's grid."""
        model = self.model
        if self._eva:
            tokens, rope = eva.embed_tokens(model, images)
            if self._grid is None:  # first frame of a sequence: every token's rotary embedding row
                rows = None if rope is None else eva.rotary_rows(model, rope)
                for block in self.eventful_blocks:
                    block.attention.set_rotary(rows)
                self._grid = tuple(model.patch_embed.grid_size)
            return tokens
        if self._beit:
            tokens = beit.embed_tokens(model, images)
            if self._grid is None:  # first frame of a sequence: each layer's relative position bias table
                for block in self.eventful_blocks:
                    table = beit.position_bias(model, block.block)
                    block.attention.bias = None if table is None else TableBias(table)
                self._grid = tuple(model.patch_embed.grid_size)
            return tokens
        if not self._sam:
            return embed_tokens(model, images)
        tokens, grid = sam.embed_grid(model, images)
        if grid != self._grid:  # first frame of a sequence: window maps and relative-position tables
            for block in self.eventful_blocks:
                window = getattr(block.attention, "window", 0)
                tables = sam.relative_positions(block.block.attn, (window, window) if window else grid)
                block.attention.prepare(grid, None if tables is None else (tables.height, tables.width),
                                        tokens.device)
            self._grid = grid
        return tokens

    @property
    def _sync_free(self) -> bool:
        return self.sync_free or self.capture

    def _captured_step(self, tokens: Tensor) -> Tensor:
        """A partial frame on CUDA through the captured graph: warm up, capture, then replay (see `capture`)."""
        key = (tuple(tokens.shape), tokens.dtype, tokens.device, self.policy, self.incremental_max_fraction,
               self.attention_rows, self.token_selection)
        if self._graph is not None and self._graph.key == key:
            features = self._graph.replay(tokens)
            for owner, name, value in self._graph_diagnostics:  # a replay runs no Python: restore what it set
                owner[name] = value
            return features
        self._graph = None
        frame = lambda static: self.step(static, False)  # noqa: E731
        if self._warm_up[0] != key:
            self._warm_up = (key, 0)
        if self._warm_up[1] < CAPTURE_WARM_UP_FRAMES:
            self._warm_up = (key, self._warm_up[1] + 1)
            return self.recorder.warm_up(frame, tokens)
        self._graph = self.recorder(key, frame, tokens)
        self._graph_diagnostics = self._diagnostics()
        return self._graph.replay(tokens)

    def _cut_flags(self, tokens: Tensor) -> Tensor | None:
        """(B,) bool on the tokens' device: which streams' input moved like a scene cut; None before a reference."""
        share = None if self.cut_share is None else self._moved_share(tokens)
        return None if share is None else share > self.cut_share

    def _moved_share(self, tokens: Tensor) -> Tensor | None:
        """(B,) share of each stream's input tokens that moved by more than `cut_relative_error` of their norm
        since last computed (against the first gate's reference); None before a reference."""
        reference = self.eventful_blocks[0].attention_gate.reference
        if reference is None:
            return None
        moved = torch.linalg.vector_norm(reference - tokens, dim=-1)
        relative = moved / torch.linalg.vector_norm(reference, dim=-1).clamp_min(1e-12)
        return (relative > self.cut_relative_error).float().mean(dim=-1)

    def _cut_or_hold(self, tokens: Tensor) -> tuple[bool, bool]:
        """(scene cut in any stream, every stream would hold), read with one host synchronisation."""
        if self.cut_share is None:
            return False, False
        share = self._moved_share(tokens)
        if share is None:
            return False, False
        cut = (share > self.cut_share).any()
        if self.hold_share is None or self._last_features is None:
            return bool(cut.item()), False
        flags = torch.stack([cut, (share > self.hold_share).all()]).tolist()
        return bool(flags[0]), bool(flags[1])

    def _detect_cuts_async(self, tokens: Tensor) -> None:
        """Start copying this frame's per-stream cut flags to the host without waiting for them (sync-free cuts).

        Streams already recomputed in full on this frame are left out when the flags are applied.
        """
        flags = self._cut_flags(tokens)
        if flags is None:
            return
        if flags.is_cuda:
            host = torch.empty(flags.shape, dtype=torch.bool, pin_memory=True)
            host.copy_(flags, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = flags, None
        self._pending_cuts = (host, event, frozenset(self._streams_pending))

    def _apply_deferred_cuts(self, batch: int) -> None:
        """Streams flagged as cut on the previous frame are recomputed in full on this one (`reset(stream=i)`).

        Waits, if at all, only for the previous frame's flag copy (done by the time its output was read).
        """
        if self._pending_cuts is None:
            return
        host, event, refreshed = self._pending_cuts
        self._pending_cuts = None
        if event is not None:
            event.synchronize()
        if host.shape[0] != batch:
            return
        for stream in host.nonzero().flatten().tolist():
            if stream not in refreshed:
                self._streams_pending.add(stream)

    @_inference_only
    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        return self.model.forward_head(features, pre_logits=pre_logits)

    def forward(self, images: Tensor) -> Tensor:
        """The wrapped model's output (logits) for this frame."""
        return self.forward_head(self.forward_features(images))

    def gate_counts(self) -> list[tuple[int | None, int | None, int | None]]:
        """Per block, the tokens each gate (attention, projection, MLP) updated on the last frame."""
        return [block.gate_counts() for block in self.eventful_blocks]

    def updated_tokens(self) -> Tensor | None:
        """Per sample and token (B, N): how many of the 3 x depth gates recomputed it on the last frame.

        None before the first frame. A token at 0 kept every stored value; at
        3 x depth it was recomputed throughout, as on a dense frame.
        """
        reference = self.eventful_blocks[0].attention_gate.reference
        if reference is None:
            return None
        batch, num_tokens = reference.shape[:2]
        counts = torch.zeros(batch, num_tokens, dtype=torch.int32, device=reference.device)
        for block in self.eventful_blocks:
            for gate in (block.attention_gate, block.projection_gate, block.mlp_gate):
                if gate.last_indices is None:
                    counts += 1
                else:
                    counts.scatter_add_(1, gate.last_indices, torch.ones_like(gate.last_indices, dtype=torch.int32))
        return counts

    def attention_paths(self) -> list[str]:
        """Per block, how attention ran on the last frame: dense, dense+sums (a full update that keeps the
        incremental path's sums), incremental, rebuild, rows (`attention_rows="changed"`), skipped, windows
        (SAM's windowed layers), or held (a frame `hold_share` held)."""
        return [block.attention.last_path for block in self.eventful_blocks]

    def state_tensors(self) -> list[Tensor]:
        """Every tensor the state holds now. After the first frame, with a fixed-size policy, these stay the
        same tensors at the same addresses frame after frame (written in place), which graph capture needs."""
        tensors = [tensor for block in self.eventful_blocks for tensor in block.state_tensors()]
        tensors += [] if self.eventful_neck is None else self.eventful_neck.state_tensors()
        tensors += [] if self.residual.state is None else [self.residual.state]
        return tensors + self._scratch.tensors()

    def attention_switch(self, device: torch.device) -> float:
        """The share of changed tokens above which attention runs the fused kernel on `device`: the
        `incremental_max_fraction` set, or the device's default when it is None."""
        if self.incremental_max_fraction is not None:
            return float(self.incremental_max_fraction)
        return CUDA_INCREMENTAL_MAX_FRACTION if device.type == "cuda" else DEFAULT_INCREMENTAL_MAX_FRACTION

    def state_bytes(self) -> int:
        """Memory the per-stream state holds now (gates, buffers, attention caches)."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors())


def eventful(model: nn.Module, policy: TokenPolicy, incremental_max_fraction: float | None = None,
             refresh_every: int | None = None, cut_share: float | None = None,
             cut_relative_error: float = 0.5, nonfinite: str = "error", capture: bool = False,
             hold_share: float | None = None, max_held_frames: int = 3, attention_rows: str = "all",
             token_selection: str = "per_gate") -> EventfulViT:
    """Make a timm VisionTransformer eventful: same parameters (shared, not copied), original unchanged.

    Undo by simply using `model` again (or `ev.model`); nothing in it was modified.
    See `EventfulViT` for the arguments.
    """
    return EventfulViT(model, policy, incremental_max_fraction, refresh_every, cut_share, cut_relative_error,
                       nonfinite, capture, hold_share, max_held_frames, attention_rows, token_selection)


def compile_eventful(ev: EventfulViT, frame: Tensor, **options: object) -> EventfulViT:
    """Compile `ev`'s per-frame work with `torch.compile(fullgraph=True)` and warm up every graph a clip needs.

    Makes `ev` sync-free (see `EventfulViT.sync_free`) and replaces its
    `step` with the compiled one; `options` go to `torch.compile` (e.g.
    `mode="max-autotune"`). A clip needs up to four graphs (a first frame,
    partial frames before and after the selection buffers exist, a full
    frame over existing state: a refresh or scene cut); each would compile
    on first use, in the middle of a timed clip, so all are compiled here by
    running `frame` (B, C, H, W), as the clip's frames will be shaped, through
    that sequence, then `ev.reset()`. Held frames run no step. On the CPU
    the compiled partial frame fuses the many small gather/scatter ops of an
    eventful layer (docs/eventful.md: about 1.2x on the saliency demo); it
    needs a C++ compiler there. A new budget (`ev.policy = ...`) selects a
    different number of tokens, so its graphs compile on first use: call
    this again after changing it. Returns `ev`.

    Raises:
        ValueError: the policy selects a data-dependent number of tokens
            (Threshold, RelativeThreshold): such a frame cannot be one graph.
    """
    if not isinstance(ev, EventfulViT):
        raise TypeError(f"compile_eventful compiles an eventful model: pass frugalvit.eventful(model, policy), got "
                        f"{type(ev).__name__}")
    if "fullgraph" in options:
        raise ValueError("compile_eventful always compiles with fullgraph=True (a frame is one graph, no host "
                         "syncs); leave fullgraph out of the options")
    if not ev.policy.fixed_size:
        raise ValueError(f"compiling an eventful frame needs a fixed-size policy (TopFraction, TopR): {ev.policy!r} "
                         "selects a data-dependent number of tokens; use TopFraction, or run it uncompiled")
    ev.sync_free = True
    if "step" not in ev.__dict__:  # compiled once per instance: a second call (a new budget) only warms up
        ev.step = torch.compile(ev.step, fullgraph=True, **options)
    ev.reset()
    with torch.no_grad():
        for refresh_first in (False, False, False, True, False):
            if refresh_first:
                ev.refresh()
            ev.forward_features(frame)
    ev.reset()
    return ev
