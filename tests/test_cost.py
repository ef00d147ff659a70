"""CostCounter against analytic counts."""

import pytest
import torch
from torch import nn

from frugalvit import CostCounter, HOROWITZ_45NM_FP32, energy_joules
from frugalvit.cost.ops import signed_matmul
from frugalvit.models import small_vit


def test_linear_macs_match_analytic() -> None:
    layer = nn.Linear(16, 8)
    with CostCounter() as cost:
        layer(torch.randn(5, 16))
    assert cost.macs == 5 * 16 * 8
    assert cost.flops == 2 * cost.macs
    assert cost.mults == cost.macs and cost.adds == cost.macs


def test_fused_cpu_attention_is_counted() -> None:
    q = k = v = torch.randn(2, 3, 10, 8)
    with CostCounter() as cost:
        nn.functional.scaled_dot_product_attention(q, k, v)
    assert cost.macs == 2 * (2 * 3 * 10 * 10 * 8)


def test_dense_vit_matches_analytic_count() -> None:
    dim, depth, tokens, patch, classes = 192, 6, 17, 7, 10
    model = small_vit().eval()
    with torch.no_grad(), CostCounter() as cost:
        model(torch.randn(1, 1, 28, 28))
    per_block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * 4 * dim
    embed = 16 * (patch * patch) * dim
    assert cost.macs == embed + depth * per_block + dim * classes


def test_signed_matmul_counts_additions_only() -> None:
    signs = torch.randint(0, 2, (4, 6)).float() * 2 - 1
    values = torch.randn(6, 3)
    with CostCounter() as cost:
        out = signed_matmul(signs, values)
    assert cost.macs == 0 and cost.mults == 0
    assert cost.adds == 4 * 6 * 3
    assert torch.allclose(out, signs @ values)


def test_energy_uses_cited_constants() -> None:
    assert energy_joules(1e12, 0) == pytest.approx(3.7)
    assert energy_joules(0, 1e12) == pytest.approx(0.9)
    assert "Horowitz" in HOROWITZ_45NM_FP32.source
    with pytest.raises(ValueError):
        energy_joules(-1, 0)


def test_results_unavailable_inside_block() -> None:
    with CostCounter() as cost:
        with pytest.raises(RuntimeError, match="once the `with` block has ended"):
            _ = cost.macs


def test_a_counter_is_not_re_entrant_and_its_results_wait_for_the_block_end() -> None:
    counter = CostCounter()
    with counter:
        with pytest.raises(RuntimeError, match="not re-entrant"):
            counter.__enter__()
        torch.ones(2, 2) @ torch.ones(2, 2)
        with pytest.raises(RuntimeError, match="once the `with` block has ended"):
            counter.by_op()
    assert counter.macs == 8
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    assert not _get_current_dispatch_mode_stack()  # nothing left counting
