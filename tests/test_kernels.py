"""Fused kernels against their plain PyTorch references.

The Triton kernels run here on the CPU under Triton's interpreter
(TRITON_INTERPRET=1 must be set before triton is imported, so each check runs
in its own Python process); on CUDA the same kernels are compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from frugalvit.kernels import top_k_ascending, top_k_ascending_reference
from frugalvit.kernels.topk import kernel_applies

pytest.importorskip("triton")


def run_interpreted(code: str) -> str:
    """Run `code` in a fresh interpreter with TRITON_INTERPRET=1; return its stdout (fail on error)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_top_k_kernel_matches_reference_under_interpreter() -> None:
    """Distinct values: same indices as topk + sort, for token counts around powers of two, several rows."""
    out = run_interpreted("""
        import torch
        from frugalvit.kernels import top_k_ascending, top_k_ascending_reference
        torch.manual_seed(0)
        for tokens, k, rows in [(577, 72, 1), (577, 1, 3), (577, 576, 2), (4097, 512, 2), (197, 24, 8), (64, 8, 1),
                                (8192, 1024, 1)]:
            errors = torch.rand(rows, tokens) * 10
            errors[0, :5] = -errors[0, :5]  # negatives order as floats do
            got = top_k_ascending(errors, k, interpret=True)
            assert got.dtype == torch.int64 and got.shape == (rows, k), (got.dtype, got.shape)
            assert torch.equal(got, top_k_ascending_reference(errors, k)), (tokens, k, rows)
            half = errors.to(torch.bfloat16)  # many ties after rounding: the tie rule decides
            got = top_k_ascending(half, k, interpret=True)
            assert torch.all(got[:, 1:] > got[:, :-1])
            chosen = torch.gather(half.float(), 1, got)
            kth = torch.topk(half.float(), k, dim=-1).values[:, -1:]
            assert torch.all(chosen >= kth)
        print("ok")
    """)
    assert out.strip() == "ok"


def test_top_k_kernel_ties_nan_and_zeros() -> None:
    """Ties go to the lowest indices; NaN ranks above every number (as in torch.topk); all-equal rows."""
    out = run_interpreted("""
        import torch
        from frugalvit.kernels import top_k_ascending
        nan = float("nan")
        row = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.5, nan, -2.0, float("inf")]])
        print(top_k_ascending(row, 3, interpret=True).tolist())
        print(top_k_ascending(row, 4, interpret=True).tolist())
        print(top_k_ascending(torch.zeros(2, 10), 3, interpret=True).tolist())
        print(top_k_ascending(torch.zeros(1, 8192), 8190, interpret=True)[0, -2:].tolist())  # counts fill 14 bits
        negative_nan = torch.zeros(1) / torch.zeros(1)  # 0/0 on the CPU: a NaN with its sign bit set
        print(top_k_ascending(torch.cat([torch.tensor([1.0]), negative_nan, torch.tensor([3.0, 2.0])])[None], 1,
                              interpret=True).tolist())
    """)
    assert out.splitlines()[:5] == ["[[1, 5, 7]]", "[[1, 2, 5, 7]]", "[[0, 1, 2], [0, 1, 2]]", "[8188, 8189]",
                                    "[[1]]"]


def test_kernel_dispatch_on_the_cpu_is_the_reference() -> None:
    """Without CUDA (and without `interpret`) the reference runs; out-of-range shapes always do."""
    errors = torch.rand(2, 50)
    assert not kernel_applies(errors)
    assert torch.equal(top_k_ascending(errors, 7), top_k_ascending_reference(errors, 7))
    assert not kernel_applies(torch.rand(1, 9000), interpret=True)  # longer rows than one program holds
    assert not kernel_applies(torch.rand(50), interpret=True)
    assert not kernel_applies(torch.rand(1, 50, dtype=torch.float64), interpret=True)  # float32 keys would tie
