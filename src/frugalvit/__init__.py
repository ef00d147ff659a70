"""frugalvit: vision transformers that spend compute only where the input needs it."""

from frugalvit.cost import CostCounter, EnergyModel, HOROWITZ_45NM_FP32, OpCost, energy_joules
from frugalvit.eventful import (EventfulViT, MacBudget, RelativeThreshold, Threshold, TokenPolicy, TopFraction, TopR,
                                compile_eventful, eventful, parse_policy)
from frugalvit.ecoformer import EcoFormerAttention, ecoformer, fit_hashes, remove_ecoformer
from frugalvit.dvt import DVTCascade, DVTConfig, ResolutionCascade, dvt_cascade, search_thresholds

__all__ = ["CostCounter", "EnergyModel", "HOROWITZ_45NM_FP32", "OpCost", "energy_joules",
           "EventfulViT", "MacBudget", "RelativeThreshold", "Threshold", "TokenPolicy", "TopFraction", "TopR",
           "compile_eventful", "eventful", "parse_policy",
           "EcoFormerAttention", "ecoformer", "fit_hashes", "remove_ecoformer",
           "DVTCascade", "DVTConfig", "ResolutionCascade", "dvt_cascade", "search_thresholds"]

__version__ = "0.1.0"
