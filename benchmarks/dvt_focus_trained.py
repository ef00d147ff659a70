"""Glance and focus trained from scratch on the scaled-digits task, against the 7x7-token single model trained
with the same data, epochs and settings.

The trained DVT cascades of `dvt_real.py` (3x3 / 5x5 / 7x7 tokens over the
whole 112 px canvas) cannot save 2x on this task: the 3x3 stage matches the
7x7 model only on large digits, about a quarter of the images (docs/dvt.md).
Here the second look does not add tokens everywhere; it puts the same few
tokens on the digit:

* glance: a 3x3-token ViT (`dvt_stage`, conv stem, 96 wide, depth 4) on the
  whole canvas at 48 px, with a `BoxLocator` on its tokens (the digit's
  centre and size, regressed from the task's recorded boxes, trained jointly
  with the classifier);
* focus: a second 3x3-token ViT on a crop of 1.2x the located size around the
  located centre (sides quantised, `crop_boxes`), at 48 px: a 10 px digit is
  magnified, a large one shrunk, every digit fills the grid; it trains on the
  crops the trained glance makes of the training split (with a small jitter);
* optionally the 7x7 single model (the whole canvas at 112 px) as a last resort.

A control (`--phases full_box`): the 7x7 model trained with the same box loss
as the glance (its own `BoxLocator` on its 49 patch tokens): does the box
supervision alone make the single model better? Where trained, the more
accurate 7x7 model on validation is the reference.

Reference: the 7x7 single model (the most accurate single model of the
trained DVT run), trained here with the same epochs, batch, learning rate and
data, from the same seed. Thresholds from validation (exact search),
evaluated on test; the operating point runs the real early-exit
`GlanceFocusCascade` (MACs counted by CostCounter); wall clock at batch 1 and
64 against the dense 7x7 model in the same run, interleaved.

    python benchmarks/dvt_focus_trained.py --work-dir W --phases glance,focus,full   # train (GPU: --device cuda)
    python benchmarks/dvt_focus_trained.py --work-dir W --data D --phases evaluate   # evaluate and time here

Training on a GPU host without PyAV: `benchmarks/dvt_focus_trained_gpu.sh`
(96,000 training images made there from a sources file, as for dvt_real.py).
Models and settings land in W/focus_trained/{glance,focus,full}/; training
checkpoints every epoch and resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from frugalvit.cost import CostCounter
from frugalvit.data import Split
from frugalvit.dvt import BoxLocator, GlanceFocusCascade, dvt_stage, resize_images
from frugalvit.dvt.glance_training import box_classification_loss, focus_training_crops
from frugalvit.tasks import ScaledDigitsConfig, build_scaled_digits, load_split_arrays, to_float
from frugalvit.timing import timed
from frugalvit.training import TrainConfig, save_atomically, train

import dvt_real as R  # the sibling benchmarks (this directory is on sys.path)
from dvt_focus import digit_centers

RESULTS = Path(__file__).parent / "results"
CANVAS, LOOK = 112, 48
ARCH = dict(patch_size=16, in_chans=3, num_classes=10, embed_dim=96, depth=4, num_heads=3, conv_stem=(16, 32, 64))
CROP_SIDES = (24, 32, 40, 48, 56, 64, 80, 96, 112)
MARGIN = 1.2
BOX_WEIGHT = 5.0
JITTER = (0.05, 0.1)  # training crops: centre moved by N(0, 0.05 x side), side scaled by exp(N(0, 0.1))


def build_models(seed: int) -> dict[str, nn.Module]:
    """The untrained glance (+ locator), focus, 7x7 full model and the 7x7 model with a box loss (a control:
    does the box supervision alone make a single model better?), drawn from `seed` in a fixed order."""
    torch.manual_seed(seed)
    glance = dvt_stage(LOOK, **ARCH)
    locator = BoxLocator(ARCH["embed_dim"], (LOOK // ARCH["patch_size"]) ** 2)
    focus = dvt_stage(LOOK, **ARCH)
    full = dvt_stage(CANVAS, **ARCH)
    full_box = nn.ModuleDict({"vit": dvt_stage(CANVAS, **ARCH),  # a control: the 7x7 model with the same box
                              "locator": BoxLocator(ARCH["embed_dim"], (CANVAS // ARCH["patch_size"]) ** 2)})
    return {"glance": nn.ModuleDict({"vit": glance, "locator": locator}), "focus": focus, "full": full,
            "full_box": full_box}


def cascade_of(models: dict[str, nn.Module], last_resort: bool) -> GlanceFocusCascade:
    glance = models["glance"]
    return GlanceFocusCascade(glance["vit"], glance["locator"], models["focus"], CANVAS, CROP_SIDES, MARGIN,
                              later=(models["full"],) if last_resort else ()).eval()


def box_loss(model: nn.Module, images: Tensor, rows: Tensor, table: Tensor, size: int) -> Tensor:
    """Cross-entropy of a ViT seeing the canvas at `size` px + BOX_WEIGHT x its locator's L1 box error
    (the library's `box_classification_loss`, as `frugalvit dvt train --kind glance-focus` trains); `rows`
    index `table` (N, 4): label, top, left, side (pixels of the canvas) of each training image."""
    return box_classification_loss(model["vit"], model["locator"], images, table[rows], CANVAS, size, BOX_WEIGHT)


def full_loss(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(model(images), labels)


def train_phase(name: str, model: nn.Module, data: Split, config: TrainConfig, run: Path, device: torch.device,
                amp: torch.dtype | None, loss_fn, time_budget: float | None = None) -> nn.Module:
    """Train `model` (or load run/model.pt); with `time_budget` seconds, at most as many epochs as a timed probe
    says fit; settings and seconds in run/train.json."""
    final = run / "model.pt"
    if final.is_file():
        model.load_state_dict(torch.load(final, map_location="cpu"))
        return model.eval()
    run.mkdir(parents=True, exist_ok=True)
    model.to(device)
    if time_budget is not None:
        seconds = R.probe_epoch_seconds(model, data, config, amp, loss_fn=loss_fn)
        epochs = max(1, min(config.epochs, int(time_budget / seconds)))
        print(f"[{name}] {seconds:.1f} s per epoch measured: {epochs} of {config.epochs} epochs fit "
              f"{time_budget:.0f} s", flush=True)
        config = replace(config, epochs=epochs)
    start = time.perf_counter()
    train(model, data, config, run, progress=True, amp_dtype=amp, loss_fn=loss_fn)
    seconds = time.perf_counter() - start
    save_atomically({key: value.cpu() for key, value in model.state_dict().items()}, final)
    for stale in run.parent.glob("stats-*.npz"):  # statistics of the models before this one
        stale.unlink()
    R.write_json({"epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr, "seed": config.seed,
                  "train_samples": len(data), "device": str(device), "device_name": R.device_name(device),
                  "amp": str(amp).removeprefix("torch.") if amp else None, "torch": torch.__version__,
                  "train_seconds": seconds}, run / "train.json")
    print(f"[{name}] trained in {seconds:.0f} s ({config.epochs} epochs)", flush=True)
    return model.cpu().eval()


def train_models(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    arrays = load_split_arrays(args.data, "train")
    count = min(len(arrays["labels"]), args.train_samples or len(arrays["labels"]))
    images = torch.from_numpy(arrays["images"][:count]).to(device)  # on the device: no host copy per step
    labels = torch.from_numpy(arrays["labels"][:count]).to(device)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    models = build_models(args.seed)
    root = args.work_dir / "focus_trained"
    phases = args.phases.split(",")
    table = torch.stack([labels, *(torch.from_numpy(arrays[key][:count]).to(device)
                                   for key in ("top", "left", "size"))], dim=1)
    rows = torch.arange(count, device=device)  # the "labels" the training loop hands on: rows of the table
    if "glance" in phases or "focus" in phases:
        models["glance"] = train_phase("glance", models["glance"], Split(images, rows), config, root / "glance",
                                       device, amp, partial(box_loss, table=table, size=LOOK), args.time_budget)
    if "focus" in phases:
        cascade = cascade_of(models, last_resort=False).to(device)
        start = time.perf_counter()
        crops = focus_training_crops(cascade, images, JITTER, args.seed + 1)  # as the library's training draws
        print(f"[focus] {len(crops)} training crops in {time.perf_counter() - start:.0f} s", flush=True)
        train_phase("focus", models["focus"], Split(crops, labels), config, root / "focus", device, amp, full_loss,
                    args.time_budget)
    if "full" in phases:
        train_phase("full", models["full"], Split(images, labels), config, root / "full", device, amp, full_loss,
                    args.time_budget)
    if "full_box" in phases:
        train_phase("full_box", models["full_box"], Split(images, rows), config, root / "full_box", device, amp,
                    partial(box_loss, table=table, size=CANVAS), args.time_budget)


# -- evaluation (here, on the CPU) ------------------------------------------------------------------------

def load_models(root: Path, seed: int) -> dict[str, nn.Module]:
    """The trained models; the full_box control only where it was trained."""
    models = build_models(seed)
    if not (root / "full_box" / "model.pt").is_file():
        del models["full_box"]
    for name, model in models.items():
        path = root / name / "model.pt"
        if not path.is_file():
            raise SystemExit(f"no trained {name} model at {path}: train it first (--phases {name}) or unpack the "
                             "GPU run's archive into the work dir")
        model.load_state_dict(torch.load(path, map_location="cpu"))
        model.eval()
    return models


def macs_of(function, *inputs: Tensor) -> int:
    with torch.no_grad(), CostCounter() as cost:
        function(*inputs)
    return cost.macs


def recorded_boxes(meta: dict[str, np.ndarray], device: torch.device) -> tuple[Tensor, Tensor]:
    """The task's recorded digit boxes as centres (N, 2), (y, x), and sides (N,), in canvas pixels."""
    count = len(meta["size"])
    return digit_centers(meta, count).to(device), torch.from_numpy(meta["size"]).float().to(device)


@torch.no_grad()
def locator_report(cascade: GlanceFocusCascade, images: Tensor, meta: dict[str, np.ndarray]) -> dict:
    """How well the glance locates the digits: centre error and size ratio against the recorded boxes."""
    centers, sides = [], []
    for start in range(0, images.shape[0], 250):
        found = cascade.locate(cascade.glance_tokens(cascade.prepare_input(images[start:start + 250])))
        centers.append(found[0]), sides.append(found[1])
    truth, size = recorded_boxes(meta, torch.device("cpu"))
    error = (torch.cat(centers).cpu() - truth).norm(dim=1)
    ratio = torch.cat(sides).cpu() / size
    relative = error / size
    return {"centre_error_px": {"median": float(error.median()), "p90": float(error.quantile(0.9))},
            "centre_error_over_side": {"median": float(relative.median()), "p90": float(relative.quantile(0.9))},
            "side_ratio": {"median": float(ratio.median()), "p10": float(ratio.quantile(0.1)),
                           "p90": float(ratio.quantile(0.9))}}


@torch.no_grad()
def oracle_focus_accuracy(cascade: GlanceFocusCascade, split: Split, meta: dict[str, np.ndarray]) -> float:
    """The focus on crops at the recorded boxes (what a perfect locator would give; a diagnostic)."""
    centers, size = recorded_boxes(meta, split.images.device)
    correct = 0
    for start in range(0, len(split), 250):
        batch = cascade.prepare_input(split.images[start:start + 250])
        logits = cascade.focus(cascade.focus_input(batch, centers[start:start + 250], size[start:start + 250]))
        correct += int((logits.argmax(-1) == split.labels[start:start + 250]).sum())
    return correct / len(split)


def evaluate(args: argparse.Namespace) -> dict:
    root = args.work_dir / "focus_trained"
    device = torch.device(args.eval_device)
    models = {name: model.to(device) for name, model in load_models(root, args.seed).items()}
    arrays = {split: load_split_arrays(args.data, split) for split in ("val", "test")}
    splits = {split: Split(torch.from_numpy(a["images"]).to(device), torch.from_numpy(a["labels"]).to(device))
              for split, a in arrays.items()}
    full = models["full"]

    def dense(images: Tensor) -> Tensor:
        return full(to_float(images))  # uint8 -> float in [0, 1], the canvas as it is (112 px)

    full_macs = macs_of(full, torch.zeros(1, 3, CANVAS, CANVAS, device=device))
    three = cascade_of(models, last_resort=True)
    two = cascade_of(models, last_resort=False)
    val, test = R.cached_stats(root / f"stats-{device.type}.npz",  # removed whenever a model is retrained
                               lambda: (R.cascade_stats(three, splits["val"]), R.cascade_stats(three, splits["test"])))
    costs3 = three.stage_macs()
    costs2 = costs3[:2]  # the same glance and focus (tested: a cascade's costs do not depend on later stages)
    trained = {name: json.loads((root / name / "train.json").read_text()) for name in models}
    plain = {"name": "single 7x7 (112 px)", "macs": full_macs, "val_accuracy": float(val[1][2].mean()),
             "test_accuracy": float(test[1][2].mean())}
    singles = [{"name": "glance alone (3x3, 48 px)", "macs": costs3[0], "val_accuracy": float(val[1][0].mean()),
                "test_accuracy": float(test[1][0].mean())}, plain]
    if "full_box" in models:  # the control: same model, trained with the glance's box loss too
        vit = models["full_box"]["vit"]
        with torch.no_grad():  # counted exactly (a float32 mean would move the validation target)
            accuracy = {split: sum(int((vit(to_float(splits[split].images[i:i + 250])).argmax(-1)
                                        == splits[split].labels[i:i + 250]).sum())
                                   for i in range(0, len(splits[split]), 250)) / len(splits[split])
                        for split in ("val", "test")}
        singles.append({"name": "single 7x7 + box loss (112 px)",
                        "macs": macs_of(vit, torch.zeros(1, 3, CANVAS, CANVAS, device=device)),
                        "val_accuracy": accuracy["val"], "test_accuracy": accuracy["test"]})
    reference = max(singles[1:], key=lambda single: single["val_accuracy"])  # the most accurate 7x7 model
    out: dict = {"config": {"architecture": ARCH, "canvas": CANVAS, "look": LOOK, "crop_sides": CROP_SIDES,
                            "margin": MARGIN, "box_weight": BOX_WEIGHT, "jitter": JITTER, "train": trained},
                 "stage_macs": {"glance": costs3[0], "focus": costs3[1] - costs3[0], "full": full_macs},
                 "single_models": singles,
                 "stage_test_accuracy": {"glance": float(test[1][0].mean()), "focus": float(test[1][1].mean()),
                                         "full": float(test[1][2].mean())},
                 "focus_at_recorded_boxes_test_accuracy": oracle_focus_accuracy(two, splits["test"], arrays["test"]),
                 "locator_test": locator_report(two, splits["test"].images, arrays["test"]),
                 "test_accuracy_by_digit_size": R.accuracy_by_size(test[1], arrays["test"]["size"]),
                 "cascades": {}, "wall_clock": []}
    print(json.dumps({k: out[k] for k in ("stage_macs", "stage_test_accuracy", "focus_at_recorded_boxes_test_accuracy",
                                          "locator_test")}), flush=True)
    both_looks = {"test_accuracy": float(test[1][1].mean()), "mean_macs": costs3[1],
                  "mac_reduction_vs_reference": full_macs / costs3[1]}
    for name, cascade, costs, (v, t) in (
            ("glance -> focus", two, costs2, ((val[0][:2], val[1][:2]), (test[0][:2], test[1][:2]))),
            ("glance -> focus -> 7x7", three, costs3, (val, test))):
        entry = {"stage_macs": list(costs), "curve": R.curve(costs, v, t, args.budgets),
                 "operating_point": R.operating_point(name, cascade, costs, v, t, reference, splits["test"])}
        for ratio in (2.0, 2.5, 3.0):  # thresholds from validation for a budget of 1/ratio of the 7x7 model
            found = R.search_thresholds(*v, costs, full_macs / ratio)
            on_test = R.evaluate_thresholds(*t, costs, found.thresholds)
            entry[f"budget_{ratio:g}x"] = {"thresholds": list(found.thresholds), "val_accuracy": found.accuracy,
                                           "test_accuracy": on_test.accuracy, "test_mean_macs": on_test.mean_macs,
                                           "mac_reduction_vs_reference": full_macs / on_test.mean_macs,
                                           "test_exit_fractions": list(on_test.exit_fractions)}
        out["cascades"][name] = entry
    out["cascades"]["glance -> focus"]["both_looks_always"] = both_looks
    out["threshold_search"] = {"cascade": "glance -> focus -> 7x7", **R.search_comparison(
        costs3, val, test, np.geomspace(costs3[0] * 1.05, costs3[-1] * 0.6, 10), tolerance=1e-12)}
    for name in out["cascades"]:
        cascade = two if name == "glance -> focus" else three
        point = out["cascades"][name]["operating_point"]
        thresholds, where = point.get("thresholds"), "operating point"
        if thresholds is None:
            thresholds, where = out["cascades"][name]["budget_2x"]["thresholds"], "budget 2x"
        for batch_size, count in ((1, args.batch1_images), (64, args.batch64_images)):
            entry = R.wall_clock(cascade, dense, full_macs, splits["test"].images, thresholds, batch_size, count,
                                 args.repeats)
            entry.update({"cascade": name, "point": where, "thresholds": thresholds})
            out["wall_clock"].append(entry)
            R.print_wall_clock(f"time {name}", entry)
    early_exit = [entry for entry in out["wall_clock"] if entry["cascade"] == "glance -> focus"]  # eager
    thresholds = early_exit[0]["thresholds"]  # the two-look cascade's timed point
    out["time_breakdown"] = time_breakdown(two, dense, splits["test"].images[:args.batch64_images], thresholds,
                                           args.repeats)
    print(f"[time breakdown, ms per {args.batch64_images} images] {json.dumps(out['time_breakdown']['ms'])}",
          flush=True)
    if args.every_stage:
        out["wall_clock"] += every_stage_wall_clock(two, dense, full_macs, splits["test"].images, args, thresholds)
    if args.compile:
        out["wall_clock"] += compiled_wall_clock(models, dense, full_macs, splits["test"].images, args, thresholds,
                                                 early_exit)
    return out


@torch.no_grad()
def time_breakdown(cascade: GlanceFocusCascade, dense: Callable[[Tensor], Tensor], images: Tensor,
                   thresholds: list[float], repeats: int, batch_size: int = 64) -> dict:
    """Where the two-look cascade's time goes at batch 64: each piece of its early-exit forward timed on its
    own inputs (made once beforehand), batch by batch in turn with the dense model and the whole cascade,
    so that the machine's drift reaches every piece alike; milliseconds per pass over `images`, median over
    `repeats` passes."""
    cascade.set_thresholds(thresholds)

    def regroup(logits: Tensor, batch: Tensor, centers: Tensor, sides: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The images, centres and sides of the samples the glance does not answer (as early exit keeps them)."""
        rows = (~cascade.exits(logits, thresholds[0])).nonzero().squeeze(1)
        return batch.index_select(0, rows), centers.index_select(0, rows), sides.index_select(0, rows)

    prepared = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        small = resize_images(batch, (LOOK, LOOK), dtype=cascade._dtype())
        tokens = cascade.glance.forward_features(small)
        logits = cascade.glance.forward_head(tokens)
        centers, sides = cascade.locate(tokens)
        kept = regroup(logits, batch, centers, sides)
        prepared.append((batch, small, tokens, logits, centers, sides, kept, cascade.focus_input(*kept)))

    pieces: dict[str, Callable[[tuple], object]] = {
        "dense model": lambda p: dense(p[0]),
        "cascade (all of it)": lambda p: cascade(p[0]),
        "glance: resize to its input": lambda p: resize_images(p[0], (LOOK, LOOK), dtype=cascade._dtype()),
        "glance: features": lambda p: cascade.glance.forward_features(p[1]),
        "glance: head and locator": lambda p: (cascade.glance.forward_head(p[2]), cascade.locate(p[2])),
        "exit decision and regrouping": lambda p: regroup(p[3], p[0], p[4], p[5]),
        "focus: crops": lambda p: cascade.focus_input(*p[6]),
        "focus: model": lambda p: cascade.focus(p[7]),
    }
    passes: dict[str, list[float]] = {name: [] for name in pieces}
    for repeat in range(repeats + 1):  # the first pass warms up
        totals = dict.fromkeys(pieces, 0.0)
        for index, batch in enumerate(prepared):
            order = list(pieces) if index % 2 == 0 else list(reversed(pieces))
            for name in order:
                totals[name] += timed(pieces[name], batch, device=batch[0].device)[1]
        if repeat:
            for name, total in totals.items():
                passes[name].append(total)
    ms = {name: statistics.median(values) for name, values in passes.items()}
    pieces_sum = sum(value for name, value in ms.items() if name not in ("dense model", "cascade (all of it)"))
    return {"batch_size": batch_size, "images": int(images.shape[0]), "repeats": repeats,
            "threads": torch.get_num_threads(), "ms": ms, "pieces_sum_ms": pieces_sum,
            "models_only_speedup": ms["dense model"] / (ms["glance: features"] + ms["glance: head and locator"]
                                                        + ms["focus: model"]),
            "speedup": ms["dense model"] / ms["cascade (all of it)"]}


class EveryStage:
    """A cascade called through `forward_every_stage` (both looks for every image, no decision read on the host),
    with the interface `dvt_real.wall_clock` times: `set_thresholds` and a call per batch."""

    def __init__(self, cascade: GlanceFocusCascade, compiled: bool = False) -> None:
        self.cascade, self.limits = cascade, None
        self.run = torch.compile(cascade.forward_every_stage) if compiled else cascade.forward_every_stage

    def set_thresholds(self, thresholds: list[float]) -> None:
        self.cascade.set_thresholds(thresholds)
        self.limits = tuple(float(t) for t in thresholds)

    def __call__(self, images: Tensor):  # noqa: ANN204 - a CascadeOutput
        return self.run(images, self.limits)


def every_stage_wall_clock(cascade: GlanceFocusCascade, dense: Callable[[Tensor], Tensor], full_macs: float,
                           images: Tensor, args: argparse.Namespace, thresholds: list[float]) -> list[dict]:
    """The two-look cascade as `forward_every_stage` (the same answers as early exit, both looks always, no
    host round trip: the form for launch-bound devices) against the 7x7 model, timed as the early-exit rows;
    its MACs counted (every stage for every image)."""
    entries = []
    for batch_size, count in ((1, args.batch1_images), (64, args.batch64_images)):
        entry = R.wall_clock(EveryStage(cascade), dense, full_macs, images, thresholds, batch_size, count,
                             args.repeats)
        entry.update({"cascade": "glance -> focus", "point": "operating point", "thresholds": thresholds,
                      "form": "every stage (forward_every_stage)"})
        entries.append(entry)
        R.print_wall_clock("time glance -> focus, every stage", entry)
    return entries


def compiled_wall_clock(models: dict[str, nn.Module], dense: Callable[[Tensor], Tensor], full_macs: float,
                        images: Tensor, args: argparse.Namespace, thresholds: list[float],
                        eager: list[dict]) -> list[dict]:
    """The two-look cascade against the 7x7 model with both compiled (`torch.compile`: the dense model whole,
    the glance's feature pass and the focus model; the resizes, crops and exit decisions stay eager), timed as
    the eager pair, the same images and thresholds. The MACs are the eager run's (`eager`: its entries; the
    counter does not see into compiled graphs). Compiling copies of the models leaves the eager ones as they
    were. The first batches compile (tens of seconds) before timing starts."""
    def copies() -> tuple[nn.Module, nn.Module]:
        return copy.deepcopy(models["glance"]["vit"]), copy.deepcopy(models["focus"])

    def warm_up(function: Callable[[Tensor], object], batch_size: int, count: int) -> None:
        """Compile for this batch size (and the focus's batch sizes met), outside the clock."""
        with torch.no_grad():
            for start in range(0, min(count, 4 * batch_size), batch_size):
                function(images[start:start + batch_size])

    glance, focus = copies()
    glance.forward_features = torch.compile(glance.forward_features, dynamic=False)
    focus.forward = torch.compile(focus.forward, dynamic=True)  # its batch: the images the glance kept
    cascade = GlanceFocusCascade(glance, models["glance"]["locator"], focus, CANVAS, CROP_SIDES, MARGIN).eval()
    compiled_dense = torch.compile(dense)
    every = None
    if args.every_stage:  # forward_every_stage compiled whole (one graph where the crops are sync-free)
        plain_glance, plain_focus = copies()
        whole = GlanceFocusCascade(plain_glance, models["glance"]["locator"], plain_focus, CANVAS, CROP_SIDES,
                                   MARGIN).eval()
        every, every_macs = EveryStage(whole, compiled=True), float(whole.stage_macs()[-1])
        every.set_thresholds(thresholds)
    entries = []
    for entry in eager:
        batch_size, count = entry["batch_size"], entry["images"]
        warm_up(compiled_dense, batch_size, count)
        warm_up(cascade, batch_size, count)
        timing = R.wall_clock(cascade, compiled_dense, full_macs, images, thresholds, batch_size, count,
                              args.repeats, cascade_macs=entry["cascade_mean_macs"])
        timing.update({"cascade": "glance -> focus", "point": entry["point"], "thresholds": thresholds,
                       "compiled": "both sides (torch.compile)"})
        entries.append(timing)
        R.print_wall_clock("time glance -> focus, both compiled", timing)
        if every is not None:
            warm_up(every, batch_size, count)
            timing = R.wall_clock(every, compiled_dense, full_macs, images, thresholds, batch_size, count,
                                  args.repeats, cascade_macs=every_macs)
            timing.update({"cascade": "glance -> focus", "point": entry["point"], "thresholds": thresholds,
                           "form": "every stage (forward_every_stage)", "compiled": "both sides (torch.compile)"})
            entries.append(timing)
            R.print_wall_clock("time glance -> focus, every stage, both compiled", timing)
    return entries


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, entry in results["cascades"].items():
        points = entry["curve"]
        ax.plot([p["test_mean_macs"] / 1e6 for p in points], [100 * p["test_accuracy"] for p in points], "-o",
                ms=3, label=f"{name} (thresholds from validation)")
        point = entry["operating_point"]
        if "test_simulated_mean_macs" in point:
            ax.plot(point["test_simulated_mean_macs"] / 1e6, 100 * point["test_simulated_accuracy"], "*", ms=12,
                    color=ax.lines[-1].get_color())
    for single in results["single_models"]:
        ax.plot(single["macs"] / 1e6, 100 * single["test_accuracy"], "ks", ms=6)
        ax.annotate(single["name"], (single["macs"] / 1e6, 100 * single["test_accuracy"]), fontsize=8,
                    xytext=(4, -10), textcoords="offset points")
    ax.set_xlabel("mean MACs per image (M, counted)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Scaled digits: trained glance and focus vs the 7x7 single model (stars: validation-matched)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/frugalvit-dvt-real"))
    parser.add_argument("--data", type=Path, default=None, help="the task's data directory (default WORK/data)")
    parser.add_argument("--phases", default="glance,focus,full,evaluate",
                        help="any of glance, focus, full, full_box (training; full_box: the 7x7 model with the "
                             "box loss too, a control), evaluate")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds per trained model: at most as many epochs as a timed probe says fit")
    parser.add_argument("--train-samples", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="where to train")
    parser.add_argument("--eval-device", default="cpu", help="where to evaluate and time")
    parser.add_argument("--sources", type=Path, default=None,
                        help="with evaluate: make the validation and test splits under --data from this file "
                             "(dvt_real.py --prepare-sources FILE --source-splits val,test), e.g. on a GPU host")
    parser.add_argument("--workers", type=int, default=1, help="processes making the splits from --sources")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: as dvt_real.py)")
    parser.add_argument("--budgets", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--every-stage", action="store_true",
                        help="with evaluate: also time the two-look cascade as forward_every_stage (both looks "
                             "always, no host round trip; the form for launch-bound devices such as a GPU)")
    parser.add_argument("--compile", action="store_true",
                        help="with evaluate: also time the two-look cascade and the 7x7 model both compiled "
                             "(torch.compile; needs a C++ compiler on the CPU)")
    parser.add_argument("--batch1-images", type=int, default=200)
    parser.add_argument("--batch64-images", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=RESULTS / "dvt_focus_trained.json")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return
    args.data = args.data or args.work_dir / "data"
    phases = args.phases.split(",")
    unknown = set(phases) - {"glance", "focus", "full", "full_box", "evaluate"}
    if unknown:
        raise SystemExit(f"--phases: unknown {sorted(unknown)}; choose among glance, focus, full, full_box, evaluate")
    torch.set_num_threads(args.threads)
    if set(phases) & {"glance", "focus", "full", "full_box"}:
        train_models(args)
    if "evaluate" in phases:
        if args.sources is not None:  # a host without PyAV: the held-out splits from a sources file
            build_scaled_digits(args.data, ScaledDigitsConfig(), sources=args.sources, splits=("val", "test"),
                                workers=args.workers, progress=False)
        results = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                               "cpus": os.cpu_count(), "torch": torch.__version__, "threads": args.threads,
                               "eval_device": R.device_name(torch.device(args.eval_device))},
                   "data": str(args.data), **evaluate(args)}
        R.write_json(results, args.out)
        plot(results, args.out.with_suffix(".png"))
        print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
