"""Analytic operation counts of softmax and hashed attention, for energy reports and tests.

Two conventions. *Counted* follows `CostCounter` (matrix products only,
as for every model in this library): softmax attention is 2 N^2 D
multiply-accumulates per head; hashed attention is the kernel features
(N m D MACs), the hash projection (N m b MACs) and the signed products with
the +-1 codes (additions only). *Element-wise* adds what `CostCounter` leaves
out, counted from the operations our code executes: normalisations, the RBF
exponentials, centring, sign, bias, softmax and the final division. Energy of
exp and division has no entry in Horowitz's table; we assume a division costs
one multiplication (a lower bound) and an exp `EXP_MULTS` multiplications and
`EXP_ADDS` additions (range reduction plus a degree-5 polynomial), and apply
these to softmax and hashed attention alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from frugalvit.cost import HOROWITZ_45NM_FP32, EnergyModel, OpCost, energy_joules

EXP_MULTS = 6
EXP_ADDS = 6


@dataclass(frozen=True)
class ElementwiseOps:
    """Element-wise arithmetic: multiplications, additions (comparisons included), exponentials, divisions."""

    mults: int = 0
    adds: int = 0
    exps: int = 0
    divs: int = 0

    def energy_joules(self, model: EnergyModel = HOROWITZ_45NM_FP32) -> float:
        """Energy with divisions priced as multiplications and exps as EXP_MULTS mults + EXP_ADDS adds."""
        return energy_joules(self.mults + self.divs + EXP_MULTS * self.exps, self.adds + EXP_ADDS * self.exps, model)


def softmax_attention_counted(tokens: int, heads: int, head_dim: int, batch: int = 1) -> OpCost:
    """Matrix-product cost of softmax attention (explicit or fused SDPA): q k^T and attn v."""
    return OpCost(macs=2 * batch * heads * tokens * tokens * head_dim)


def hashed_attention_counted(tokens: int, heads: int, head_dim: int, bits: int, anchors: int, batch: int = 1,
                             normaliser: str = "consistent") -> OpCost:
    """Matrix-product cost of hashing the tied tokens and of hashed linear attention (self-attention)."""
    macs = batch * heads * tokens * anchors * (head_dim + bits)
    width = head_dim + 1  # values with the appended column of ones
    adds = batch * heads * width * (2 * bits * tokens + (tokens if normaliser == "consistent" else 0))
    return OpCost(macs=macs, adds_only=adds)


def softmax_attention_elementwise(tokens: int, heads: int, head_dim: int, batch: int = 1) -> ElementwiseOps:
    """Scaling q, row max, subtract, exp, row sum, normalise (the explicit path; fused SDPA does about the same)."""
    n, per = tokens, batch * heads
    return ElementwiseOps(mults=per * n * head_dim, adds=per * 3 * n * n, exps=per * n * n, divs=per * n * n)


def hashed_attention_elementwise(tokens: int, heads: int, head_dim: int, bits: int, anchors: int, batch: int = 1,
                                 normaliser: str = "consistent") -> ElementwiseOps:
    """L2 normalisation, squared norms, RBF exp, centring, sign, bias terms and the final division."""
    n, d, m, b, per = tokens, head_dim, anchors, bits, batch * heads
    mults = 2 * n * d + n * m                  # squares for the L2 norm and ||x||^2, 2 x.a
    adds = 2 * n * d + 2 * n * m               # their sums, and ||x||^2 + ||a||^2 - 2 x.a
    adds += n * m + n * b                      # centring, sign (as comparisons)
    divs = n + n * d + n * m + n * d           # sqrt and division of the L2 norm, /(2 sigma), final division
    if normaliser == "consistent":
        mults += d + 1
        adds += n * (d + 1)
    else:
        mults += n * (d + 1)
        adds += n * (d + 1)
    anchors_once = heads * m * d  # ||a||^2 of the anchors: once per head and call, whatever the batch
    return ElementwiseOps(mults=per * mults + anchors_once, adds=per * adds + anchors_once, exps=per * n * m,
                          divs=per * divs)


def model_energy(model: "torch.nn.Module", images: "torch.Tensor") -> dict[str, object]:
    """Counted arithmetic and energy of one forward pass, in total and per attention layer (`*.attn` modules).

    Per layer the figures include the layer's projections (qkv or tied qk + v, and proj). `images` are
    moved to the model's device and dtype.
    """
    import torch

    from frugalvit.cost import CostCounter
    from frugalvit.data import model_input
    from frugalvit.timing import model_device_dtype

    with torch.no_grad(), CostCounter() as cost:
        model(model_input(images, *model_device_dtype(model)))

    def entry(op: OpCost) -> dict[str, float]:
        return {"mults": op.mults, "adds": op.adds, "macs": op.macs, "energy_uj": op.energy_joules() * 1e6}

    layers = {name.split(".", 1)[-1]: entry(op) for name, op in cost.by_module().items() if name.endswith(".attn")}
    return {"total": entry(cost.total), "attention_layers": layers,
            "attention_layers_energy_uj": sum(layer["energy_uj"] for layer in layers.values()),
            "energy_model": HOROWITZ_45NM_FP32.source, "images": int(images.shape[0])}
