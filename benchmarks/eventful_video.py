"""Benchmark: dense timm ViT vs its eventful version on real clips, across budgets and thread counts.

For each model, input size and clip, every budget's eventful model and the
dense model (timm, fused SDPA) run frame by frame *interleaved* (dense, then
each budget, on the same frame), so a load spike on this shared machine hits
all of them alike. Each repeat replays the clip from a reset; speed-ups are
ratios of summed wall time, reported as min / median / max over repeats.
Executed MACs come from `frugalvit.CostCounter` in a separate counting pass
(same frames, same policy, hence the same token choices).

Writes OUT/NAME.json and OUT/NAME.png (default benchmarks/results/eventful_video.*).

    python benchmarks/eventful_video.py            # the full grid (about an hour on 2 cores)
    python benchmarks/eventful_video.py --quick    # ViT-S 224 only, a few frames
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from pathlib import Path

import torch
from torch.nn import functional as F

from frugalvit import CostCounter, TopFraction, eventful
from frugalvit.models import load_timm_model
from frugalvit.reporting import save_figure_atomically, write_json_atomically
from frugalvit.video.compare import FrameStep, frame_loop
from frugalvit.video.decode import bundled_clip_path, load_frames

FIDELITY_TARGET = 0.99
SPEEDUP_TARGET = 3.0
EFFICIENCY_TARGET = 0.7


def measure(model: torch.nn.Module, frames: torch.Tensor, budgets: list[float], repeats: int,
            threads: int, cut_share: float | None, token_selection: str = "per_gate"
            ) -> dict[float, dict[str, list[float]]]:
    """Interleaved timing of dense and every budget; fidelity of each budget's pooled features."""
    torch.set_num_threads(threads)
    results = {b: {"speedup": [], "speedup_after_first": [], "cosine": [], "token_l2": [], "top1": [], "ms": [],
                   "dense_ms": []} for b in budgets}
    for _ in range(repeats):
        models = {b: eventful(model, TopFraction(b), cut_share=cut_share, token_selection=token_selection)
                  for b in budgets}
        steps = [FrameStep("dense", model.forward_features, "time")]
        steps += [FrameStep(f"eventful {b}", ev.forward_features, "time") for b, ev in models.items()]
        dense_times: list[float] = []
        times = {b: [] for b in budgets}
        cosines = {b: [] for b in budgets}
        token_errors = {b: [] for b in budgets}
        agree = {b: [] for b in budgets}
        with torch.no_grad():
            for _, _, _, calls in frame_loop(frames, steps):
                dense = calls["dense"].output
                dense_times.append(calls["dense"].ms / 1e3)
                dense_pooled = model.forward_head(dense, pre_logits=True)
                dense_top1 = model.forward_head(dense).argmax(-1)
                for budget in budgets:
                    features = calls[f"eventful {budget}"].output
                    times[budget].append(calls[f"eventful {budget}"].ms / 1e3)
                    pooled = model.forward_head(features, pre_logits=True)
                    cosines[budget].append(F.cosine_similarity(pooled, dense_pooled, dim=-1).item())
                    token_errors[budget].append(((features - dense).norm() / dense.norm()).item())
                    agree[budget].append(float((model.forward_head(features).argmax(-1) == dense_top1).item()))
        for budget in budgets:
            row = results[budget]
            row["speedup"].append(sum(dense_times) / sum(times[budget]))
            row["speedup_after_first"].append(sum(dense_times[1:]) / sum(times[budget][1:]))
            row["cosine"].append(statistics.fmean(cosines[budget]))
            row["token_l2"].append(statistics.fmean(token_errors[budget]))
            row["top1"].append(statistics.fmean(agree[budget]))
            row["ms"].append(1e3 * statistics.median(times[budget][1:]))
            row["dense_ms"].append(1e3 * statistics.median(dense_times[1:]))
    return results


def count_macs(model: torch.nn.Module, frames: torch.Tensor, budgets: list[float],
               cut_share: float | None, token_selection: str = "per_gate") -> tuple[float, dict, dict, dict]:
    """Executed MACs per frame: dense (one frame), and each budget's mean over the frames after the first
    (matching the speed-up, which also leaves out the first, full frame); state bytes per stream; the
    frames after the first that scene-cut detection recomputed in full."""
    with torch.no_grad(), CostCounter() as cost:
        model.forward_features(frames[:1])
    dense = cost.macs
    per_budget, state, cuts = {}, {}, {}
    for budget in budgets:
        ev = eventful(model, TopFraction(budget), cut_share=cut_share, token_selection=token_selection)
        total = 0
        cuts[budget] = []
        for index, _, _, calls in frame_loop(frames, [FrameStep("eventful", ev.forward_features, "macs")]):
            total += calls["eventful"].macs if index > 0 else 0
            if index > 0 and ev.last_frame_full:
                cuts[budget].append(index)
        per_budget[budget] = total / (len(frames) - 1)
        state[budget] = ev.state_bytes()
    return dense, per_budget, state, cuts


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed_axis, fidelity_axis) = plt.subplots(1, 2, figsize=(13, 5))
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["size"], row["clip"], row["threads"]), []).append(row)
    for (model, size, clip, threads), group in sorted(groups.items()):
        group.sort(key=lambda r: r["budget"])
        budgets = [r["budget"] for r in group]
        label = f"{model.split('_patch')[0]}@{size} {clip} {threads}t"
        line, = speed_axis.plot(budgets, [r["speedup_after_first"]["median"] for r in group], marker="o", label=label)
        speed_axis.fill_between(budgets, [r["speedup_after_first"]["min"] for r in group],
                                [r["speedup_after_first"]["max"] for r in group], color=line.get_color(), alpha=0.15)
        speed_axis.plot(budgets, [r["mac_ratio"] for r in group], linestyle=":", color=line.get_color())
        fidelity_axis.plot(budgets, [r["cosine_mean"] for r in group], marker="o", color=line.get_color(), label=label)
    speed_axis.set_xscale("log", base=2)
    speed_axis.set_xlabel("share of tokens updated per gate (TopFraction)")
    speed_axis.set_ylabel("speed-up vs dense timm (solid, min-max band); MAC ratio (dotted)")
    speed_axis.legend(fontsize=7)
    fidelity_axis.set_xscale("log", base=2)
    fidelity_axis.set_xlabel("share of tokens updated per gate (TopFraction)")
    fidelity_axis.set_ylabel("mean cosine similarity to dense features")
    fidelity_axis.axhline(FIDELITY_TARGET, color="grey", linestyle="--", linewidth=1)
    figure.suptitle("Eventful vs dense timm ViT on bundled real clips (CPU; weights as labelled in the JSON)")
    save_figure_atomically(figure, path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224",
                        help="timm names; the input size comes from --sizes")
    parser.add_argument("--sizes", default="224,384")
    parser.add_argument("--clips", default="bigbuckbunny,bikes")
    parser.add_argument("--budgets", default="0.0625,0.125,0.25,0.333")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--start-frame", type=int, default=20, help="skip the clip's first frames (titles)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cut-share", type=float, default=0.5,
                        help="scene-cut refresh as in `frugalvit video` (negative: off)")
    parser.add_argument("--token-selection", choices=["per_gate", "shared"], default="per_gate",
                        help="EventfulViT.token_selection of every eventful model (default: %(default)s)")
    parser.add_argument("--checkpoint", type=Path, help="trained weights for the model (default: random init)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="eventful_video")
    parser.add_argument("--quick", action="store_true", help="ViT-S 224, bigbuckbunny, 6 frames, 2 repeats")
    args = parser.parse_args()
    if args.quick:
        args.models, args.sizes, args.clips, args.frames, args.repeats = (
            "vit_small_patch16_224", "224", "bigbuckbunny", 6, 2)
    budgets = [float(b) for b in args.budgets.split(",")]
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else "random init (seed 0)"
    cut_share = args.cut_share if args.cut_share >= 0 else None
    rows = []
    for model_name in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            torch.manual_seed(0)
            model = load_timm_model(model_name, size, args.checkpoint, random_init=args.checkpoint is None)
            config = model.pretrained_cfg
            for clip in args.clips.split(","):
                frames = load_frames(bundled_clip_path(clip), size, tuple(config["mean"]), tuple(config["std"]),
                                     args.start_frame + args.frames)[args.start_frame:]
                torch.set_num_threads(1)
                dense_macs, budget_macs, state, cuts = count_macs(model, frames, budgets, cut_share,
                                                                  args.token_selection)
                for threads in (int(t) for t in args.threads.split(",")):
                    measured = measure(model, frames, budgets, args.repeats, threads, cut_share,
                                       args.token_selection)
                    for budget in budgets:
                        m = measured[budget]
                        mac_ratio = dense_macs / budget_macs[budget]
                        row = {"model": model_name, "size": size, "clip": clip, "threads": threads,
                               "budget": budget, "weights": weights, "frames": len(frames),
                               "repeats": args.repeats, "dense_gmacs": dense_macs / 1e9,
                               "eventful_gmacs_mean": budget_macs[budget] / 1e9, "mac_ratio": mac_ratio,
                               "speedup": spread(m["speedup"]), "speedup_after_first": spread(m["speedup_after_first"]),
                               "efficiency": statistics.median(m["speedup_after_first"]) / mac_ratio,
                               "cosine_mean": statistics.fmean(m["cosine"]),
                               "token_relative_l2": statistics.fmean(m["token_l2"]), "top1_agreement": statistics.fmean(m["top1"]),
                               "dense_ms_median": statistics.median(m["dense_ms"]),
                               "eventful_ms_median": statistics.median(m["ms"]),
                               "state_mib_per_stream": state[budget] / 2**20,
                               "cut_share": cut_share, "full_recompute_frames": cuts[budget],
                               "token_selection": args.token_selection}
                        rows.append(row)
                        print(f"{model_name}@{size} {clip} {threads}t budget {budget}: speed-up "
                              f"{row['speedup_after_first']['median']:.2f}x (min {row['speedup_after_first']['min']:.2f},"
                              f" max {row['speedup_after_first']['max']:.2f}), MAC ratio {mac_ratio:.2f}x, efficiency "
                              f"{row['efficiency']:.2f}, cosine {row['cosine_mean']:.4f}, token L2 {row['token_relative_l2']:.4f}, state "
                              f"{row['state_mib_per_stream']:.1f} MiB", flush=True)
    faithful = [r for r in rows if r["cosine_mean"] >= FIDELITY_TARGET]
    base384 = [r for r in faithful if r["model"].startswith("vit_base") and r["size"] == 384]
    targets = {
        "speedup_3x_vit_b_384_at_cosine_0.99": (max(r["speedup_after_first"]["median"] for r in base384) >= SPEEDUP_TARGET
                                                if base384 else None),
        "best_vit_b_384_speedup_at_cosine_0.99": max((r["speedup_after_first"]["median"] for r in base384), default=None),
        "efficiency_0.7_at_every_budget": all(r["efficiency"] >= EFFICIENCY_TARGET for r in rows),
        "min_efficiency": min(r["efficiency"] for r in rows),
        "note": "fidelity depends on the weights: " + weights,
    }
    meta = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "weights": weights,
            "baseline": "same timm model, dense, fused scaled_dot_product_attention, same thread count",
            "speedup": "sum of dense wall time / sum of eventful wall time over the frames after the first, "
                       "per repeat; min/median/max over repeats",
            "macs": "executed multiply-accumulates per frame (CostCounter); eventful: mean over the frames after the first",
            "fidelity": "cosine: pooled pre-logits features vs dense; token_relative_l2: all final tokens vs dense. "
                        "With random weights the pooled features hardly depend on the input, so cosine is near 1 "
                        "at every budget; token_relative_l2 is the informative number then."}
    write_json_atomically({"meta": meta, "targets": targets, "rows": rows}, args.out / f"{args.name}.json")
    plot(rows, args.out / f"{args.name}.png")
    print("targets:", targets)


if __name__ == "__main__":
    main()
