"""Eventful on a GPU: dense eager / captured / compiled against eventful eager / captured, per-frame time.

Prepared to run in one call on a lent GPU machine (torch, timm, triton; no PyAV):
1. here, on the CPU: `python3 benchmarks/eventful_gpu.py --prepare frames.npz` decodes the frames
   (PyAV) once as uint8 (at most 512 px; larger models get them resized on the device);
2. there: `python3 benchmarks/eventful_gpu.py --frames frames.npz --out $OUT/eventful_gpu` writes
   JSON + PNG within `--seconds` (methods that would start later are recorded as skipped).

Grid: ViT-B/16 at 384 px (batch 1 and 8: eight streams, each from its own place in the clip),
ViT-L/16 at 384 px, ViT-B/16 at 1024 px (4,096 tokens); budgets 1/16, 1/8, 1/4, 1/2 of the tokens
(`TopFraction` at every gate, `sync_free`); bfloat16 by default. Methods, in order of priority:
phase 1, for every configuration: dense eager (timm, fused SDPA: the baseline of every speed-up),
dense captured (the same forward replayed as one CUDA graph), eventful eager, eventful captured
(`capture=True`); phase 2: dense `torch.compile` (default mode) and the compiled forward captured,
and eventful with `torch.compile(ev.step, fullgraph=True)` plus capture at 1/8 (first and last
configuration only: each compile takes about a minute). Every eventful method first runs the clip
once untimed (compilation, warm-up, capture), then `refresh()`es and runs it again timed. Per frame:
CUDA-event time around the call (host launch time included; the device is synchronised after each
frame; the CPU falls back to a synchronised wall clock), median / min / max over the frames after
the first two, and the full first frame; fidelity (cosine of the first token, relative L2 of all
tokens) against dense in the same dtype; state memory. Random weights (speed only). A method that
fails is recorded with its error, not fatal. `--tiny` runs a small model on the CPU as a smoke test.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

import frugalvit.kernels.topk as topk
from frugalvit import TopFraction, eventful
from frugalvit.eventful.model import CUDA_INCREMENTAL_MAX_FRACTION, DEFAULT_INCREMENTAL_MAX_FRACTION, EventfulViT
from frugalvit.ioutil import atomic_file, write_json_atomically
from frugalvit.reporting import save_figure_atomically
from frugalvit.timing import device_timed
from frugalvit.timm import embed_tokens

GRID = [("vit_base_patch16_384", 384, 1), ("vit_base_patch16_384", 384, 8), ("vit_large_patch16_384", 384, 1),
        ("vit_base_patch16_384", 1024, 1)]
TINY_GRID = [("vit_tiny_patch16_224", 64, 1), ("vit_tiny_patch16_224", 64, 2)]
BUDGETS = (1 / 16, 1 / 8, 1 / 4, 1 / 2)
COMPILED_BUDGETS = (1 / 8,)  # compiling takes a minute per budget: the target budget, first and last configs
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# The attention paths a run can force (EventfulViT attributes): the incremental sums up to the CPU's break-even
# share, the fused kernel over all queries on every partial frame (CUDA's default), or only the changed queries' rows
# (and "shared": one token selection per frame for every gate, `token_selection="shared"`)
ATTENTION_MODES = {"incremental": {"incremental_max_fraction": DEFAULT_INCREMENTAL_MAX_FRACTION},
                   "fused": {"incremental_max_fraction": CUDA_INCREMENTAL_MAX_FRACTION},
                   "rows": {"attention_rows": "changed"},
                   "shared": {"incremental_max_fraction": CUDA_INCREMENTAL_MAX_FRACTION, "token_selection": "shared"},
                   "rows+shared": {"attention_rows": "changed", "token_selection": "shared"}}


def sync_free_eventful(model: torch.nn.Module, budget: float, attention: str | None = None,
                       **options: object) -> EventfulViT:
    """The eventful model every method times: `TopFraction(budget)` at every gate, `sync_free`, the attention path
    `attention` (a key of `ATTENTION_MODES`; None: the device's default), `options` passed to `eventful`."""
    ev = eventful(model, TopFraction(budget), **options)
    ev.sync_free = True
    for name, value in ATTENTION_MODES.get(attention, {}).items():
        setattr(ev, name, value)
    return ev


def frame_size(size: int) -> int:
    """Stored frame size for a model size: frames above 512 px are stored at 512 and resized on the device
    (the clip is 1280 x 720, so a 1024 px crop is an upsampling either way; this keeps the .npz small)."""
    return min(size, 512)


def prepare(path: Path, grid: list[tuple[str, int, int]], count: int) -> None:
    """Decode bigbuckbunny once per stored size (uint8, centre crop) into one .npz (needs PyAV; run on the CPU)."""
    from frugalvit.video.decode import bundled_clip_path, load_frames

    clip = bundled_clip_path("bigbuckbunny")
    frames = max(count + 8, 40)  # batch-8 streams start at different places in the clip
    arrays = {}
    for size in sorted({frame_size(size) for _, size, _ in grid}):
        decoded = load_frames(clip, size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), max_frames=frames)  # RGB in [0, 1]
        arrays[f"size_{size}"] = (decoded * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    with atomic_file(path) as handle:
        np.savez_compressed(handle, **arrays)


def streams(frames: np.ndarray, batch: int, count: int) -> torch.Tensor:
    """(count, batch, 3, S, S) float in [0, 1]: `batch` streams, each starting at its own frame."""
    total = frames.shape[0]
    stride = max(1, (total - count) // max(1, batch))
    picks = [[(s * stride + t) % total for s in range(batch)] for t in range(count)]
    return torch.from_numpy(frames[np.array(picks)]).float().div_(255.0)


def summary(times: list[float]) -> dict[str, float]:
    steady = times[2:] or times
    return {"median_ms": statistics.median(steady), "min_ms": min(steady), "max_ms": max(steady)}


class Deadline:
    """Seconds left for the whole run: a method that would start after it is skipped (recorded), not run."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def passed(self) -> bool:
        return time.monotonic() > self.end


def capture_dense(forward: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """`forward` recorded once as a CUDA graph (after a warm-up on a side stream); returns a replaying callable."""
    static_in = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward(static_in)

    def replay(frame: torch.Tensor) -> torch.Tensor:
        static_in.copy_(frame)
        graph.replay()
        return static_out

    return replay


class Config:
    """One model / size / batch: the model, the clip on the device, the dense reference outputs."""

    def __init__(self, name: str, size: int, batch: int, frames: np.ndarray, device: torch.device,
                 dtype: torch.dtype, count: int) -> None:
        import timm

        torch.manual_seed(0)
        self.model = timm.create_model(name, pretrained=False, img_size=size).eval().to(device, dtype)
        cfg = self.model.pretrained_cfg
        mean = torch.tensor(cfg.get("mean", (0.5,) * 3), device=device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("std", (0.5,) * 3), device=device).view(1, 3, 1, 1)
        clip = streams(frames, batch, count).to(device)
        if clip.shape[-1] != size:  # frames stored at a smaller size are resized on the device
            clip = F.interpolate(clip.flatten(0, 1), size=(size, size), mode="bilinear",
                                 align_corners=False).view(count, batch, 3, size, size)
        self.clip = [((f - mean) / std).to(dtype) for f in clip]
        self.device = device
        self.result: dict[str, object] = {"model": name, "size": size, "batch": batch,
                                          "tokens": self.model.patch_embed.num_patches, "methods": {}}
        with torch.no_grad():
            self.reference = [self.model.forward_features(frame).float() for frame in self.clip]

    def record(self, label: str, run: Callable[[], dict[str, float]]) -> None:
        """Run one method; a failure is recorded with its error, not fatal."""
        try:
            with torch.no_grad():
                stats = run()
            dense = self.result["methods"].get("dense eager", {}).get("median_ms")
            if dense is not None and "median_ms" in stats:
                stats["speedup"] = dense / stats["median_ms"]
        except Exception as error:  # one configuration must not sink the run
            stats = {"error": f"{type(error).__name__}: {error}"[:500], "trace": traceback.format_exc()[-1500:]}
        self.result["methods"][label] = stats
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items() if k != "trace"}
        print(f"  {self.result['model']} {self.result['size']}px B{self.result['batch']} {label}: {shown}",
              flush=True)

    def time_dense(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        forward(self.clip[0])  # warm-up
        return summary([device_timed(lambda: forward(frame), self.device)[1] for frame in self.clip])

    def time_eventful(self, budget: float, capture: bool, compiled: bool = False,
                      attention: str | None = None) -> dict[str, float]:
        """`attention`: None for the model's default, or a key of `ATTENTION_MODES`: "incremental" (the sums, up
        to 1/3 of the tokens), "fused" (the fused kernel over all cached queries/keys/values on every partial
        frame), "rows" (`attention_rows="changed"`: only the changed queries' rows)."""
        ev = sync_free_eventful(self.model, budget, attention, capture=capture)
        if compiled:
            torch._dynamo.reset()
            ev.step = torch.compile(ev.step, fullgraph=True)
        for frame in self.clip:  # warm-up pass: compilation, warm-up frame and capture happen here, untimed
            ev.forward_features(frame)
        ev.refresh()  # the timed pass starts with a full frame, from the same state as a reset, keeping the graph
        times, cosines, errors = [], [], []
        for frame, reference in zip(self.clip, self.reference):
            out, ms = device_timed(lambda: ev.forward_features(frame), self.device)
            times.append(ms)
            out = out.float()
            cosines.append(F.cosine_similarity(out[:, 0], reference[:, 0], dim=-1).mean().item())
            errors.append(((out - reference).norm() / reference.norm()).item())
        stats = summary(times)
        stats.update(full_frame_ms=times[0], cosine_mean=statistics.fmean(cosines[1:]),
                     cosine_min=min(cosines[1:]), relative_l2_mean=statistics.fmean(errors[1:]),
                     relative_l2_max=max(errors[1:]), state_mib=ev.state_bytes() / 2**20,
                     nonfinite=not all(math.isfinite(c) for c in cosines))
        return stats


def device_time_table(prof: torch.profiler.profile, calls: int, row_limit: int = 30,
                      width: int = 70) -> tuple[float, float, str]:
    """From a torch profiler over `calls` calls: device kernels and copies per call, milliseconds of device time
    per call, and the table of ops sorted by their own device time."""
    averages = prof.key_averages()
    on_device = [event for event in averages if str(event.device_type).endswith("CUDA")]
    kernels = sum(event.count for event in on_device) / calls
    device_ms = sum(event.self_device_time_total for event in on_device) / calls / 1000
    return kernels, device_ms, averages.table(sort_by="self_device_time_total", row_limit=row_limit,
                                              max_name_column_width=width)


def profile_eventful(config: Config, budget: float, path: Path, attention: str | None = None) -> None:
    """Device time per kernel of eager sync-free eventful frames (the kernels a capture replays), as a table."""
    from torch.profiler import ProfilerActivity, profile

    ev = sync_free_eventful(config.model, budget, attention)
    with torch.no_grad():
        for frame in config.clip[:4]:
            ev.forward_features(frame)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for frame in config.clip[4:9]:
                ev.forward_features(frame)
            torch.cuda.synchronize()
    kernels, device_ms, table = device_time_table(prof, calls=5)
    with atomic_file(path) as handle:
        handle.write(f"5 partial frames, {config.result['model']} {config.result['size']}px "
                     f"B{config.result['batch']}, TopFraction({budget:g}), attention {attention or 'default'}; "
                     f"per frame: {kernels:.0f} device kernels and copies, {device_ms:.2f} ms of device time\n"
                     f"{table}".encode())
    print(table[:6000], flush=True)


def phase_eager_and_captured(config: Config, deadline: Deadline, with_incremental: bool = False) -> None:
    """Dense eager (the baseline), dense captured, eventful eager and captured at every budget (the device's
    default attention path); `with_incremental`: also the other path at 1/8."""
    model, cuda = config.model, config.device.type == "cuda"
    config.record("dense eager", lambda: config.time_dense(model.forward_features))
    if cuda:
        config.record("dense captured", lambda: config.time_dense(capture_dense(model.forward_features,
                                                                                config.clip[0])))
    runs = [(budget, capture, None) for budget in BUDGETS for capture in ((False, True) if cuda else (False,))]
    if with_incremental:  # the attention path that is not the device's default, at the target budget
        runs.append((1 / 8, cuda, "incremental" if cuda else "fused"))
    runs.append((1 / 8, cuda, "rows"))  # attention over the changed queries' rows only
    runs.append((1 / 8, cuda, "rows+shared"))  # and one selection per frame: the GPU configuration
    for budget, capture, attention in runs:
        label = f"eventful {budget:g} {'captured' if capture else 'eager'}" + (f" {attention}" if attention else "")
        if deadline.passed():
            config.result["methods"][label] = {"skipped": "out of time"}
            continue
        config.record(label, lambda: config.time_eventful(budget, capture, attention=attention))


def check_hold_capture(config: Config) -> dict[str, object]:
    """Held frames (`hold_share`) with `capture=True` against the same settings eager and sync-free, over the
    clip: the same frame kinds (partial / held / full) and the same outputs. Thresholds that mix all three on
    this clip with random weights: tokens count as moved beyond 5% of their norm, hold above 20% moved, full
    frame above 50%."""
    options = dict(cut_share=0.5, hold_share=0.2, cut_relative_error=0.05)
    runs = {}
    for name, capture in (("eager", False), ("captured", True)):
        ev = sync_free_eventful(config.model, 1 / 8, capture=capture, **options)
        kinds, outputs, times = [], [], []
        with torch.no_grad():
            for frame in config.clip:
                out, ms = device_timed(lambda: ev.forward_features(frame), config.device)
                kinds.append("full" if ev.last_frame_full else "held" if ev.last_frame_held else "partial")
                outputs.append(out.float())
                times.append(ms)
        runs[name] = (kinds, outputs, times)
    (kinds_e, out_e, times_e), (kinds_c, out_c, times_c) = runs["eager"], runs["captured"]
    result = {"options": options, "kinds_eager": kinds_e, "kinds_captured": kinds_c, "same_kinds": kinds_e == kinds_c,
              "max_abs_difference": max((a - b).abs().max().item() for a, b in zip(out_e, out_c)),
              "eager_ms": summary(times_e), "captured_ms": summary(times_c),
              "relative_l2_vs_dense_mean": statistics.fmean(
                  ((o - r).norm() / r.norm()).item() for o, r in zip(out_c[1:], config.reference[1:]))}
    print(f"  held frames with capture: {result}", flush=True)
    return result


def phase_compiled(config: Config, deadline: Deadline, budgets: tuple[float, ...]) -> None:
    """Dense `torch.compile` (and, on CUDA, captured after compiling), then compiled+captured eventful."""
    model, cuda = config.model, config.device.type == "cuda"
    labels = ["dense compiled"] + [f"eventful {b:g} compiled{'+captured' if cuda else ''}" for b in budgets]
    if deadline.passed():
        config.result["methods"].update({label: {"skipped": "out of time"} for label in labels})
        return
    torch._dynamo.reset()
    compiled = torch.compile(model.forward_features)
    config.record("dense compiled", lambda: config.time_dense(compiled))
    if cuda:
        config.record("dense compiled+captured", lambda: config.time_dense(capture_dense(compiled, config.clip[0])))
    for budget, label in zip(budgets, labels[1:]):
        if deadline.passed():
            config.result["methods"][label] = {"skipped": "out of time"}
            continue
        config.record(label, lambda: config.time_eventful(budget, capture=cuda, compiled=True))


def check_top_k_kernel(device: torch.device) -> dict[str, object]:
    """The fused top-k kernel against its reference on this device, and both timed per call: 200 calls in a
    loop (CUDA events; launch time included) and, on CUDA, the same calls captured as one CUDA graph (device
    time only, as inside a captured eventful frame)."""
    from frugalvit.kernels import top_k_ascending, top_k_ascending_reference

    result: dict[str, object] = {}
    for tokens in (577, 1025, 4097):
        errors = torch.rand(1, tokens, device=device)
        count = tokens // 8
        equal = torch.equal(top_k_ascending(errors, count), top_k_ascending_reference(errors, count))
        timed = {}
        for name, fn in (("kernel", top_k_ascending), ("reference", top_k_ascending_reference)):
            fn(errors, count)
            loop = lambda: [fn(errors, count) for _ in range(200)]  # noqa: E731 - timed twice below
            times = [device_timed(loop, device)[1] / 200 for _ in range(3)]
            timed[f"{name}_us"] = 1000 * min(times)
            if device.type == "cuda":
                replay = capture_dense(lambda e: [fn(e, count) for _ in range(200)][-1], errors)
                times = [device_timed(lambda: replay(errors), device)[1] / 200 for _ in range(3)]
                timed[f"{name}_graph_us"] = 1000 * min(times)
        result[f"{tokens}_tokens"] = {"equal": equal, **timed}
    print(f"  top-k kernel: {result}", flush=True)
    return result


def guarded_top_k_check(device: torch.device) -> dict[str, object]:
    """`check_top_k_kernel`; where the kernel fails or disagrees, the run goes on with the reference (recorded)."""
    try:
        result = check_top_k_kernel(device)
        if all(entry["equal"] for entry in result.values()):
            return result
        result["fallback"] = "kernel disagreed with the reference: reference used"
    except Exception as error:  # a kernel that fails here must not sink the run
        result = {"error": f"{type(error).__name__}: {error}"[:500], "fallback": "reference used"}
    topk.kernel_applies = lambda *_, **__: False  # this process only: the benchmark's own guard
    print(f"  top-k kernel: {result}", flush=True)
    return result


def phase_explore(config: Config, deadline: Deadline) -> None:
    """Attention choices, captured: the fused kernel over all queries (CUDA's default) at 1/8, only the changed
    queries' rows (`attention_rows="changed"`) at 1/8, both with one token selection per frame
    (`token_selection="shared"`) at 1/8, then changed rows with one selection at 1/16 and 1/4. Dense eager and
    captured as baselines."""
    cuda = config.device.type == "cuda"
    config.record("dense eager", lambda: config.time_dense(config.model.forward_features))
    if cuda:
        config.record("dense captured", lambda: config.time_dense(capture_dense(config.model.forward_features,
                                                                                config.clip[0])))
        # what the eventful frames' patch embedding (one matmul on CUDA: embed_tokens) gives the dense model too
        model = config.model
        patch_matmul = lambda images: model.norm(model.blocks(embed_tokens(model, images)))  # noqa: E731
        config.record("dense captured, patches as one matmul",
                      lambda: config.time_dense(capture_dense(patch_matmul, config.clip[0])))
    runs = [(1 / 8, "fused"), (1 / 8, "rows"), (1 / 8, "rows+shared"), (1 / 8, "shared"), (1 / 16, "rows+shared"),
            (1 / 4, "rows+shared")]
    for budget, attention in runs:
        label = f"eventful {budget:g} captured {attention}"
        if deadline.passed():
            config.result["methods"][label] = {"skipped": "out of time"}
            continue
        config.record(label, lambda: config.time_eventful(budget, capture=cuda, attention=attention))


def phase_sdpa_backends(config: Config, deadline: Deadline) -> None:
    """The dense model and the eventful GPU configuration (1/8, shared selection) captured under each of
    PyTorch's fused attention backends (`torch.nn.attention.sdpa_kernel`; a capture keeps the backend it was
    recorded with): which kernel serves a few hundred query rows against thousands of keys best. A backend
    that cannot run a shape is recorded with its error."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cuda = config.device.type == "cuda"
    for name in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        backend = getattr(SDPBackend, name)
        for label, run in ((f"dense captured, {name}",
                            lambda: config.time_dense(capture_dense(config.model.forward_features, config.clip[0]))
                            if cuda else config.time_dense(config.model.forward_features)),
                           (f"eventful 0.125 captured rows+shared, {name}",
                            lambda: config.time_eventful(1 / 8, capture=cuda, attention="rows+shared"))):
            if deadline.passed():
                config.result["methods"][label] = {"skipped": "out of time"}
                continue
            with sdpa_kernel(backend):
                config.record(label, run)


def phase_explore_compiled(config: Config, deadline: Deadline) -> None:
    """The attention choices at 1/8 compiled (`torch.compile(ev.step, fullgraph=True)`) and captured, then the
    dense model compiled and captured (the strongest dense baseline)."""
    cuda = config.device.type == "cuda"
    for attention in ("rows+shared", "rows"):
        label = f"eventful 0.125 compiled+captured {attention}"
        if deadline.passed():
            config.result["methods"][label] = {"skipped": "out of time"}
            continue
        config.record(label, lambda: config.time_eventful(1 / 8, capture=cuda, compiled=True, attention=attention))
    label = "dense compiled+captured" if cuda else "dense compiled"
    if deadline.passed():
        config.result["methods"][label] = {"skipped": "out of time"}
        return
    torch._dynamo.reset()
    forward = torch.compile(config.model.forward_features)
    config.record(label, lambda: config.time_dense(capture_dense(forward, config.clip[0]) if cuda else forward))


def plot(report: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = report["results"]
    fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 3.6), squeeze=False)
    for ax, config in zip(axes[0], configs):
        for variant, color in (("eager", "tab:red"), ("captured", "tab:blue"), ("compiled+captured", "tab:green")):
            points = [(b, config["methods"].get(f"eventful {b:g} {variant}", {}).get("speedup")) for b in BUDGETS]
            points = [(b, s) for b, s in points if s is not None]
            if points:
                ax.plot(*zip(*points), "o-", color=color, label=f"eventful {variant}")
        for label, style in (("dense captured", ":"), ("dense compiled+captured", "--")):
            if "speedup" in config["methods"].get(label, {}):
                ax.axhline(config["methods"][label]["speedup"], color="gray", linestyle=style, label=label)
        ax.axhline(1.0, color="k", linewidth=0.8, label="dense eager")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="share of tokens per gate", ylabel="speed-up vs dense eager",
               title=f"{config['model']} {config['size']}px B{config['batch']}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{report['device_name']}, {report['dtype']}", fontsize=9)
    fig.tight_layout()
    save_figure_atomically(fig, path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", type=Path, help="decode frames into this .npz and stop (CPU, PyAV)")
    parser.add_argument("--frames", type=Path, help=".npz written by --prepare")
    parser.add_argument("--count", type=int, default=17, help="frames per configuration (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--no-compile", action="store_true", help="eager and captured methods only")
    parser.add_argument("--compile-configs", type=int, nargs="+",
                        help="only these configurations (indices into those run) are compiled, at 1/8 (default: "
                             "the first and last at 1/8, the dense model of the others)")
    parser.add_argument("--seconds", type=float, default=420.0,
                        help="time for the whole run; methods that would start later are skipped "
                             "(default: %(default)s)")
    parser.add_argument("--configs", type=int, nargs="+", help="indices into the grid to run (default: all)")
    parser.add_argument("--profile", action="store_true", help="also profile eventful kernels (CUDA, first config)")
    parser.add_argument("--tiny", action="store_true", help="a small model at 64 px (a CPU smoke test)")
    parser.add_argument("--check-hold", action="store_true",
                        help="first: held frames with capture against eager (first configuration of the grid)")
    parser.add_argument("--explore", action="store_true",
                        help="instead of the grid: the attention choices (all queries / changed rows) on the first "
                             "and last configuration, the top-k kernel check, profiles of the changed-rows frame with "
                             "per-gate and shared selection")
    parser.add_argument("--sdpa-backends", action="store_true",
                        help="with --explore: also the dense model and the eventful GPU configuration under each "
                             "fused attention backend")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eventful_gpu"))
    args = parser.parse_args(argv)
    grid = TINY_GRID if args.tiny else GRID
    if args.configs and args.prepare is None:
        grid = [grid[i] for i in args.configs]
    if args.prepare is not None:
        prepare(args.prepare, grid, args.count)
        return 0
    if args.frames is None or not args.frames.is_file():
        print("error: --frames FILE.npz (from --prepare) is required", file=sys.stderr)
        return 2
    deadline = Deadline(args.seconds)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = np.load(args.frames)
    report = {"benchmark": "eventful_gpu", "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
              "dtype": args.dtype, "torch": torch.__version__, "timm": __import__("timm").__version__,
              "weights": "random (speed only)", "policy": "TopFraction at every gate, sync_free",
              "timing": "CUDA events around each frame (host launch time included, device synchronised after "
                        "every frame); median/min/max over the frames after the first two",
              "results": []}
    if device.type == "cuda":  # clocks up and libraries loaded before the first timed frame
        warm = torch.randn(4096, 4096, device=device, dtype=DTYPES[args.dtype])
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            warm @ warm
        torch.cuda.synchronize()
    report["top_k_kernel"] = guarded_top_k_check(device)
    if args.check_hold:
        name, size, batch = (TINY_GRID if args.tiny else GRID)[0]
        config = Config(name, size, batch, data[f"size_{frame_size(size)}"], device, DTYPES[args.dtype], args.count)
        try:
            report["hold_capture_check"] = check_hold_capture(config)
        except Exception as error:  # a check, never fatal to the timings
            report["hold_capture_check"] = {"error": f"{type(error).__name__}: {error}"[:500],
                                            "trace": traceback.format_exc()[-1500:]}
        del config
        write_json_atomically(report, args.out.with_suffix(".json"), indent=1)
    if args.explore:
        explore(report, grid, data, device, DTYPES[args.dtype], args, deadline)
        return 0
    configs = []
    for name, size, batch in grid:  # phase 1 for every configuration first: the main figures survive a timeout
        config = Config(name, size, batch, data[f"size_{frame_size(size)}"], device, DTYPES[args.dtype], args.count)
        configs.append(config)
        report["results"].append(config.result)
        phase_eager_and_captured(config, deadline, with_incremental=len(configs) == 1)
        if args.profile and device.type == "cuda" and len(configs) == 1:
            try:
                profile_eventful(config, 1 / 8, args.out.with_name(args.out.name + "_profile.txt"))
            except Exception as error:  # the profile is an extra: never fatal
                print(f"no profile: {type(error).__name__}: {error}")
        write_json_atomically(report, args.out.with_suffix(".json"), indent=1)
    if not args.no_compile:
        first_and_last = sorted(set(args.compile_configs if args.compile_configs is not None
                                    else {0, len(configs) - 1}))  # the target configurations first, then others
        others = [] if args.compile_configs is not None else [i for i in range(len(configs)) if i not in first_and_last]
        for index in first_and_last + others:
            phase_compiled(configs[index], deadline, COMPILED_BUDGETS if index in first_and_last else ())
            write_json_atomically(report, args.out.with_suffix(".json"), indent=1)
    print_table(report)
    try:
        plot(report, args.out.with_suffix(".png"))
    except ImportError as error:  # matplotlib missing on the GPU machine: the JSON has every figure
        print(f"no plot: {error}")
    return 0


def plot_explore(report: dict[str, object], path: Path) -> None:
    """Per-frame median time of every method of an `--explore` run, one panel per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = report["results"]
    fig, axes = plt.subplots(1, len(configs), figsize=(5.5 * len(configs), 3.8), squeeze=False)
    for ax, config in zip(axes[0], configs):
        timed = [(label, stats) for label, stats in config["methods"].items() if "median_ms" in stats]
        labels = [label.replace("eventful ", "ev ") for label, _ in timed]
        medians = [stats["median_ms"] for _, stats in timed]
        errors = [[m - stats["min_ms"] for m, (_, stats) in zip(medians, timed)],
                  [stats["max_ms"] - m for m, (_, stats) in zip(medians, timed)]]
        colors = ["gray" if label.startswith("dense") else "tab:green" if "fused" in label else "tab:blue"
                  for label, _ in timed]
        ax.barh(range(len(timed)), medians, xerr=errors, color=colors)
        ax.set_yticks(range(len(timed)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel="ms per frame (median, min-max)", title=f"{config['model']} {config['size']}px B{config['batch']}")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{report['device_name']}, {report['dtype']}: attention over all queries (green) vs the changed queries' rows (blue)",
                 fontsize=9)
    fig.tight_layout()
    save_figure_atomically(fig, path, dpi=110)
    plt.close(fig)


def explore(report: dict[str, object], grid: list[tuple[str, int, int]], data: np.lib.npyio.NpzFile,
            device: torch.device, dtype: torch.dtype, args: argparse.Namespace, deadline: Deadline) -> None:
    """`--explore`: which attention path and which top-k to make the GPU default, on the first and last
    configuration: every captured method of both first (`phase_explore`), then the compiled ones (slow to
    compile), so that a deadline cuts the compiled ones first."""
    write_json_atomically(report, args.out.with_suffix(".json"), indent=1)
    configs = []
    for name, size, batch in (grid[0], grid[-1]):
        config = Config(name, size, batch, data[f"size_{frame_size(size)}"], device, dtype, args.count)
        configs.append(config)
        report["results"].append(config.result)
        phase_explore(config, deadline)
        if args.sdpa_backends:
            phase_sdpa_backends(config, deadline)
        for attention in ("rows", "rows+shared") if args.profile and device.type == "cuda" else ():
            try:
                suffix = f"_profile_{size}_{attention.replace('+', '_')}.txt"
                profile_eventful(config, 1 / 8, args.out.with_name(args.out.name + suffix), attention=attention)
            except Exception as error:  # the profile is an extra: never fatal
                print(f"no profile: {type(error).__name__}: {error}")
        write_json_atomically(report, args.out.with_suffix(".json"), indent=1)
    if not args.no_compile:
        for config in reversed(configs):  # the largest configuration (the target that is further off) first
            phase_explore_compiled(config, deadline)
            write_json_atomically(report, args.out.with_suffix(".json"), indent=1)
    print_table(report)
    try:
        plot_explore(report, args.out.with_suffix(".png"))
    except ImportError as error:  # matplotlib missing on the GPU machine: the JSON has every figure
        print(f"no plot: {error}")


def print_table(report: dict[str, object]) -> None:
    for config in report["results"]:
        print(f"{config['model']} {config['size']}px B{config['batch']} ({config['tokens']} tokens)")
        for label, stats in config["methods"].items():
            if "median_ms" in stats:
                extra = f" x{stats['speedup']:.2f}" if "speedup" in stats else ""
                extra += f" rel_l2 {stats['relative_l2_mean']:.3f}" if "relative_l2_mean" in stats else ""
                print(f"  {label:32s} {stats['median_ms']:8.2f} ms{extra}")
            else:
                print(f"  {label:32s} {str(stats)[:90]}")


if __name__ == "__main__":
    sys.exit(main())
