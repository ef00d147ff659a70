"""Eventful transposed-convolution stacks: a decoder that recomputes only what changed in its input.

A dense-prediction head on a ViT (a saliency or segmentation decoder) often
upsamples the token grid through transposed convolutions, each followed by a
BatchNorm and a ReLU. When an eventful backbone updates only some tokens, the
rest of the decoder's input is bit-for-bit unchanged, and so is most of its
output: a transposed convolution is linear, so its output changes by the
transposed convolution of the input's change, which is non-zero only in the
k x k windows of the changed input pixels. Each stage keeps its
pre-activation (with the inference BatchNorm folded into the weights, so it
is still linear) and, per frame:

    pre[windows of S] += contributions of (x_new - x_old)[S]     (one product, |S| x C_in x k^2 C_out MACs)
    delta for the next stage = relu(pre_new) - relu(pre_old) at the touched outputs (zero rows dropped)

which is exact: the stored pre-activation always equals the dense one up to
float rounding (kept in float32 whatever the model's dtype, about 1e-7
relative per frame; a full frame recomputes it densely). The cost follows the changed area, which grows by
about half a kernel per stage around each changed region. Full frames (the
first, or `update_all`) run the dense transposed convolution.

Which input rows count as changed: without a policy, every row that differs
at all from the last call (exact; but behind an eventful backbone every
final token moves a little every frame, since the residual stream carries the
fresh patch embedding, so little is saved). With a `TokenPolicy` the input is
gated like a backbone gate: each row's error against its reference (the value
last propagated), the policy picks the rows to propagate and their
references move; the others keep their stale contribution (an approximation,
bounded by the policy, as in the backbone).

The changed pixel sets have data-dependent sizes (like `Threshold` policies),
so a frame synchronises with the host once per stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from frugalvit.eventful.gates import Selection, token_errors
from frugalvit.eventful.policies import TokenPolicy


@dataclass
class _Stage:
    """One transposed convolution with its BatchNorm folded in and its activation (ReLU or none)."""

    weight: Tensor  # (C_in, C_out, k, k), BatchNorm scale folded in, float32
    bias: Tensor  # (C_out,), float32
    stride: int
    padding: int
    output_padding: int
    relu: bool

    @property
    def kernel(self) -> int:
        return self.weight.shape[-1]

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        return tuple((side - 1) * self.stride - 2 * self.padding + self.kernel + self.output_padding  # type: ignore[return-value]
                     for side in grid)

    def taps(self) -> Tensor:
        """(C_in, k * k * C_out): the weight as one matrix, tap-major (ki, kj), then output channel."""
        c_in, c_out, k, _ = self.weight.shape
        return self.weight.permute(0, 2, 3, 1).reshape(c_in, k * k * c_out)

    def targets(self, grid: tuple[int, int], device: torch.device) -> Tensor:
        """(h * w, k * k) flat output pixel of every input pixel and tap; -1 where it falls outside."""
        (h, w), (out_h, out_w), k = grid, self.output_grid(grid), self.kernel
        rows = torch.arange(h, device=device)[:, None] * self.stride - self.padding + torch.arange(k, device=device)
        cols = torch.arange(w, device=device)[:, None] * self.stride - self.padding + torch.arange(k, device=device)
        row = rows[:, None, :, None].expand(h, w, k, k)  # (h, w, ki, kj)
        col = cols[None, :, None, :].expand(h, w, k, k)
        inside = (row >= 0) & (row < out_h) & (col >= 0) & (col < out_w)
        return torch.where(inside, row * out_w + col, -1).reshape(h * w, k * k)


def _fold(stage: nn.Module) -> _Stage:
    """A `nn.Sequential(ConvTranspose2d[, BatchNorm2d][, ReLU])` (in that order) as a linear stage + activation."""
    parts = list(stage) if isinstance(stage, nn.Sequential) else [stage]
    if not parts or not isinstance(parts[0], nn.ConvTranspose2d):
        raise TypeError(f"each stage must start with a ConvTranspose2d, got {type(parts[0]).__name__ if parts else 'nothing'}")
    conv = parts[0]
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.kernel_size[0] != conv.kernel_size[1] \
            or conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1] \
            or conv.output_padding[0] != conv.output_padding[1] or conv.padding_mode != "zeros":
        raise TypeError("only square, ungrouped, undilated, zero-padded ConvTranspose2d stages are supported, got "
                        f"{conv}")
    weight = conv.weight.detach().float()  # folded in float32 whatever the module's dtype
    bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(weight.shape[1],
                                                                               device=weight.device)
    relu = False
    for part in parts[1:]:
        if isinstance(part, nn.BatchNorm2d) and not relu:
            if part.training or part.running_mean is None:
                raise TypeError("BatchNorm2d must be in eval mode with running statistics (inference only)")
            variance, mean = part.running_var.float(), part.running_mean.float()
            scale = part.weight.detach().float() / torch.sqrt(variance + part.eps) if part.affine else \
                1.0 / torch.sqrt(variance + part.eps)
            shift = part.bias.detach().float() if part.affine else torch.zeros_like(scale)
            weight = weight * scale[None, :, None, None]
            bias = (bias - mean) * scale + shift
        elif isinstance(part, nn.ReLU) and not relu:
            relu = True
        else:
            raise TypeError(f"a stage is ConvTranspose2d, then optionally BatchNorm2d, then optionally ReLU; got "
                            f"{type(part).__name__} in that place")
    return _Stage(weight, bias, conv.stride[0], conv.padding[0], conv.output_padding[0], relu)


class EventfulDeconvStack(nn.Module):
    """Transposed-convolution stages over token rows, updated by the change of their input (see module doc).

    Input and output are row-major grids: (B, h * w, C) with the grid given.
    The weights are read from the stages when this is built (BatchNorm folded,
    inference only); rebuild it after changing them.
    """

    def __init__(self, stages: Sequence[nn.Module], policy: TokenPolicy | None = None) -> None:
        """`policy`: which input rows to propagate each frame (None: every row that changed at all, exact);
        settable between calls."""
        super().__init__()
        self.policy = policy
        self._stages = [_fold(stage) for stage in stages]
        self._taps = [stage.taps() for stage in self._stages]
        self._targets: dict[tuple[int, tuple[int, int], torch.device], Tensor] = {}
        self._input: Tensor | None = None  # (B * P, C_in) the last input rows
        # per stage (B * P_out + 1, C_out) pre-activations, row-major; the last row collects the contributions
        # of taps that fall outside the grid (adding them there is cheaper than filtering them out)
        self._pre: list[Tensor] = []
        self._grid: tuple[int, int] | None = None
        self.last_updated_share: list[float] = []  # per stage: share of input rows recomputed on the last call

    def reset(self) -> None:
        """Forget the state: the next call runs the dense pass."""
        self._input, self._pre, self._grid = None, [], None
        self.last_updated_share = []

    def output_grid(self, grid: tuple[int, int]) -> tuple[int, int]:
        """The (H, W) grid the last stage outputs for an input `grid`."""
        for stage in self._stages:
            grid = stage.output_grid(grid)
        return grid

    def _cast(self, like: Tensor) -> None:
        """The folded float32 weights on the input's device (moved once). They stay float32: the
        pre-activations accumulate changes frame after frame, so they are kept in float32; the dense pass
        runs in the input's dtype."""
        if self._stages[0].weight.device != like.device:
            for stage in self._stages:
                stage.weight, stage.bias = stage.weight.to(like.device), stage.bias.to(like.device)
            self._taps = [stage.taps() for stage in self._stages]
            self._targets.clear()

    def _stage_targets(self, index: int, grid: tuple[int, int], device: torch.device) -> Tensor:
        key = (index, grid, device)
        if key not in self._targets:
            self._targets[key] = self._stages[index].targets(grid, device)
        return self._targets[key]

    @torch.no_grad()  # inference only: state carried across frames must not carry autograd history
    def forward(self, rows: Tensor, grid: tuple[int, int], update_all: bool = False) -> Tensor:
        """Input rows (B, h * w, C_in) on `grid` -> the last stage's activations (B, H * W, C_out), row-major."""
        batch, count, width = rows.shape
        if count != grid[0] * grid[1]:
            raise ValueError(f"{count} rows do not fill a {grid[0]}x{grid[1]} grid")
        self._cast(rows)
        flat = rows.reshape(batch * count, width)
        if self._input is not None and not update_all and (flat.dtype, flat.device) != (self._input.dtype,
                                                                                          self._input.device):
            raise ValueError(f"rows in {flat.dtype} on {flat.device}, but this stack's state is in {self._input.dtype} "
                             f"on {self._input.device}: pass update_all=True (a full frame) or reset() after casting "
                             "or moving the model")
        if update_all or self._input is None or self._grid != grid or self._input.shape != flat.shape:
            return self._full(flat, batch, grid)
        changed = self._select(flat, batch, count)
        picked = flat.index_select(0, changed)
        delta = picked.float() - self._input.index_select(0, changed).float()
        self._input.index_copy_(0, changed, picked)
        self.last_updated_share = []
        in_grid = grid
        for index, stage in enumerate(self._stages):
            pixels = in_grid[0] * in_grid[1]
            self.last_updated_share.append(changed.numel() / (batch * pixels))
            out_grid = stage.output_grid(in_grid)
            changed, delta = self._update_stage(index, changed, delta, pixels, in_grid, out_grid[0] * out_grid[1])
            in_grid = out_grid
        return self._activations(-1).to(rows.dtype).view(batch, -1, self._pre[-1].shape[-1])

    def _select(self, flat: Tensor, batch: int, count: int) -> Tensor:
        """Flat indices (into B * P) of the input rows to propagate this frame, ascending."""
        if self.policy is None:
            return (flat != self._input).any(dim=-1).nonzero().squeeze(1)  # exact: unchanged rows are equal
        errors = token_errors(self._input.view(batch, count, -1), flat.view(batch, count, -1), self.policy)
        return Selection(self.policy.select(errors), count).flat()  # as a backbone gate selects

    def _activations(self, index: int) -> Tensor:
        pre = self._pre[index][:-1]
        return torch.relu(pre) if self._stages[index].relu else pre

    def _full(self, flat: Tensor, batch: int, grid: tuple[int, int]) -> Tensor:
        """Dense pass: every stage's pre-activation recomputed and stored."""
        self._input = flat.clone()
        self._grid = grid
        x = flat.view(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2)
        self._pre = []
        for stage in self._stages:
            pre = F.conv_transpose2d(x, stage.weight.to(x.dtype), stage.bias.to(x.dtype), stage.stride, stage.padding,
                                     stage.output_padding)
            rows = pre.permute(0, 2, 3, 1).reshape(-1, pre.shape[1]).float()
            self._pre.append(torch.cat([rows, rows.new_zeros(1, rows.shape[1])]))
            x = torch.relu(pre) if stage.relu else pre
        self.last_updated_share = [1.0] * len(self._stages)
        return self._activations(-1).to(flat.dtype).view(batch, -1, self._pre[-1].shape[-1])

    def _update_stage(self, index: int, changed: Tensor, delta: Tensor, pixels: int, grid: tuple[int, int],
                      out_pixels: int) -> tuple[Tensor, Tensor]:
        """Add the contributions of `delta` (rows `changed` of a (B * pixels) input) into stage `index`'s
        pre-activation; return the touched output rows and their activation change (zero rows dropped)."""
        stage, pre = self._stages[index], self._pre[index]
        if changed.numel() == 0:
            return changed, delta
        targets = self._stage_targets(index, grid, changed.device)  # (pixels, k * k)
        sample, pixel = changed // pixels, changed % pixels
        where = targets.index_select(0, pixel)  # (S, k * k)
        outside = batch_pixels = pre.shape[0] - 1
        flat_targets = torch.where(where >= 0, where + sample[:, None] * out_pixels, outside).reshape(-1)
        contributions = (delta @ self._taps[index]).view(-1, pre.shape[-1])  # (S * k * k, C_out)
        hit = torch.zeros(batch_pixels + 1, dtype=torch.bool, device=pre.device)
        hit[flat_targets] = True
        touched = hit[:-1].nonzero().squeeze(1)
        before = pre.index_select(0, touched)
        pre.index_add_(0, flat_targets, contributions)
        pre[-1].zero_()  # the outside row: emptied, so it never grows over a long sequence
        after = pre.index_select(0, touched)
        change = torch.relu(after) - torch.relu(before) if stage.relu else after - before
        # rows whose activation moved: `abs().amax() != 0` is `(change != 0).any()` (NaN included), several times
        # faster on the CPU than a boolean reduction over the channels
        moved = (change.abs().amax(dim=-1) != 0).nonzero().squeeze(1)
        return touched.index_select(0, moved), change.index_select(0, moved)
