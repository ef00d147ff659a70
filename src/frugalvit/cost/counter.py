"""`CostCounter`: executed MACs, FLOPs, multiplications and additions of a block of code.

Built on `torch.utils.flop_counter.FlopCounterMode`, which counts matrix
products and convolutions by the shapes that actually run. We add what it
misses: fused attention on CPU (it counts zero for
`_scaled_dot_product_flash_attention_for_cpu`) and frugalvit's additions-only
`signed_matmul`. Counting follows the usual convention for vision models: the
multiply-accumulates of matrix products, convolutions and attention; the
element-wise work (norms, activations, softmax, gather/scatter) is not counted,
for the dense baseline and for our methods alike.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from frugalvit.cost.energy import HOROWITZ_45NM_FP32, EnergyModel, energy_joules
from frugalvit.cost.ops import signed_matmul_additions

aten = torch.ops.aten


@dataclass(frozen=True)
class OpCost:
    """Executed arithmetic: `macs` multiply-accumulates on real operands, `adds` additions-only ops."""

    macs: int = 0
    adds_only: int = 0

    @property
    def flops(self) -> int:
        """FLOPs = 2 x MACs (one multiply and one add each) plus the additions-only operations."""
        return 2 * self.macs + self.adds_only

    @property
    def mults(self) -> int:
        return self.macs

    @property
    def adds(self) -> int:
        return self.macs + self.adds_only

    def __add__(self, other: "OpCost") -> "OpCost":
        return OpCost(self.macs + other.macs, self.adds_only + other.adds_only)

    def energy_joules(self, model: EnergyModel = HOROWITZ_45NM_FP32) -> float:
        return energy_joules(self.mults, self.adds, model)


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args: Any,
                             out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _signed_matmul_count(signs_shape, values_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return signed_matmul_additions(signs_shape, values_shape)


_ADDITIONS_ONLY = torch.ops.frugalvit.signed_matmul


def _extra_formulas() -> dict[Any, Callable[..., int]]:
    formulas: dict[Any, Callable[..., int]] = {_ADDITIONS_ONLY: _signed_matmul_count}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops
    return formulas


def _tolerate_views_made_without_grad(mode: FlopCounterMode) -> None:
    """Let the mode's module tracker pass module inputs it cannot hook for backward.

    Its forward pre-hook attaches a backward hook to every input that requires
    grad; an input that is a view of a parameter made under `torch.no_grad()`
    (timm's attention-pooling head: `latent.expand(...)`) has no autograd node
    to attach to, and torch raises. The module is already recorded as entered
    when that happens and counting runs no backward, so the hook's failure is
    passed over. Where a torch version has no such hook, nothing changes.
    """
    tracker = getattr(mode, "mod_tracker", None)
    hook = getattr(tracker, "_fw_pre_hook", None)
    if hook is None:
        return

    def pre_hook(module: nn.Module, inputs: Any) -> None:
        try:
            hook(module, inputs)
        except AssertionError:  # "Expected gradient function to be set"
            pass

    tracker._fw_pre_hook = pre_hook


class CostCounter:
    """Count the arithmetic executed inside a `with` block.

    Example:
        >>> with CostCounter() as cost:
        ...     model(images)
        >>> cost.macs, cost.flops, cost.energy_joules()

    Results are available after the block ends; `by_module()` splits them by
    the module (dotted name) that ran them. Not re-entrant.
    """

    def __init__(self) -> None:
        self._mode: FlopCounterMode | None = None
        self._counts: dict[str, dict[Any, int]] = {}

    def __enter__(self) -> "CostCounter":
        if self._mode is not None:
            raise RuntimeError("this CostCounter is already counting (it is not re-entrant): nest a new "
                               "CostCounter() instead")
        self._mode = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
        _tolerate_views_made_without_grad(self._mode)
        self._mode.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._mode is not None
        self._mode.__exit__(exc_type, exc, tb)
        self._counts = self._mode.get_flop_counts()
        self._mode = None

    @staticmethod
    def _to_cost(per_op: dict[Any, int]) -> OpCost:
        macs = adds_only = 0
        for op, count in per_op.items():
            if op is _ADDITIONS_ONLY:
                adds_only += count
            else:
                macs += count // 2
        return OpCost(macs, adds_only)

    @property
    def total(self) -> OpCost:
        """All executed arithmetic of the block."""
        if self._mode is not None:
            raise RuntimeError("CostCounter results are available once the `with` block has ended")
        return self._to_cost(self._counts.get("Global", {}))

    @property
    def macs(self) -> int:
        return self.total.macs

    @property
    def flops(self) -> int:
        return self.total.flops

    @property
    def mults(self) -> int:
        return self.total.mults

    @property
    def adds(self) -> int:
        return self.total.adds

    def energy_joules(self, model: EnergyModel = HOROWITZ_45NM_FP32) -> float:
        """Arithmetic energy of the block under `model` (default: Horowitz 45 nm FP32)."""
        return self.total.energy_joules(model)

    def by_module(self) -> dict[str, OpCost]:
        """Executed arithmetic per module name (nested modules include their children)."""
        if self._mode is not None:
            raise RuntimeError("CostCounter results are available once the `with` block has ended")
        return {name: self._to_cost(per_op) for name, per_op in self._counts.items() if name != "Global"}

    def by_op(self) -> dict[str, OpCost]:
        """Executed arithmetic per operator name, e.g. `aten.mm`."""
        if self._mode is not None:
            raise RuntimeError("CostCounter results are available once the `with` block has ended")
        merged: dict[str, dict[Any, int]] = defaultdict(dict)
        for op, count in self._counts.get("Global", {}).items():
            merged[str(op)][op] = count
        return {name: self._to_cost(per_op) for name, per_op in merged.items()}
