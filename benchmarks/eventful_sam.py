"""Benchmark: timm's SAM-B image encoder (windowed + global attention) dense vs eventful on a real clip, on the CPU.

SAM-B (`samvit_base_patch16`) at 1024 px: a 64 x 64 token grid (4,096 tokens), 14 x 14 windows in eight
blocks, four global blocks, decomposed relative positions, a conv neck. Dense (timm) and every budget's
eventful model run frame by frame interleaved on the same frames (a load spike hits all alike); the
speed-up is the ratio of summed wall time over the frames after the first (the steady state; all frames
also reported), min / median / max over `--repeats` replays from a reset. Executed MACs come from a
separate `CostCounter` pass on twins (same policy, same frames, hence the same token choices). Fidelity:
relative L2 and cosine of the final feature map (B, 256, 64, 64) against dense. Random weights (timm's
initialisation; no download here), so fidelity only checks that nothing breaks: speed and MACs are the point.

    python benchmarks/eventful_sam.py                   # SAM-B 1024 px, 8 frames, 1 thread (about 10 minutes)
    python benchmarks/eventful_sam.py --size 256 --frames 4 --repeats 1   # a smoke run

Writes OUT.json and OUT.png (default benchmarks/results/eventful_sam.*).
"""

from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

import timm
import torch
from torch.nn import functional as F

from frugalvit import TopFraction, eventful
from frugalvit.reporting import save_figure_atomically, write_json_atomically
from frugalvit.video.compare import FrameStep, frame_loop
from frugalvit.video.decode import bundled_clip_path, load_frames

MAC_TARGET, SPEED_TARGET, TARGET_BUDGET = 5.0, 3.0, 0.125


def run(model: torch.nn.Module, frames: torch.Tensor, budgets: list[float], repeats: int) -> dict[str, object]:
    """Timed interleaved replays, then one counting pass; per budget: speed-ups, MAC ratios, fidelity."""
    speedups = {b: {"all": [], "after_first": []} for b in budgets}
    fidelity = {b: {"relative_l2": [], "cosine": []} for b in budgets}
    dense_ms: list[float] = []
    for repeat in range(repeats):
        models = {b: eventful(model, TopFraction(b)) for b in budgets}
        steps = [FrameStep("dense", model.forward_features, "time")]
        steps += [FrameStep(f"eventful {b:g}", ev.forward_features, "time") for b, ev in models.items()]
        times: dict[str, list[float]] = {step.name: [] for step in steps}
        for index, _, _, results in frame_loop(frames, steps):
            dense = results["dense"].output
            for step in steps:
                times[step.name].append(results[step.name].ms)
            for budget in budgets:
                out = results[f"eventful {budget:g}"].output
                if repeat == 0 and index > 0:
                    fidelity[budget]["relative_l2"].append(((out - dense).norm() / dense.norm()).item())
                    fidelity[budget]["cosine"].append(F.cosine_similarity(out.flatten(), dense.flatten(), dim=0).item())
            print(f"  repeat {repeat} frame {index}: " + ", ".join(f"{n} {times[n][-1]:.0f} ms" for n in times),
                  flush=True)
        dense_ms.extend(times["dense"][1:])
        for budget in budgets:
            mine = times[f"eventful {budget:g}"]
            speedups[budget]["all"].append(sum(times["dense"]) / sum(mine))
            speedups[budget]["after_first"].append(sum(times["dense"][1:]) / sum(mine[1:]))
    twins = {b: eventful(model, TopFraction(b)) for b in budgets}
    count_steps = [FrameStep("dense", model.forward_features, "macs", first_frame_only=True)]
    count_steps += [FrameStep(f"eventful {b:g}", ev.forward_features, "macs") for b, ev in twins.items()]
    macs: dict[str, list[int]] = {step.name: [] for step in count_steps}
    for _, _, _, results in frame_loop(frames, count_steps):
        for name, result in results.items():
            macs[name].append(result.macs)
    dense_macs = macs["dense"][0]
    report: dict[str, object] = {"dense_ms_median": statistics.median(dense_ms), "dense_gmacs": dense_macs / 1e9,
                                 "budgets": {}}
    for budget in budgets:
        counted = macs[f"eventful {budget:g}"]
        spread = {key: {"min": min(v), "median": statistics.median(v), "max": max(v)}
                  for key, v in speedups[budget].items()}
        report["budgets"][f"{budget:g}"] = {
            "speedup_after_first": spread["after_first"], "speedup_all_frames": spread["all"],
            "mac_ratio_after_first": dense_macs * (len(counted) - 1) / sum(counted[1:]),
            "mac_ratio_all_frames": dense_macs * len(counted) / sum(counted),
            "eventful_gmacs_per_frame": [m / 1e9 for m in counted],
            "relative_l2_mean": statistics.fmean(fidelity[budget]["relative_l2"]),
            "cosine_mean": statistics.fmean(fidelity[budget]["cosine"])}
    return report


def plot(report: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(float(b) for b in report["results"]["budgets"])
    rows = [report["results"]["budgets"][f"{b:g}"] for b in budgets]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(budgets, [r["mac_ratio_after_first"] for r in rows], "o--", label="MAC ratio")
    medians = [r["speedup_after_first"]["median"] for r in rows]
    errors = [[m - r["speedup_after_first"]["min"] for m, r in zip(medians, rows)],
              [r["speedup_after_first"]["max"] - m for m, r in zip(medians, rows)]]
    ax.errorbar(budgets, medians, yerr=errors, fmt="o-", capsize=3, label="wall-clock speed-up")
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="share of tokens per gate", ylabel="dense / eventful",
           title=f"SAM-B {report['size']} px, {report['threads']} thread(s), {report['frames']} frames")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomically(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--budgets", default="0.125,0.25", help="comma-separated TopFraction budgets")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eventful_sam"))
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.budgets.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model("samvit_base_patch16", pretrained=False, img_size=args.size).eval()
    cfg = model.pretrained_cfg
    frames = load_frames(bundled_clip_path("bigbuckbunny"), args.size, cfg["mean"], cfg["std"], max_frames=args.frames)
    with torch.no_grad():
        results = run(model, frames, budgets, args.repeats)
    report = {"benchmark": "eventful_sam", "model": "samvit_base_patch16", "size": args.size,
              "tokens": (args.size // 16) ** 2, "frames": args.frames, "threads": args.threads,
              "repeats": args.repeats, "clip": "bigbuckbunny", "weights": "random (timm init)",
              "torch": torch.__version__, "timm": timm.__version__, "machine": platform.machine(),
              "targets": {"budget": TARGET_BUDGET, "mac_ratio": MAC_TARGET, "speedup": SPEED_TARGET},
              "results": results}
    target = results["budgets"].get(f"{TARGET_BUDGET:g}")
    if target is not None:
        report["targets"]["met"] = {"mac_ratio": target["mac_ratio_after_first"] >= MAC_TARGET,
                                    "speedup": target["speedup_after_first"]["median"] >= SPEED_TARGET}
    write_json_atomically(report, args.out.with_suffix(".json"), indent=1)
    plot(report, args.out.with_suffix(".png"))
    for budget, row in results["budgets"].items():
        print(f"budget {budget}: speed-up {row['speedup_after_first']['median']:.2f}x "
              f"[{row['speedup_after_first']['min']:.2f}, {row['speedup_after_first']['max']:.2f}], "
              f"MACs {row['mac_ratio_after_first']:.2f}x, rel L2 {row['relative_l2_mean']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
