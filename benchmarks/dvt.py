"""DVT benchmark: accuracy vs mean MACs of cascades (with/without each reuse) against single models, on MNIST.

Trains (or resumes) four 3-stage cascades that differ only in reuse, calibrates
thresholds on the validation split for a sweep of budgets, evaluates the real
early-exit forward on the test split, compares the threshold searches, and
times batch 1 and batch 64 against the full-token single model.

Without reuse the stages share no parameters, so joint training with the sum
of losses (AdamW is per-parameter) trains each stage exactly as it would be
trained alone: those stages *are* the single-model baselines.

    python benchmarks/dvt.py --work-dir /tmp/frugalvit-dvt-bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from frugalvit.cost import CostCounter
from frugalvit.data import load_dataset
from frugalvit.dvt import (DVTConfig, cascade_loss, evaluate_thresholds, genetic_search, geometric_search,
                           search_thresholds)
from frugalvit.ioutil import atomic_file, write_json_atomically
from frugalvit.timing import interleaved_repeats, timed
from frugalvit.training import TrainConfig, save_atomically, train

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"none": (False, False), "feature": (True, False), "relation": (False, True), "both": (True, True)}
BASE = DVTConfig(image_size=28, patch_sizes=(14, 7, 4), in_chans=1, num_classes=10, embed_dim=96, depth=4,
                 num_heads=3, context_dim=16)


def train_variants(work_dir: Path, train_config: TrainConfig, data, names) -> dict:
    models = {}
    for name in names:
        feature, relation = VARIANTS[name]
        config = replace(BASE, feature_reuse=feature, relation_reuse=relation)
        run = work_dir / name
        final = run / "model.pt"
        torch.manual_seed(train_config.seed)  # same initial stage weights in every variant
        cascade = config.build()
        if final.is_file():
            cascade.load_state_dict(torch.load(final, map_location="cpu"))
        else:
            start = time.perf_counter()
            train(cascade, data.train, train_config, run, loss_fn=cascade_loss, progress=True)
            save_atomically(cascade.state_dict(), final)
            print(f"[{name}] trained in {time.perf_counter() - start:.0f}s", flush=True)
        models[name] = cascade.eval()
    return models


def stage_stats(cascade, split, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) confidence and correctness of every stage on a split (forward_all, no exit)."""
    confidence, correct = [], []
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            logits = cascade.forward_all(split.images[start:start + batch_size])
            labels = split.labels[start:start + batch_size]
            confidence.append(torch.stack([l.softmax(-1).amax(-1) for l in logits]))
            correct.append(torch.stack([l.argmax(-1) == labels for l in logits]))
    return torch.cat(confidence, 1).numpy(), torch.cat(correct, 1).numpy()


def resolution_stats(cascade, split, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    return stage_stats(cascade, split, batch_size)


def bisect_budget(val, costs, target: float, low: float, high: float, steps: int,
                  tolerance: float = 0.0) -> float:
    """Smallest budget in [low, high] whose exact-search validation accuracy reaches `target`, by bisection
    (`high` must reach it); stops after `steps` halvings or once the bracket is within `tolerance` of `high`."""
    if search_thresholds(*val, costs, low).accuracy >= target:
        return low
    for _ in range(steps):
        middle = (low + high) / 2
        if search_thresholds(*val, costs, middle).accuracy >= target:
            high = middle
        else:
            low = middle
        if high - low < tolerance * high:
            break
    return high


def budget_for_accuracy(val, costs, target: float, curve: list[dict], steps: int = 10) -> float | None:
    """Smallest budget whose validation accuracy reaches `target`: bracketed by the curve, then bisection."""
    reached = [i for i, point in enumerate(curve) if point["val_accuracy"] >= target]
    if not reached:
        return None
    high = curve[reached[0]]["budget"]
    low = curve[reached[0] - 1]["budget"] if reached[0] > 0 else float(costs[0])
    return bisect_budget(val, costs, target, low, high, steps)


def real_run(cascade, split, thresholds, batch_size: int = 250,
             prepare: Callable[[torch.Tensor], torch.Tensor] = lambda images: images) -> dict:
    """The real early-exit forward on a split, MACs counted by CostCounter; `prepare` maps a stored image
    batch to the cascade's input (e.g. uint8 to float)."""
    cascade.set_thresholds(thresholds)
    correct = macs = 0
    exits = []
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            images = prepare(split.images[start:start + batch_size])
            with CostCounter() as cost:
                out = cascade(images)
            macs += cost.macs
            correct += int((out.logits.argmax(-1) == split.labels[start:start + batch_size]).sum())
            exits.append(out.exit_stage)
    shares = torch.bincount(torch.cat(exits), minlength=cascade.num_stages).float() / len(split)
    return {"accuracy": correct / len(split), "mean_macs": macs / len(split), "exit_fractions": shares.tolist()}


def timing(cascade, single, split, thresholds, batch_size: int, count: int, repeats: int) -> dict:
    cascade.set_thresholds(thresholds)
    batches = [split.images[i:min(i + batch_size, count)] for i in range(0, count, batch_size)]  # count images
    with torch.no_grad(), CostCounter() as cost:
        for batch in batches:
            cascade(batch)
    cascade_macs = cost.macs / count
    with torch.no_grad(), CostCounter() as cost:
        single(batches[0][:1])
    single_macs = cost.macs
    with torch.no_grad():  # batch by batch in turn, so that load from other processes hits both alike
        single_times, cascade_times, ratios = interleaved_repeats(single, cascade, batches, repeats)
    speedup = statistics.median(ratios)
    mac_ratio = single_macs / cascade_macs
    return {"batch_size": batch_size, "images": count, "repeats": repeats,
            "timing": "batches interleaved; speed-up: median over repeats of each repeat's ratio",
            "speedup_per_repeat": {"min": min(ratios), "median": speedup, "max": max(ratios)},
            "single_seconds": {"min": min(single_times), "median": statistics.median(single_times),
                               "max": max(single_times)},
            "cascade_seconds": {"min": min(cascade_times), "median": statistics.median(cascade_times),
                                "max": max(cascade_times)},
            "single_macs": single_macs, "cascade_mean_macs": cascade_macs, "mac_ratio": mac_ratio,
            "speedup_median": speedup, "speedup_best": min(single_times) / min(cascade_times),
            "speedup_over_mac_ratio": speedup / mac_ratio}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    figure, axes = plt.subplots(1, 3, figsize=(18, 5.2))
    best = max(single["test_accuracy"] for single in results["single_models"])
    top = 100 * max([best] + [p["test_accuracy"] for v in results["variants"].values() for p in v["curve"]]) + 0.4
    bottom = 100 * min(single["test_accuracy"] for single in results["single_models"]) - 1.0
    for ax in axes[:2]:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(bottom, top)
    ax = axes[0]
    for name, variant in results["variants"].items():
        curve = variant["curve"]
        ax.plot([p["test_mean_macs"] / 1e6 for p in curve], [100 * p["test_accuracy"] for p in curve], ".-",
                label=f"cascade, reuse: {name}")
    curve = results["resolution_cascade"]["curve"]
    ax.plot([p["test_mean_macs"] / 1e6 for p in curve], [100 * p["test_accuracy"] for p in curve], "x--",
            color="gray", label="training-free resolution cascade (12/20/28 px)")
    for single in results["single_models"]:
        ax.plot(single["macs"] / 1e6, 100 * single["test_accuracy"], "k*", markersize=12)
        ax.annotate(f"single {single['grid']}", (single["macs"] / 1e6, 100 * single["test_accuracy"]),
                    textcoords="offset points", xytext=(5, -12))
    full = results["single_models"][-1]["test_accuracy"]
    ax.axhline(100 * full - 0.2, color="red", lw=0.8, ls=":", label="full-token single - 0.2 pt")
    ax.set_xlabel("mean MACs per image (millions, log)")
    ax.set_ylabel("MNIST test accuracy (%)")
    ax.set_title("accuracy vs mean MACs (thresholds chosen on validation)")
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[1]
    comparison = results["threshold_search"]["points"]
    for method, style in (("exact", "o-"), ("genetic", "s--"), ("geometric", "^:")):
        ax.plot([p["budget"] / 1e6 for p in comparison], [100 * p[method]["val_accuracy"] for p in comparison], style,
                label=f"{method} (validation)")
        ax.plot([p["budget"] / 1e6 for p in comparison], [100 * p[method]["test_accuracy"] for p in comparison],
                style, alpha=0.4, label=f"{method} (test)")
    ax.set_xlabel("budget: mean MACs per image (millions, log)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"threshold search at a budget ({results['threshold_search']['variant']} reuse)")
    ax.legend(fontsize=8, loc="lower right")
    ax = axes[2]
    labels, macs, speed = [], [], []
    for entry in results["wall_clock"]:
        labels.append(f"{entry['variant']}\nb{entry['batch_size']} t{entry['threads']}")
        macs.append(entry["mac_ratio"])
        speed.append(entry["speedup_median"])
    x = np.arange(len(labels))
    ax.bar(x - 0.2, macs, 0.4, label="MAC reduction (x)")
    ax.bar(x + 0.2, speed, 0.4, label="wall-clock speed-up (x, median)")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("vs full-token single model")
    ax.set_title("measured speed-up vs MAC ratio (CPU)")
    ax.legend(fontsize=8)
    figure.tight_layout()
    with atomic_file(path) as handle:
        figure.savefig(handle, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/frugalvit-dvt-bench"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=30000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing-threads", default="1,2")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--variants", default="none,both,feature,relation")
    parser.add_argument("--budgets", type=int, default=16, help="points on each accuracy-vs-MACs curve")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "dvt.json")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from an existing --out JSON")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist")
    train_config = TrainConfig(epochs=args.epochs, batch_size=128, lr=args.lr, max_train_samples=args.train_samples)
    names = args.variants.split(",")
    models = train_variants(args.work_dir, train_config, data, names)
    if args.train_only:
        return
    results: dict = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": args.threads},
        "config": {"model": BASE.to_dict(), "grids": [f"{g}x{g}" for g in BASE.grids],
                   "train": {"epochs": args.epochs, "train_samples": args.train_samples, "batch_size": 128,
                             "lr": args.lr}},
        "variants": {}, "single_models": [], "wall_clock": [],
    }
    stats = {}
    for name in names:
        cascade = models[name]
        costs = cascade.stage_macs()
        start = time.perf_counter()
        cache = args.work_dir / name / "stats.npz"
        if cache.is_file():
            saved = np.load(cache)
            val = (saved["val_confidence"], saved["val_correct"])
            test = (saved["test_confidence"], saved["test_correct"])
        else:
            val, test = stage_stats(cascade, data.val), stage_stats(cascade, data.test)
            with atomic_file(cache) as handle:
                np.savez(handle, val_confidence=val[0], val_correct=val[1], test_confidence=test[0],
                         test_correct=test[1])
        stats[name] = (costs, val, test)
        print(f"[{name}] stage MACs {costs}; per-stage test accuracy {test[1].mean(1).round(4).tolist()} "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
        budgets = np.geomspace(costs[0] * 1.02, costs[-1], args.budgets)
        curve = []
        for budget in budgets:
            found = search_thresholds(*val, costs, budget)
            on_test = evaluate_thresholds(*test, costs, found.thresholds)
            curve.append({"budget": float(budget), "thresholds": list(found.thresholds),
                          "val_accuracy": found.accuracy, "val_mean_macs": found.mean_macs,
                          "test_accuracy": on_test.accuracy, "test_mean_macs": on_test.mean_macs,
                          "test_exit_fractions": list(on_test.exit_fractions)})
        results["variants"][name] = {"stage_macs": list(costs),
                                     "stage_test_accuracy": test[1].mean(1).tolist(),
                                     "stage_val_accuracy": val[1].mean(1).tolist(), "curve": curve}

    # single models: the no-reuse stages (trained exactly as alone), each run as a plain timm ViT
    singles = models["none"].stages
    for index, stage in enumerate(singles):
        with torch.no_grad(), CostCounter() as cost:
            stage(data.test.images[:1])
        grid = BASE.grids[index]
        results["single_models"].append({"grid": f"{grid}x{grid}", "macs": cost.macs,
                                         "val_accuracy": float(stats["none"][1][1][index].mean()),
                                         "test_accuracy": float(stats["none"][2][1][index].mean())})
    full = results["single_models"][-1]
    full_model = singles[-1]

    # operating points: the smallest budget whose *validation* accuracy reaches a single model's - 0.1 pt,
    # for the full-token single model (the target) and for the most accurate single model
    best = max(results["single_models"], key=lambda single: single["val_accuracy"])
    for name in names:
        costs, val, test = stats[name]
        points = {}
        for label, reference in (("full_token_single", full), ("best_single", best)):
            budget = budget_for_accuracy(val, costs, reference["val_accuracy"] - 0.001,
                                         results["variants"][name]["curve"])
            entry: dict = {"reference": reference["grid"], "val_target": reference["val_accuracy"] - 0.001,
                           "budget": budget}
            if budget is not None:
                found = search_thresholds(*val, costs, budget)
                real = real_run(models[name], data.test, found.thresholds)
                simulated = evaluate_thresholds(*test, costs, found.thresholds)
                entry.update({"thresholds": list(found.thresholds), "val_accuracy": found.accuracy,
                              "val_mean_macs": found.mean_macs, "test_real": real,
                              "test_simulated_accuracy": simulated.accuracy,
                              "mac_reduction_vs_full_single": full["macs"] / real["mean_macs"],
                              "mac_reduction_vs_reference": reference["macs"] / real["mean_macs"],
                              "test_accuracy_gap_points": 100 * (real["accuracy"] - reference["test_accuracy"]),
                              "meets_accuracy_target": real["accuracy"] >= reference["test_accuracy"] - 0.002})
            points[label] = entry
            print(f"[{name}] operating point at {label}: "
                  f"{json.dumps({k: v for k, v in entry.items() if k != 'thresholds'})}", flush=True)
        results["variants"][name]["operating_points"] = points

    # threshold searches compared (validation = in-sample, test = held out)
    main_variant = "both" if "both" in names else names[0]
    costs, val, test = stats[main_variant]
    results["threshold_search"] = {
        "variant": main_variant,
        **search_comparison(costs, val, test, np.geomspace(costs[0] * 1.05, costs[-1] * 0.6, 10))}
    print(f"[search] {json.dumps({k: v for k, v in results['threshold_search'].items() if k != 'points'})}",
          flush=True)

    # training-free: the full-token single model at 12 / 20 / 28 px (3x3 / 5x5 / 7x7 tokens)
    from frugalvit.dvt import ResolutionCascade

    resolution = ResolutionCascade(full_model, [12, 20, 28]).eval()
    costs = resolution.stage_macs()
    val, test = stage_stats(resolution, data.val), stage_stats(resolution, data.test)
    curve = []
    for budget in np.geomspace(costs[0] * 1.02, costs[-1], args.budgets):
        found = search_thresholds(*val, costs, budget)
        on_test = evaluate_thresholds(*test, costs, found.thresholds)
        curve.append({"budget": float(budget), "thresholds": list(found.thresholds), "val_accuracy": found.accuracy,
                      "test_accuracy": on_test.accuracy, "test_mean_macs": on_test.mean_macs})
        if on_test.accuracy >= full["test_accuracy"] - 0.002:
            break
    results["resolution_cascade"] = {"resolutions": [12, 20, 28], "stage_macs": list(costs),
                                     "stage_test_accuracy": test[1].mean(1).tolist(), "curve": curve}
    print(f"[resolution] stage MACs {costs}, stage test accuracy {test[1].mean(1).round(4).tolist()}", flush=True)

    # wall clock at the operating points
    for threads in [int(t) for t in args.timing_threads.split(",")]:
        torch.set_num_threads(threads)
        for name in names:
            points = results["variants"][name]["operating_points"]
            point = points["best_single"] if points["best_single"].get("thresholds") else points["full_token_single"]
            if point.get("thresholds") is None:
                continue
            for batch_size, count in ((1, 200), (64, 2048)):
                entry = timing(models[name], full_model, data.test, point["thresholds"], batch_size, count,
                               args.repeats)
                entry.update({"variant": name, "threads": threads, "operating_point": point["reference"]})
                results["wall_clock"].append(entry)
                print(f"[time] {name} threads={threads} batch={batch_size}: speed-up "
                      f"{entry['speedup_median']:.2f}x vs MAC ratio {entry['mac_ratio']:.2f}x "
                      f"({entry['speedup_over_mac_ratio']:.0%})", flush=True)
    torch.set_num_threads(args.threads)

    write_json_atomically(results, args.out, indent=1)
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def search_comparison(costs: Sequence[int], val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                      budgets: Sequence[float], tolerance: float = 0.0) -> dict:
    """Exact search vs the genetic algorithm vs the geometric rule at each budget (validation = in-sample,
    test = held out); `val`/`test` are (confidence, correct) arrays (K, N). Also used by dvt_real.py.

    `tolerance`: how far below the others' validation accuracy the exact search may fall and still count
    as at least as good (float rounding).
    """
    points, seconds = [], {"exact": 0.0, "genetic": 0.0, "geometric": 0.0}
    for budget in budgets:
        point: dict = {"budget": float(budget)}
        for method, search in (("exact", search_thresholds), ("genetic", genetic_search),
                               ("geometric", geometric_search)):
            found, milliseconds = timed(search, *val, costs, budget)
            seconds[method] += milliseconds / 1e3
            on_test = evaluate_thresholds(*test, costs, found.thresholds)
            point[method] = {"thresholds": list(found.thresholds), "val_accuracy": found.accuracy,
                             "val_mean_macs": found.mean_macs, "test_accuracy": on_test.accuracy,
                             "test_mean_macs": on_test.mean_macs}
        points.append(point)

    def record(other: str) -> list[int]:
        wins = sum(p["exact"]["test_accuracy"] > p[other]["test_accuracy"] for p in points)
        ties = sum(p["exact"]["test_accuracy"] == p[other]["test_accuracy"] for p in points)
        return [wins, ties, len(points) - wins - ties]

    return {"points": points, "seconds_total": seconds,
            "exact_ge_genetic_on_val": all(p["exact"]["val_accuracy"] >= p["genetic"]["val_accuracy"] - tolerance
                                           for p in points),
            "exact_ge_geometric_on_val": all(p["exact"]["val_accuracy"] >= p["geometric"]["val_accuracy"] - tolerance
                                             for p in points),
            "test_wins_ties_losses_vs_genetic": record("genetic"),
            "test_wins_ties_losses_vs_geometric": record("geometric")}


if __name__ == "__main__":
    main()
