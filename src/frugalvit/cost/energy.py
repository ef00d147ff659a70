"""Energy as a pure function of counted multiplications and additions.

Constants: M. Horowitz, "Computing's energy problem (and what we can do about
it)", ISSCC 2014, table for a 45 nm process: a 32-bit floating-point multiply
costs 3.7 pJ and a 32-bit floating-point add 0.9 pJ. These are arithmetic-only
figures (no memory traffic); EcoFormer (NeurIPS 2022) reports energy with the
same table, so numbers computed here are comparable with the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EnergyModel:
    """Picojoules per arithmetic operation, with the source they come from."""

    mult_pj: float
    add_pj: float
    source: str


HOROWITZ_45NM_FP32 = EnergyModel(
    mult_pj=3.7,
    add_pj=0.9,
    source="Horowitz, ISSCC 2014, 45 nm: FP32 multiply 3.7 pJ, FP32 add 0.9 pJ",
)


def energy_joules(mults: float, adds: float, model: EnergyModel = HOROWITZ_45NM_FP32) -> float:
    """Arithmetic energy in joules of `mults` multiplications and `adds` additions."""
    if mults < 0 or adds < 0:
        raise ValueError(f"operation counts must be non-negative, got mults={mults}, adds={adds}")
    return (mults * model.mult_pj + adds * model.add_pj) * 1e-12
