"""Counting what a model actually executes: MACs, FLOPs, multiplications, additions, energy."""

from frugalvit.cost.counter import CostCounter, OpCost
from frugalvit.cost.energy import EnergyModel, HOROWITZ_45NM_FP32, energy_joules

__all__ = ["CostCounter", "OpCost", "EnergyModel", "HOROWITZ_45NM_FP32", "energy_joules"]
