"""Benchmark: fidelity of eventful inference with weights trained here (not random), on moving real digits.

No pretrained ViT can be downloaded on the project's machines, and with random
weights the pooled features hardly depend on the input, so a cosine near 1
says little. This benchmark trains a small ViT (timm `VisionTransformer`) to
classify real MNIST digits placed anywhere on a larger canvas, then plays
clips in which test digits (never seen in training) drift across the canvas
with sensor noise, a new digit replacing the old every `--segment` frames
(a scene cut). Dense and eventful models see the same frames; the report
gives, per budget and policy, the executed-MAC ratio, the agreement of the
eventful top-1 with the dense top-1, both models' accuracy against the true
labels, the cosine similarity of pooled features and the relative L2 error of
all final tokens.

Scope: this measures how fidelity falls with the budget for a *trained*
model; speed is measured on the timm ViT-S/B in `eventful_video.py` (speed
at a top-r budget does not depend on the weights).

    python benchmarks/eventful_trained.py            # trains (~6 min with 2 threads here) or reuses --work-dir
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from frugalvit import CostCounter, TopFraction, eventful
from frugalvit.data import ImageDataset, Split, load_mnist
from frugalvit.eventful.policies import Threshold, TokenPolicy
from frugalvit.models import small_vit
from frugalvit.reporting import save_figure_atomically, write_json_atomically
from frugalvit.training import TrainConfig, accuracy, save_atomically, train
from frugalvit.video.compare import FrameStep, frame_loop

RESULTS = Path(__file__).parent / "results"
CANVAS = 56
PATCH = 7  # 8 x 8 = 64 tokens: small enough to train well on one CPU core
TOKENS = (CANVAS // PATCH) ** 2
WIDTH, DEPTH, HEADS = 96, 4, 3


def place_digits(digits: Tensor, canvas: int, generator: torch.Generator) -> Tensor:
    """Each 28 x 28 digit pasted at a random position of a blank canvas (N, 1, canvas, canvas)."""
    count, span = digits.shape[0], canvas - digits.shape[-1] + 1
    out = torch.zeros(count, 1, canvas, canvas)
    rows = torch.randint(0, span, (count,), generator=generator)
    cols = torch.randint(0, span, (count,), generator=generator)
    for index in range(count):
        r, c = int(rows[index]), int(cols[index])
        out[index, :, r:r + 28, c:c + 28] = digits[index]
    return out


def drifting_clip(digits: Tensor, labels: Tensor, segment: int, canvas: int, noise: float,
                  generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Frames (T, 1, canvas, canvas) and per-frame labels: each digit drifts ~1 px per frame for `segment` frames."""
    span = canvas - 28
    frames, frame_labels = [], []
    for digit, label in zip(digits, labels):
        start = torch.randint(0, span + 1, (2,), generator=generator).float()
        end = torch.randint(0, span + 1, (2,), generator=generator).float()
        for step in range(segment):
            r, c = (start + (end - start) * step / max(1, segment - 1)).round().long().tolist()
            frame = torch.zeros(1, canvas, canvas)
            frame[:, r:r + 28, c:c + 28] = digit
            frames.append(frame + noise * torch.randn(frame.shape, generator=generator))
            frame_labels.append(int(label))
    return torch.stack(frames), torch.tensor(frame_labels)


def train_model(mnist: ImageDataset, work_dir: Path, epochs: int, samples: int) -> tuple[torch.nn.Module, float]:
    """Train (or reload) the canvas classifier; returns it and its accuracy on placed test digits."""
    torch.manual_seed(0)
    model = small_vit(image_size=CANVAS, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)
    generator = torch.Generator().manual_seed(0)
    weights = work_dir / "model.pt"
    if weights.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu"))
    else:
        placed = Split(place_digits(mnist.train.images[:samples], CANVAS, generator), mnist.train.labels[:samples])
        train(model, placed, TrainConfig(epochs=epochs, batch_size=128, lr=2e-3), run_dir=work_dir)
        save_atomically(model.state_dict(), weights)
    model.eval()
    test = Split(place_digits(mnist.test.images[:2000], CANVAS, torch.Generator().manual_seed(1)),
                 mnist.test.labels[:2000])
    return model, accuracy(model, test)


@dataclass(frozen=True)
class DenseReference:
    """The dense model's final tokens, pooled features and top-1 for every frame of a clip."""

    features: Tensor
    pooled: Tensor
    top1: Tensor


@torch.no_grad()
def dense_reference(model: torch.nn.Module, frames: Tensor) -> DenseReference:
    """One dense batched pass over the clip: what every policy's replay is compared with."""
    features = model.forward_features(frames)
    return DenseReference(features, model.forward_head(features, pre_logits=True),
                          model.forward_head(features).argmax(-1))


@torch.no_grad()
def replay(model: torch.nn.Module, frames: Tensor, labels: Tensor, dense: DenseReference, policy: TokenPolicy,
           segment: int, cut_share: float | None) -> dict[str, float]:
    """Fidelity against `dense` and executed MACs of one policy over a clip; the clip's first frame excluded."""
    ev = eventful(model, policy, cut_share=cut_share)
    macs, features = [], []
    full = 0
    for index, _, _, results in frame_loop(frames, [FrameStep("eventful", ev.forward_features, "macs")]):
        features.append(results["eventful"].output)
        if index > 0:
            macs.append(results["eventful"].macs)
            full += int(ev.last_frame_full)
    tokens = torch.cat(features)
    pooled = model.forward_head(tokens, pre_logits=True)
    top1 = model.forward_head(tokens).argmax(-1)
    token_error = (tokens - dense.features).flatten(1).norm(dim=1) / dense.features.flatten(1).norm(dim=1)
    return {"macs": statistics.fmean(macs),
            "agreement": (top1 == dense.top1)[1:].float().mean().item(),
            "accuracy": (top1 == labels)[1:].float().mean().item(),
            "cosine": F.cosine_similarity(pooled, dense.pooled, dim=-1)[1:].mean().item(),
            "token_relative_l2": token_error[1:].mean().item(),
            "full_recompute_frames": full, "scene_cuts": len(frames) // segment - 1}


def plot(rows: list[dict], path: Path) -> None:
    """Agreement/accuracy and token error vs MAC reduction, one line per policy kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (agree_axis, error_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, marker in (("topfraction", "o"), ("threshold", "s")):
        group = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["mac_ratio"])
        ratios = [r["mac_ratio"] for r in group]
        agree_axis.plot(ratios, [r["agreement"] for r in group], marker=marker, label=f"{kind}: top-1 agreement")
        agree_axis.plot(ratios, [r["accuracy"] for r in group], marker=marker, linestyle=":",
                        label=f"{kind}: accuracy (dense {group[0]['dense_accuracy']:.3f})")
        error_axis.plot(ratios, [r["token_relative_l2"] for r in group], marker=marker, label=f"{kind}: token rel. L2")
        error_axis.plot(ratios, [1 - r["cosine"] for r in group], marker=marker, linestyle=":",
                        label=f"{kind}: 1 - cosine")
    for axis in (agree_axis, error_axis):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("executed-MAC reduction vs dense (x)")
        axis.legend(fontsize=7)
    error_axis.set_yscale("log")
    figure.suptitle(f"Eventful fidelity with trained weights (small ViT, {TOKENS} tokens, drifting MNIST test digits)")
    save_figure_atomically(figure, path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/frugalvit-eventful-trained"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-samples", type=int, default=20000)
    parser.add_argument("--clips", type=int, default=8, help="clips of --digits digits each")
    parser.add_argument("--digits", type=int, default=4)
    parser.add_argument("--segment", type=int, default=24, help="frames per digit (a scene cut after each)")
    parser.add_argument("--noise", type=float, default=0.03, help="sensor noise std per pixel (pixels in [0, 1])")
    parser.add_argument("--cut-share", type=float, default=0.15,
                        help="scene-cut refresh share (a digit covers ~25%% of the canvas; negative: off)")
    parser.add_argument("--fractions", default="0.03125,0.0625,0.125,0.25,0.333,1.0")
    parser.add_argument("--thresholds", default="0.05,0.1,0.2,0.5,1.0,2.0,4.0")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="eventful_trained")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cut_share = args.cut_share if args.cut_share >= 0 else None
    mnist = load_mnist()
    model, test_accuracy = train_model(mnist, args.work_dir, args.epochs, args.train_samples)
    print(f"trained model: accuracy on placed MNIST test digits {test_accuracy:.4f}", flush=True)
    with torch.no_grad(), CostCounter() as cost:
        model.forward_features(torch.zeros(1, 1, CANVAS, CANVAS))
    dense_macs = float(cost.macs)  # the same for every frame
    generator = torch.Generator().manual_seed(2)
    policies: list[tuple[str, float, TokenPolicy]] = [("topfraction", float(f), TopFraction(float(f))) for f in args.fractions.split(",")]
    policies += [("threshold", float(h), Threshold(float(h))) for h in args.thresholds.split(",")]
    per_policy: dict[tuple[str, float], list[dict]] = {(kind, value): [] for kind, value, _ in policies}
    dense_accuracies = []
    for clip in range(args.clips):
        chosen = torch.arange(clip * args.digits, (clip + 1) * args.digits) + 5000  # test digits
        frames, labels = drifting_clip(mnist.test.images[chosen], mnist.test.labels[chosen], args.segment,
                                       CANVAS, args.noise, generator)
        dense = dense_reference(model, frames)
        dense_accuracies.append((dense.top1 == labels)[1:].float().mean().item())
        for kind, value, policy in policies:
            per_policy[(kind, value)].append(replay(model, frames, labels, dense, policy, args.segment, cut_share))
    dense_accuracy = statistics.fmean(dense_accuracies)
    rows = []
    for (kind, value), results in per_policy.items():
        row = {"kind": kind, "value": value, "dense_accuracy": dense_accuracy,
               "mac_ratio": dense_macs / statistics.fmean(r["macs"] for r in results)}
        for key in ("agreement", "accuracy", "cosine", "token_relative_l2"):
            row[key] = statistics.fmean(r[key] for r in results)
        row["full_recompute_frames"] = sum(r["full_recompute_frames"] for r in results)
        row["scene_cuts"] = sum(r["scene_cuts"] for r in results)
        rows.append(row)
        print(f"{kind} {value}: MAC ratio {row['mac_ratio']:.2f}x, top-1 agreement {row['agreement']:.4f}, "
              f"accuracy {row['accuracy']:.4f} (dense {dense_accuracy:.4f}), cosine {row['cosine']:.4f}, "
              f"token L2 {row['token_relative_l2']:.4f}, full frames {row['full_recompute_frames']} "
              f"for {row['scene_cuts']} cuts", flush=True)
    meta = {"torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
            "weights": f"trained here: small_vit {CANVAS} px canvas, patch {PATCH} ({TOKENS} tokens), {DEPTH} blocks x {WIDTH}, "
                       f"{args.epochs} epochs on {args.train_samples} MNIST train digits placed at random",
            "model_test_accuracy": test_accuracy,
            "clips": f"{args.clips} clips x {args.digits} MNIST test digits x {args.segment} frames, drift ~1 px/frame, "
                     f"noise std {args.noise}; eventful with scene-cut refresh (cut_share {cut_share})",
            "dense_gmacs_per_frame": dense_macs / 1e9,
            "metrics": "over all frames but each clip's first; agreement: eventful top-1 == dense top-1; "
                       "accuracy: against the true digit; cosine: pooled pre-logits features; token_relative_l2: "
                       "all final tokens"}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomically({"meta": meta, "rows": rows}, args.out / f"{args.name}.json")
    plot(rows, args.out / f"{args.name}.png")
    print(f"wrote {args.out / (args.name + '.json')} and .png")


if __name__ == "__main__":
    main()
