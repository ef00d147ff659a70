"""Top-k selection that returns indices in ascending order, in one kernel.

A gate picks the M tokens with the largest errors out of N and wants their
indices ascending (rows are then copied in memory order). In PyTorch that is
`topk` followed by `sort`: two kernels of about 9 us each on an H100 for one
row of 577 tokens, 36 of each per ViT-B frame. Here one Triton program per
row does both: a 32-step radix select (one bit per step) over
order-preserving integer keys finds the M-th largest error, and a prefix sum
over the row writes the chosen positions in ascending order. Ties at the
M-th value go to the lowest indices (`torch.topk` leaves them unspecified).
NaN counts as larger than every number, as in `torch.topk`.

Measured on an H100 (profiles in benchmarks/results/eventful_gpu_explore_*):
7.7 us per call at 577 tokens, against about 17 us for topk + sort; 49 us at
4,097 tokens, where one program runs 32 block-wide reductions over 8,192
lanes on one SM (topk + sort was not profiled at that size; a multi-program
select is the obvious next step). A variant with 4 bits per step (16
candidate thresholds compared at once) was slower at both sizes (14 us at 577
tokens in benchmarks/results/eventful_gpu_run3_profile.txt; 67 against 28 us
per call at 4,097 tokens in the checks of eventful_gpu_run3.json and
eventful_gpu_explore.json). Neither was a radix select in 4 steps of 8 bits
(a masked 256-bin `tl.histogram` of the next byte per step): in a CUDA graph
on the H100 it took 39 against this kernel's 28 us at 4,097 tokens, 11.7
against 10.4 us at 1,025, 7.6 against 8.0 us at 577, and a captured ViT-B
frame at 4,096 tokens 5.63 against 4.86 ms
(benchmarks/results/eventful_gpu_explore3.json). Nor was two bits per step
with the three candidates' counts packed into one int64 reduction (16
reductions instead of 32; 64-bit reductions cost more than twice as much):
32.8 against about 28 us at 4,097 tokens, 12.0 against 10.4-10.8 at 1,025,
7.6 against 7.7-8.0 at 577 (eventful_gpu_explore4.json).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with torch's CUDA wheels; without it the reference runs
    triton = None

# One program holds a whole row in registers; longer rows use the reference.
MAX_KERNEL_TOKENS = 8192


def top_k_ascending_reference(errors: Tensor, k: int) -> Tensor:
    """Indices (B, k), ascending per row, of the k largest entries of each row of `errors` (B, N)."""
    return torch.sort(torch.topk(errors, k, dim=-1, sorted=False).indices, dim=-1).values


if triton is not None:

    @triton.jit
    def _top_k_ascending_kernel(errors_ptr, out_ptr, num_tokens, k, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offsets = tl.arange(0, BLOCK)
        inside = offsets < num_tokens
        values = tl.load(errors_ptr + row * num_tokens + offsets, mask=inside, other=float("-inf")).to(tl.float32)
        bits = values.to(tl.int32, bitcast=True)
        bits = tl.where(values != values, 0x7FC00000, bits)  # every NaN (a sign bit too) as +NaN: above +inf
        # Order-preserving map float32 -> [0, 2^32): negatives get their magnitude bits flipped (the signed
        # integers then sort as the floats do), then the sign is offset away (int64, so nothing overflows).
        keys = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + (tl.full((), 1, tl.int64) << 31)
        keys = tl.where(inside, keys, 0)
        # Radix select, highest bit first: the largest threshold that at least k keys reach is the k-th key.
        threshold = tl.zeros((), dtype=tl.int64)
        for bit in tl.static_range(31, -1, -1):
            candidate = threshold | (tl.full((), 1, tl.int64) << bit)
            reached = tl.sum((keys >= candidate).to(tl.int32), axis=0)
            threshold = tl.where(reached >= k, candidate, threshold)
        above = keys > threshold
        ties = (keys == threshold) & inside
        tie_rank = tl.cumsum(ties.to(tl.int32), axis=0) - 1
        take = above | (ties & (tie_rank < k - tl.sum(above.to(tl.int32), axis=0)))
        position = tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(out_ptr + row * k + position, offsets.to(tl.int64), mask=take)


def kernel_applies(errors: Tensor, interpret: bool = False) -> bool:
    """Whether the Triton kernel runs for `errors`: on CUDA (or under TRITON_INTERPRET=1, `interpret`) for
    2-D rows of at most `MAX_KERNEL_TOKENS` in float32, float16 or bfloat16 (its keys are float32: float64
    errors closer than float32 resolves would tie, so they take the reference)."""
    return (triton is not None and (errors.is_cuda or interpret) and errors.dim() == 2
            and errors.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and 0 < errors.shape[-1] <= MAX_KERNEL_TOKENS)


def top_k_ascending(errors: Tensor, k: int, interpret: bool = False) -> Tensor:
    """`top_k_ascending_reference` as one kernel on CUDA; the reference elsewhere.

    `interpret=True` runs the kernel on the CPU (the process must have set
    TRITON_INTERPRET=1 before importing triton): how the tests check it.
    """
    if not kernel_applies(errors, interpret) or not 0 < k < errors.shape[-1]:
        return top_k_ascending_reference(errors, k)
    rows, num_tokens = errors.shape
    errors = errors.contiguous()
    out = torch.empty(rows, k, dtype=torch.int64, device=errors.device)
    block = triton.next_power_of_2(num_tokens)
    _top_k_ascending_kernel[(rows,)](errors, out, num_tokens, k, BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return out
