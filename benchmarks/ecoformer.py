"""EcoFormer benchmark: attention wall time and energy vs token count, and fine-tuned accuracy.

Times one attention layer's core (everything between the projections) at
batch 1 for: EcoFormer hashed attention (L2 normalisation, RBF hash, signed
linear attention), fused SDPA (`F.scaled_dot_product_attention`, what timm
runs by default) and explicit softmax (timm's non-fused path). Projections
are left out of the timing for all three; the tied query/key projection saves
one of timm's three input projections, which the energy table reports apart.

Energy uses `CostCounter` (matrix products, additions-only signed products)
with Horowitz 45 nm FP32 constants, plus analytic element-wise counts
(`frugalvit.ecoformer.cost`). Accuracy comes from a `frugalvit ecoformer
finetune` run (`--accuracy-from RUN/results.json`).

Methods are timed interleaved (one call of each in turn), so that all three
see the same load on a shared machine; min, median and max are recorded.

Usage:
    python benchmarks/ecoformer.py --accuracy-from RUN/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional as F

from frugalvit.cost import CostCounter, HOROWITZ_45NM_FP32
from frugalvit.ecoformer import hash_codes, hashed_linear_attention
from frugalvit.ecoformer.cost import (hashed_attention_counted, hashed_attention_elementwise,
                                      softmax_attention_counted, softmax_attention_elementwise)
from frugalvit.ecoformer.fitting import HashState
from frugalvit.ecoformer.hashing import l2_normalize
from frugalvit.ioutil import atomic_file, write_json_atomically
from frugalvit.timing import timed as timed_call

DEFAULT_TOKENS = (16, 49, 100, 196, 400, 784, 1024, 1600, 2304, 3136, 4096, 6400, 9216, 12544)
RESULTS = Path(__file__).parent / "results"


def explicit_softmax(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, per_head: bool) -> torch.Tensor:
    """timm's non-fused attention; head by head when the N x N matrices of all heads would not fit in memory."""
    scale = q.shape[-1] ** -0.5
    if not per_head:
        return ((q * scale) @ k.transpose(-1, -2)).softmax(-1) @ v
    return torch.cat([((q[:, h:h + 1] * scale) @ k[:, h:h + 1].transpose(-1, -2)).softmax(-1) @ v[:, h:h + 1]
                      for h in range(q.shape[1])], dim=1)


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times (ms) of each function, interleaved so that all see the same machine load."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed_call(fn)[1])  # CPU tensors: nothing to synchronise
    return times


def summary(times: list[float]) -> dict[str, float]:
    return {"min_ms": min(times), "median_ms": statistics.median(times), "max_ms": max(times), "repeats": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--bits", type=int, default=16)
    parser.add_argument("--anchors", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats up to 1,024 tokens (fewer above)")
    parser.add_argument("--per-head-above", type=int, default=3136,
                        help="explicit softmax runs head by head above this many tokens (memory)")
    parser.add_argument("--accuracy-from", type=Path, help="results.json of a `frugalvit ecoformer finetune` run")
    parser.add_argument("--out", type=Path, default=RESULTS / "ecoformer")
    parser.add_argument("--merge", action="store_true",
                        help="keep the timings of thread counts not measured now from the existing OUT.json")
    args = parser.parse_args()

    heads, dim, bits, anchors = args.heads, args.head_dim, args.bits, args.anchors
    bias = float(bits + 1)  # the library default; neither timing nor counted energy depends on it
    width = heads * dim
    generator = torch.Generator().manual_seed(0)
    timing: dict[str, list[dict[str, object]]] = {}
    energy: list[dict[str, object]] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        rows = []
        for n in args.tokens:
            q, k, v, qk = (torch.randn(1, heads, n, dim, generator=generator) for _ in range(4))
            # hash state: timing and counts do not depend on fitted values, so random anchors and weights do
            state = HashState(l2_normalize(torch.randn(heads, anchors, dim, generator=generator)),
                              torch.ones(heads), torch.zeros(heads, anchors),
                              torch.randn(heads, bits, anchors, generator=generator))

            def hashed() -> torch.Tensor:
                codes = hash_codes(l2_normalize(qk), state.anchors, state.bandwidth, state.mean, state.weights)
                return hashed_linear_attention(codes, codes, v, bias)

            per_head = n > args.per_head_above
            repeats = args.repeats if n <= 1024 else max(3, args.repeats // 2) if n <= 4096 else 3
            with torch.inference_mode():
                times = timed({"hashed": hashed, "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                               "explicit": lambda: explicit_softmax(q, k, v, per_head)}, repeats)
            row = {"tokens": n, "threads": threads, "explicit_per_head": per_head,
                   **{name: summary(values) for name, values in times.items()}}
            row["speedup_vs_sdpa"] = row["sdpa"]["median_ms"] / row["hashed"]["median_ms"]
            row["speedup_vs_explicit"] = row["explicit"]["median_ms"] / row["hashed"]["median_ms"]
            print(f"threads {threads} N {n:6d}: hashed {row['hashed']['median_ms']:9.2f} ms, "
                  f"sdpa {row['sdpa']['median_ms']:9.2f} ms, explicit {row['explicit']['median_ms']:9.2f} ms, "
                  f"x{row['speedup_vs_sdpa']:.1f} vs sdpa", flush=True)
            rows.append(row)
            if threads == args.threads[0]:
                with torch.inference_mode(), CostCounter() as hashed_cost:
                    hashed()
                with torch.inference_mode(), CostCounter() as sdpa_cost:
                    F.scaled_dot_product_attention(q, k, v)
                analytic = hashed_attention_counted(n, heads, dim, bits, anchors)
                assert hashed_cost.total == analytic, (hashed_cost.total, analytic)
                assert sdpa_cost.total == softmax_attention_counted(n, heads, dim)
                soft_ext = softmax_attention_elementwise(n, heads, dim).energy_joules()
                hash_ext = hashed_attention_elementwise(n, heads, dim, bits, anchors).energy_joules()
                soft_j, hash_j = sdpa_cost.energy_joules(), hashed_cost.energy_joules()
                projections = n * width * width  # one input projection: timm runs 3 (q, k, v), EcoFormer 2 (qk, v)
                proj_j = projections * (HOROWITZ_45NM_FP32.mult_pj + HOROWITZ_45NM_FP32.add_pj) * 1e-12
                energy.append({
                    "tokens": n,
                    "softmax": {"mults": sdpa_cost.mults, "adds": sdpa_cost.adds, "energy_uj": 1e6 * soft_j},
                    "hashed": {"mults": hashed_cost.mults, "adds": hashed_cost.adds, "energy_uj": 1e6 * hash_j},
                    "saving_counted": 1 - hash_j / soft_j,
                    "softmax_with_elementwise_uj": 1e6 * (soft_j + soft_ext),
                    "hashed_with_elementwise_uj": 1e6 * (hash_j + hash_ext),
                    "saving_with_elementwise": 1 - (hash_j + hash_ext) / (soft_j + soft_ext),
                    "layer_softmax_uj": 1e6 * (soft_j + 4 * proj_j),
                    "layer_hashed_uj": 1e6 * (hash_j + 3 * proj_j),
                    "saving_whole_layer": 1 - (hash_j + 3 * proj_j) / (soft_j + 4 * proj_j),
                })
        timing[str(threads)] = rows

    existing = args.out.with_suffix(".json")
    if args.merge and existing.is_file():
        previous = json.loads(existing.read_text())
        timing = {**{k: v for k, v in previous["timing"].items() if k not in timing}, **timing}
        timing = dict(sorted(timing.items(), key=lambda item: int(item[0])))
    crossover = {}
    for threads, rows in timing.items():
        faster = [row["speedup_vs_sdpa"] > 1 for row in rows]
        first = next((i for i in range(len(rows)) if all(faster[i:])), None)
        crossover[threads] = rows[first]["tokens"] if first is not None else None
    result = {
        "config": {"heads": heads, "head_dim": dim, "bits": bits, "anchors": anchors, "bias": bias, "batch": 1,
                   "dtype": "float32", "explicit_per_head_above_tokens": args.per_head_above,
                   "timed": "attention core only (no projections); hashed includes L2 norm + hashing"},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "note": "2 shared cores; other jobs may have been running"},
        "energy_model": HOROWITZ_45NM_FP32.source,
        "energy_baseline": "softmax attention counted as executed; fused SDPA executes the same multiply-adds "
                           "(it saves memory traffic, which an arithmetic energy table does not count)",
        "timing": timing, "crossover_tokens_vs_sdpa": crossover, "energy": energy,
    }
    if args.accuracy_from is not None:
        run = json.loads(args.accuracy_from.read_text())
        result["accuracy"] = {"source": str(args.accuracy_from), **run["accuracy"], "test_images": run["test_images"],
                              "model": run["model"], "ecoformer": run["ecoformer"], "finetune": run["finetune"],
                              "energy_per_image": {k: run["energy_per_image"][k] for k in
                                                   ("attention_layers_saving", "total_saving")}}
    write_json_atomically(result, args.out.with_suffix(".json"))
    plot(result, args.out.with_suffix(".png"))
    print(f"crossover vs SDPA (tokens): {crossover}; wrote {args.out.with_suffix('.json')} and .png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"hashed": ("tab:green", "EcoFormer hashed"), "sdpa": ("tab:blue", "fused SDPA"),
              "explicit": ("tab:red", "explicit softmax")}
    for threads, rows in result["timing"].items():
        tokens = [row["tokens"] for row in rows]
        for key, (colour, label) in styles.items():
            left.plot(tokens, [row[key]["median_ms"] for row in rows], color=colour,
                      linestyle="-" if threads == "1" else "--", marker="o", markersize=3,
                      label=f"{label}, {threads} thread{'s' if threads != '1' else ''}")
    left.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="median wall time (ms), batch 1",
             title=f"Attention core, {result['config']['heads']} heads x {result['config']['head_dim']}")
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    rows = result["energy"]
    tokens = [row["tokens"] for row in rows]
    right.plot(tokens, [row["softmax"]["energy_uj"] for row in rows], color="tab:red", label="softmax (counted)")
    right.plot(tokens, [row["hashed"]["energy_uj"] for row in rows], color="tab:green", label="hashed (counted)")
    right.plot(tokens, [row["softmax_with_elementwise_uj"] for row in rows], color="tab:red", linestyle=":",
               label="softmax + element-wise")
    right.plot(tokens, [row["hashed_with_elementwise_uj"] for row in rows], color="tab:green", linestyle=":",
               label="hashed + element-wise")
    right.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="energy per layer (uJ, 45 nm FP32)",
              title="Attention-core arithmetic energy (Horowitz 2014)")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as handle:
        fig.savefig(handle, format="png", dpi=120)


if __name__ == "__main__":
    main()
