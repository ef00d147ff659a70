"""Hashed linear attention: the O(N) computation and the timm-compatible attention module.

With +-1 codes `H(q_i)`, `H(k_j)` (b bits) and an offset `bias > b`, the
similarity `s_ij = H(q_i)^T H(k_j) + bias` is positive and a function of the
Hamming distance only. Normalised attention is

    out_i = sum_j s_ij v_j / sum_j s_ij
          = (H(q_i)^T S + bias * sum_j v_j) / (H(q_i)^T z + bias * N),
    S = sum_j H(k_j) v_j^T (b x D),  z = sum_j H(k_j) (b),

computed right to left in O(N b D); every product with a code is a signed
sum (`signed_matmul`, counted as additions). This "consistent" normaliser is
the paper's Eq. (9). The authors' released code (`linear_attention_bias` in
ziplab/EcoFormer) instead adds `bias * v_i` (the query's own value) to the
numerator; its weights do not sum to one. That form is
available as `normaliser="authors"` for reproducing their numbers.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from timm.layers import Attention

from frugalvit.cost.ops import signed_matmul
from frugalvit.ecoformer.hashing import hash_codes, l2_normalize
from frugalvit.timm import attention_gate, graft, merge_heads, split_heads, split_qkv

Normaliser = Literal["consistent", "authors"]
NORMALISERS: tuple[str, ...] = ("consistent", "authors")
MAX_BITS = 64
MAX_ANCHORS = 4096


def hashed_linear_attention(q_codes: Tensor, k_codes: Tensor, v: Tensor, bias: float,
                            normaliser: Normaliser = "consistent") -> Tensor:
    """Hashed attention in O(N): codes `(..., N, b)`, `(..., M, b)` in {-1,+1}, values `(..., M, D)`.

    A column of ones appended to `v` carries the normaliser through the same
    signed products, so `S` and `z` (and the numerator and denominator) each
    cost one additions-only product.
    """
    if normaliser not in NORMALISERS:
        raise ValueError(f"normaliser must be one of {NORMALISERS}, got {normaliser!r}")
    # Sums over all keys reach bias * N (> 65,504 from a few thousand tokens): half precision accumulates in float32.
    output_dtype = v.dtype
    if v.dtype in (torch.float16, torch.bfloat16):
        q_codes, k_codes, v = q_codes.float(), k_codes.float(), v.float()
    ones = v.new_ones(v.shape[:-1] + (1,))
    values = torch.cat([v, ones], dim=-1)                                # (..., M, D+1)
    summary = signed_matmul(k_codes.transpose(-1, -2), values)          # [S | z]: (..., b, D+1)
    out = signed_matmul(q_codes, summary)                               # (..., N, D+1)
    if normaliser == "consistent":
        totals = signed_matmul(ones.transpose(-1, -2), values)          # [sum_j v_j | M]
        out = out + bias * totals
    else:
        if q_codes.shape[-2] != v.shape[-2]:
            raise ValueError("normaliser='authors' adds each query's own value; it needs self-attention (N == M)")
        out = out + bias * torch.cat([v, ones * v.shape[-2]], dim=-1)
    return (out[..., :-1] / out[..., -1:]).to(output_dtype)


def hashed_attention_reference(q_codes: Tensor, k_codes: Tensor, v: Tensor, bias: float,
                               normaliser: Normaliser = "consistent") -> Tensor:
    """The same attention through the explicit N x M similarity matrix (for tests; O(N^2))."""
    affinity = q_codes @ k_codes.transpose(-1, -2)
    if normaliser == "consistent":
        weights = affinity + bias
        return (weights @ v) / weights.sum(-1, keepdim=True)
    if normaliser == "authors":
        numerator = affinity @ v + bias * v
        return numerator / (affinity.sum(-1, keepdim=True) + bias * v.shape[-2])
    raise ValueError(f"normaliser must be one of {NORMALISERS}, got {normaliser!r}")


def _check_range(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return value


class EcoFormerAttention(Attention):
    """A timm `Attention` whose softmax attention is replaced by EcoFormer hashed linear attention.

    Holds every part of the source layer (`qkv`, `q_norm`, `k_norm`, `norm`,
    `proj`, ..., shared, under their timm names), so `hashing = False` runs the
    source layer's own forward exactly (fused or not, per `fused_attn`); the
    source may be a subclass of timm's `Attention`. The hashed path uses a tied query/key projection
    `qk` (initialised from the pretrained query and key weights), the value
    rows of `qkv`, and the fitted hash state held in buffers (`hash_*`), which
    `frugalvit.fit_hashes` fills. Attention dropout and attention masks do not
    apply to the hashed path (there are no attention weights to drop or mask).
    """

    def __init__(self, source: Attention, bits: int = 16, anchors: int = 25, bias: float | None = None,
                 normaliser: Normaliser = "consistent", init: Literal["mean", "query", "key"] = "mean") -> None:
        nn.Module.__init__(self)
        _check_range("bits", bits, 1, MAX_BITS)
        _check_range("anchors", anchors, 2, MAX_ANCHORS)
        if normaliser not in NORMALISERS:
            raise ValueError(f"normaliser must be one of {NORMALISERS}, got {normaliser!r}")
        if init not in ("mean", "query", "key"):
            raise ValueError(f"init must be 'mean', 'query' or 'key', got {init!r}")
        if bias is None:
            bias = float(bits + 1)
        if not bits < bias < float("inf"):
            raise ValueError(f"bias must be a finite number above bits ({bits}) so that every similarity is positive "
                             f"(default bits + 1), got {bias}")
        # Every part of the source layer, shared (its weights are the converted layer's): `remove_ecoformer`
        # hands exactly these back to a layer of the source's class.
        self.source_class: type[Attention] = type(source)
        self.source_parts = graft(self, source)
        if "attn_dim" not in self.source_parts:  # timm before `attn_dim`
            self.attn_dim = source.num_heads * source.head_dim
        if "gate" not in self.source_parts:  # timm before gated attention
            self.gate = None
        self.bits, self.num_anchors, self.bias, self.normaliser = bits, anchors, float(bias), normaliser
        self.hashing = True

        weight, qkv_bias = source.qkv.weight, source.qkv.bias
        d = self.attn_dim
        parts = {"mean": (0.5, 0.5), "query": (1.0, 0.0), "key": (0.0, 1.0)}[init]
        self.qk = nn.Linear(weight.shape[1], d, bias=qkv_bias is not None, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.qk.weight.copy_(parts[0] * weight[:d] + parts[1] * weight[d:2 * d])
            if qkv_bias is not None:
                self.qk.bias.copy_(parts[0] * qkv_bias[:d] + parts[1] * qkv_bias[d:2 * d])
        self.qk_norm = copy.deepcopy(source.q_norm)
        dd: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
        h = self.num_heads
        self.register_buffer("hash_anchors", torch.zeros(h, anchors, self.head_dim, **dd))
        self.register_buffer("hash_bandwidth", torch.ones(h, **dd))
        self.register_buffer("hash_mean", torch.zeros(h, anchors, **dd))
        self.register_buffer("hash_weights", torch.zeros(h, bits, anchors, **dd))
        self.register_buffer("hash_fitted", torch.zeros((), dtype=torch.bool, device=weight.device))

    @property
    def fitted(self) -> bool:
        """Whether the hash functions have been fitted (or loaded fitted)."""
        return bool(self.hash_fitted)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, anchors={self.num_anchors}, bias={self.bias:g}, normaliser={self.normaliser}, "
                f"hashing={self.hashing}, fitted={self.fitted}")

    def to_source(self) -> Attention:
        """A layer of the source's class holding this layer's timm parts (the same objects): the unconverted layer."""
        restored = self.source_class.__new__(self.source_class)
        nn.Module.__init__(restored)
        graft(restored, self, self.source_parts)
        return restored

    def tied_tokens(self, x: Tensor) -> Tensor:
        """L2-normalised tied query/key tokens of `x` (B, N, C): `(B, H, N, head_dim)`."""
        return l2_normalize(self.qk_norm(split_heads(self, self.qk(x))))

    def softmax_logits(self, x: Tensor) -> Tensor:
        """Attention logits `scale * q k^T` of the original (pretrained) projections: `(B, H, N, N)`."""
        q, k, _ = split_qkv(self, x)
        return (q * self.scale) @ k.transpose(-1, -2)

    def codes(self, x: Tensor) -> Tensor:
        """Binary codes of the tied tokens of `x`: `(B, H, N, bits)` in {-1, +1}."""
        if not self.fitted:
            raise RuntimeError("EcoFormer hash functions are not fitted: call frugalvit.fit_hashes(model, images) "
                               "(or load a state dict saved after fitting) before running hashed attention")
        return hash_codes(self.tied_tokens(x), self.hash_anchors, self.hash_bandwidth, self.hash_mean,
                          self.hash_weights)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not self.hashing:  # the source layer's own forward on the same parts
            if self.source_class is Attention:
                return super().forward(x, *args, **kwargs)
            return self.to_source()(x, *args, **kwargs)  # a subclass: its forward may call its own methods
        attn_mask = kwargs.get("attn_mask", args[0] if args else None)
        is_causal = kwargs.get("is_causal", args[1] if len(args) > 1 else False)
        if attn_mask is not None or is_causal:
            raise ValueError("hashed attention supports neither attention masks nor causal attention; "
                             "set hashing = False on this layer for masked inputs")
        gate = attention_gate(self, x)
        d = self.attn_dim
        value_bias = self.qkv.bias[2 * d:] if self.qkv.bias is not None else None
        v = split_heads(self, F.linear(x, self.qkv.weight[2 * d:], value_bias))
        codes = self.codes(x)
        return merge_heads(self, hashed_linear_attention(codes, codes, v, self.bias, self.normaliser), gate)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        if prefix + "hash_fitted" not in state_dict:  # an error even with strict=False: hashes cannot be guessed
            error_msgs.append(
                f"state dict has no EcoFormer hash state for layer '{prefix.rstrip('.')}' (no '{prefix}hash_fitted'): "
                "it was saved from an unconverted model. Load it into the model before calling "
                "frugalvit.ecoformer(...), then run frugalvit.fit_hashes")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
