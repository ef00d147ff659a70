"""Eventful Transformers (Dutson, Li, Gupta, ICCV 2023): recompute only the tokens that changed."""

from frugalvit.eventful.budget import MacBudget
from frugalvit.eventful.gates import TokenBuffer, TokenGate
from frugalvit.eventful.model import EventfulViT, UnsupportedModelError, check_convertible, compile_eventful, eventful
from frugalvit.eventful.policies import RelativeThreshold, Threshold, TokenPolicy, TopFraction, TopR, parse_policy

__all__ = ["EventfulViT", "MacBudget", "RelativeThreshold", "Threshold", "TokenBuffer", "TokenGate", "TokenPolicy",
           "TopFraction", "TopR", "UnsupportedModelError", "check_convertible", "compile_eventful", "eventful",
           "parse_policy"]
