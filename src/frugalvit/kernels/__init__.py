"""Fused GPU kernels (Triton) for the library's own algorithms, each beside its plain PyTorch reference."""

from frugalvit.kernels.topk import top_k_ascending, top_k_ascending_reference

__all__ = ["top_k_ascending", "top_k_ascending_reference"]
