"""Eventful convolutional neck (SAM's image encoder): 1x1 conv and norm on changed tokens, 3x3 conv by deltas.

SAM's neck maps the last block's tokens (B, H, W, D) to its output features
through a 1x1 conv, a channel LayerNorm, a 3x3 conv and another channel
LayerNorm. Run densely on every frame it costs N (D C + 9 C^2)
multiply-accumulates (3.2 G for SAM-B at 1024 px, 3% of the dense encoder,
but a fifth of an eventful frame's budget at 1/8 of the tokens). Here:
- a gate picks the M output tokens that changed most; the 1x1 conv and the
  first norm run on those only (token-wise), and a buffer keeps the result;
- the 3x3 conv is linear, so its output is updated by the change of its
  input: a changed token p adds W[dy, dx] (y_new - y_old)_p to the output at
  p - (dy, dx) for each of the nine taps (9 M C^2, the same share of the
  conv's cost as M of N); outputs across the border are dropped, as the
  zero padding does;
- the second norm runs on every pixel (no multiply-accumulates).
The conv output is kept in float32 (it accumulates many small updates);
rounding drift is about float32 epsilon per update, bounded by a refresh.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from frugalvit.eventful.gates import ScratchPool, Selection, TokenBuffer, TokenGate, gather_tokens, store_
from frugalvit.eventful.policies import TokenPolicy
from frugalvit.timm.sam import ConvNeck


class EventfulNeck(nn.Module):
    """SAM's conv neck, updated frame by frame from the changed tokens; same parameters as the model's neck."""

    conv_output: Tensor | None

    def __init__(self, neck: ConvNeck, pool: ScratchPool | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "neck", neck)  # the model owns the parameters
        self.gate, self.buffer = TokenGate(pool), TokenBuffer()
        self.register_buffer("conv_output", None, persistent=False)  # (B, N + 1, C) float32; row N: scratch

    def reset(self) -> None:
        self.gate.reset()
        self.buffer.reset()
        self.conv_output = None

    def forward(self, tokens: Tensor, grid: tuple[int, int], policy: TokenPolicy, update_all: bool) -> Tensor:
        """The neck's output (B, C, H, W) for the last block's tokens (B, H * W, D)."""
        neck = self.neck
        batch, num_tokens, _ = tokens.shape
        selection, picked = self.gate(tokens, policy, update_all)
        if selection is None:
            self.buffer(None, neck.norm1(picked @ neck.project.t()))
            feature_map = tokens.transpose(1, 2).reshape(batch, -1, *grid)
            conv = neck.module[2](neck.module[1](neck.module[0](feature_map)))  # as timm runs it
            flat = conv.flatten(2).transpose(1, 2).float()
            padded = torch.cat([flat, flat.new_zeros(batch, 1, flat.shape[-1])], dim=1)
            self.conv_output = store_(self.conv_output, padded)
        elif selection.count > 0:
            old = gather_tokens(self.buffer.state, selection)
            fresh = neck.norm1(picked @ neck.project.t())
            self.buffer(selection, fresh)
            self._add_conv_delta_((fresh - old).float(), selection, grid)
        out = neck.norm2(self.conv_output[:, :num_tokens].to(tokens.dtype))
        return out.transpose(1, 2).reshape(batch, -1, *grid)

    def _add_conv_delta_(self, delta: Tensor, selection: Selection, grid: tuple[int, int]) -> None:
        """conv_output += the 3x3 conv of a change `delta` (B, M, C) at the selected tokens (nine taps)."""
        taps = self.neck.taps.float()
        height, width = grid
        batch = delta.shape[0]
        stride = height * width + 1
        rows, cols = selection.indices // width, selection.indices % width
        offsets = torch.arange(batch, device=delta.device)[:, None] * stride
        target = self.conv_output.view(-1, self.conv_output.shape[-1])
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                # input p feeds output p - (dy, dx); outside the grid, the scratch row
                out_r, out_c = rows - dy, cols - dx
                inside = (out_r >= 0) & (out_r < height) & (out_c >= 0) & (out_c < width)
                index = torch.where(inside, out_r * width + out_c, height * width) + offsets
                contribution = (delta @ taps[dy + 1, dx + 1].t()).reshape(-1, target.shape[-1])
                target.index_add_(0, index.reshape(-1), contribution)

    def state_tensors(self) -> list[Tensor]:
        tensors = [self.gate.reference, self.gate.indices, self.buffer.state, self.conv_output]
        return [t for t in tensors if t is not None]
