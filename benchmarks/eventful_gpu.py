"""Eventful on a GPU: dense eager / compiled against eventful eager / compiled, per-frame device time.

Prepared to run in one call on a lent GPU machine (torch, timm, triton; no PyAV):
1. here, on the CPU: `python3 benchmarks/eventful_gpu.py --prepare frames.npz` decodes the frames
   (PyAV) once, at every size the grid needs, as uint8;
2. there: `python3 benchmarks/eventful_gpu.py --frames frames.npz --out $OUT/eventful_gpu` (under
   5 minutes on an H100) writes JSON + PNG.

Grid: ViT-B/16 at 384 px (batch 1 and 8: eight streams, each from its own place in the clip),
ViT-L/16 at 384 px, ViT-B/16 at 1024 px (4,096 tokens); budgets 1/16, 1/8, 1/4, 1/2 of the tokens
(`TopFraction`, `sync_free`); bfloat16 by default. Methods: dense eager (timm, fused SDPA), dense
`torch.compile`, eventful eager, eventful with `torch.compile(ev.step, fullgraph=True,
mode="reduce-overhead")` (CUDA graphs); each method first runs the clip once untimed (compilation,
capture), then from a reset. Per frame: device time from CUDA events (the CPU falls back to a
synchronised wall clock), median / min / max over the frames after the first two; fidelity
(cosine of pooled features, relative L2 of all tokens) against dense in the same dtype; state memory.
Random weights (speed only). A configuration that fails is recorded with its error, not fatal.
`--tiny` runs a small model on the CPU as a smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from frugalvit import TopFraction, eventful
from frugalvit.ioutil import atomic_file, write_json_atomically
from frugalvit.timing import timed

GRID = [("vit_base_patch16_384", 384, 1), ("vit_base_patch16_384", 384, 8), ("vit_large_patch16_384", 384, 1),
        ("vit_base_patch16_384", 1024, 1)]
TINY_GRID = [("vit_tiny_patch16_224", 64, 1), ("vit_tiny_patch16_224", 64, 2)]
BUDGETS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def prepare(path: Path, sizes: list[int], frames: int) -> None:
    """Decode bigbuckbunny once per size (uint8, centre crop) into one .npz (needs PyAV; run on the CPU)."""
    from frugalvit.video.decode import bundled_clip_path, load_frames

    clip = bundled_clip_path("bigbuckbunny")
    arrays = {}
    for size in sorted(set(sizes)):
        decoded = load_frames(clip, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), max_frames=frames)  # RGB in [0, 1]
        arrays[f"size_{size}"] = (decoded * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    with atomic_file(path) as handle:
        np.savez_compressed(handle, **arrays)


def device_timer(device: torch.device) -> Callable[[Callable[[], object]], tuple[object, float]]:
    """A per-call timer in milliseconds: CUDA events on a GPU, a synchronised wall clock elsewhere."""
    if device.type != "cuda":
        return lambda fn: timed(fn, device=device)

    def cuda_timed(fn: Callable[[], object]) -> tuple[object, float]:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        stop.record()
        stop.synchronize()
        return out, start.elapsed_time(stop)

    return cuda_timed


def streams(frames: np.ndarray, batch: int, count: int) -> torch.Tensor:
    """(count, batch, 3, S, S) float in [0, 1]: `batch` streams, each starting at its own frame."""
    total = frames.shape[0]
    stride = max(1, (total - count) // max(1, batch))
    picks = [[(s * stride + t) % total for s in range(batch)] for t in range(count)]
    return torch.from_numpy(frames[np.array(picks)]).float().div_(255.0)


def summary(times: list[float]) -> dict[str, float]:
    steady = times[2:] or times
    return {"median_ms": statistics.median(steady), "min_ms": min(steady), "max_ms": max(steady)}


def run_config(name: str, size: int, batch: int, frames: np.ndarray, device: torch.device, dtype: torch.dtype,
               count: int, compile_models: bool) -> dict[str, object]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=size).eval().to(device, dtype)
    mean = torch.tensor(model.pretrained_cfg.get("mean", (0.5,) * 3), device=device).view(1, 3, 1, 1)
    std = torch.tensor(model.pretrained_cfg.get("std", (0.5,) * 3), device=device).view(1, 3, 1, 1)
    clip = [((f.to(device) - mean) / std).to(dtype) for f in streams(frames, batch, count)]
    time_call = device_timer(device)
    result: dict[str, object] = {"model": name, "size": size, "batch": batch,
                                 "tokens": model.patch_embed.num_patches, "methods": {}}
    with torch.no_grad():
        dense_out, dense_times = [], []
        for frame in clip:
            out, ms = time_call(lambda: model.forward_features(frame))
            dense_out.append(out)
            dense_times.append(ms)
        result["methods"]["dense eager"] = summary(dense_times)
        if compile_models:
            try:
                torch._dynamo.reset()
                compiled = torch.compile(model.forward_features)
                compiled(clip[0])  # warm-up: compilation, untimed
                times = [time_call(lambda: compiled(frame))[1] for frame in clip]
                result["methods"]["dense compiled"] = summary(times)
            except Exception as error:  # recorded, not fatal: one configuration must not sink the run
                result["methods"]["dense compiled"] = {"error": f"{type(error).__name__}: {error}"[:500]}
        for budget in BUDGETS:
            for variant in ("eager", "compiled") if compile_models else ("eager",):
                label = f"eventful {budget:g} {variant}"
                try:
                    ev = eventful(model, TopFraction(budget))
                    ev.sync_free = True
                    if variant == "compiled":
                        torch._dynamo.reset()  # every EventfulViT instance recompiles `step`: stay under the limit
                        mode = "reduce-overhead" if device.type == "cuda" else None
                        ev.step = torch.compile(ev.step, fullgraph=True, mode=mode)
                    for frame in clip:  # warm-up pass: compilation and capture happen here, untimed
                        ev.forward_features(frame)
                    ev.reset()
                    times, cosines, errors = [], [], []
                    for frame, reference in zip(clip, dense_out):
                        out, ms = time_call(lambda: ev.forward_features(frame))
                        times.append(ms)
                        pooled, pooled_ref = out[:, 0].float(), reference[:, 0].float()
                        cosines.append(F.cosine_similarity(pooled, pooled_ref, dim=-1).mean().item())
                        errors.append(((out.float() - reference.float()).norm() / reference.float().norm()).item())
                    stats = summary(times)
                    stats.update(speedup=result["methods"]["dense eager"]["median_ms"] / stats["median_ms"],
                                 cosine_mean=sum(cosines[1:]) / max(1, len(cosines) - 1),
                                 relative_l2_mean=sum(errors[1:]) / max(1, len(errors) - 1),
                                 state_mib=ev.state_bytes() / 2**20)
                    result["methods"][label] = stats
                except Exception as error:
                    result["methods"][label] = {"error": f"{type(error).__name__}: {error}"[:500],
                                                "trace": traceback.format_exc()[-1500:]}
                print(f"  {name} {size}px B{batch} {label}: {result['methods'][label]}", flush=True)
    return result


def plot(report: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = report["results"]
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 3.6), squeeze=False)
    for ax, config in zip(axes[0], configs):
        for variant, color in (("eager", "tab:red"), ("compiled", "tab:blue")):
            points = [(b, config["methods"].get(f"eventful {b:g} {variant}", {}).get("speedup")) for b in BUDGETS]
            points = [(b, s) for b, s in points if s is not None]
            if points:
                ax.plot(*zip(*points), "o-", color=color, label=f"eventful {variant}")
        ax.axhline(1.0, color="k", linewidth=0.8, label="dense eager")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="share of tokens per gate", ylabel="speed-up vs dense eager",
               title=f"{config['model']} {config['size']}px B{config['batch']}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{report['device_name']}, {report['dtype']}", fontsize=9)
    fig.tight_layout()
    with atomic_file(path) as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", type=Path, help="decode frames into this .npz and stop (CPU, PyAV)")
    parser.add_argument("--frames", type=Path, help=".npz written by --prepare")
    parser.add_argument("--count", type=int, default=17, help="frames per configuration (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--no-compile", action="store_true", help="eager methods only")
    parser.add_argument("--tiny", action="store_true", help="a small model at 64 px (a CPU smoke test)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eventful_gpu"))
    args = parser.parse_args(argv)
    grid = TINY_GRID if args.tiny else GRID
    if args.prepare is not None:
        prepare(args.prepare, [size for _, size, _ in grid], max(args.count + 8, 40))
        return 0
    if args.frames is None or not args.frames.is_file():
        print("error: --frames FILE.npz (from --prepare) is required", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = np.load(args.frames)
    report = {"benchmark": "eventful_gpu", "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
              "dtype": args.dtype, "torch": torch.__version__, "weights": "random (speed only)",
              "timing": "CUDA events per frame; median/min/max over frames after the first two", "results": []}
    for name, size, batch in grid:
        report["results"].append(run_config(name, size, batch, data[f"size_{size}"], device, DTYPES[args.dtype],
                                            args.count, not args.no_compile))
        write_json_atomically(report, args.out.with_suffix(".json"), indent=1)  # partial results survive a timeout
    plot(report, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
