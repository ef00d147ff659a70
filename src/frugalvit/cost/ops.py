"""Operators whose executed arithmetic the flop counter cannot see by itself.

`signed_matmul` is a matrix product whose left operand holds only -1, 0 or +1
(binary hash codes, token masks). Each of its multiply-accumulates is really a
signed addition, so `CostCounter` counts it as additions, not MACs. Making it a
registered operator (rather than a plain `@`) is what lets the counter tell the
two apart.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("frugalvit::signed_matmul", mutates_args=())
def signed_matmul(signs: Tensor, values: Tensor) -> Tensor:
    """`signs @ values` where every entry of `signs` is -1, 0 or +1 (batched like `torch.matmul`).

    Computed in the dtype of `values`, also under `torch.autocast`: callers that upcast to float32
    to accumulate long sums keep that precision.
    """
    with torch.autocast(values.device.type, enabled=False):
        return torch.matmul(signs.to(values.dtype), values)


@signed_matmul.register_fake
def _signed_matmul_fake(signs: Tensor, values: Tensor) -> Tensor:
    return torch.empty(torch.broadcast_shapes(signs.shape[:-2], values.shape[:-2]) + (signs.shape[-2], values.shape[-1]),
                       dtype=values.dtype, device=values.device)


def _signed_matmul_backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor]:
    signs, values = ctx.saved_tensors
    grad = grad.to(values.dtype)
    with torch.autocast(values.device.type, enabled=False):
        grad_signs = torch.matmul(grad, values.transpose(-1, -2)).to(signs.dtype)
        grad_values = torch.matmul(signs.transpose(-1, -2).to(values.dtype), grad)
    return _reduce_to(grad_signs, signs.shape), _reduce_to(grad_values, values.shape)


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back down to the operand's shape."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for dim, size in enumerate(shape):
        if size == 1 and grad.shape[dim] != 1:
            grad = grad.sum(dim, keepdim=True)
    return grad


def _signed_matmul_setup(ctx: torch.autograd.function.FunctionCtx, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


signed_matmul.register_autograd(_signed_matmul_backward, setup_context=_signed_matmul_setup)


def signed_matmul_additions(signs_shape: torch.Size, values_shape: torch.Size) -> int:
    """Additions executed by `signed_matmul` for operands of these shapes."""
    batch = torch.broadcast_shapes(tuple(signs_shape[:-2]), tuple(values_shape[:-2]))
    rows, inner = signs_shape[-2], signs_shape[-1]
    cols = values_shape[-1]
    count = rows * inner * cols
    for size in batch:
        count *= size
    return int(count)
