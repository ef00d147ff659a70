"""frugalvit: vision transformers that spend compute only where the input needs it."""

from frugalvit.cost import CostCounter, EnergyModel, HOROWITZ_45NM_FP32, OpCost, energy_joules

__all__ = ["CostCounter", "EnergyModel", "HOROWITZ_45NM_FP32", "OpCost", "energy_joules"]

__version__ = "0.1.0"
