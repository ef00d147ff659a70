"""Glance and focus on a GPU: the trained two-look cascade against the 7x7 model, in the forms a GPU user
would deploy, at batch 1 to 1,024.

On an H100 the early-exit cascade ran at 0.29x the 7x7 model's speed at batch
64 (docs/dvt.md): two tiny models of a few dozen kernels each, and a host
read of the exit decision per batch. Here the models of
`dvt_focus_trained.py` are timed, in one run, batch by batch in turn, as:

* dense 7x7: eager; captured as a CUDA graph; compiled and captured (`--compile`);
* the early-exit cascade (eager: regrouping reads each decision on the host);
* `forward_every_stage` (both looks for every image, the decision applied
  on the device: no host read, same answers): eager; captured; compiled and
  captured (`--compile`);
* `forward_within_capacity` (early exit with static shapes: the least
  confident `--capacity` share of each batch gets the focus, by default the
  share the glance leaves undecided on these images + 0.05): the same three.

Each form's speed-up is against the captured dense model (its fastest form
without compiling), the median over repeats of each repeat's ratio, with min
and max; each form's test accuracy and agreement with the eager early exit are
checked on the whole split first. MACs counted by `CostCounter` on the eager
forms. Results are written after every batch size, so a run cut short keeps
what it measured.

    here:  python benchmarks/dvt_focus_gpu.py --export DATA .gpu/focus/test.npz   # the test split, uint8
           mkdir -p .gpu/focus/models/NAME; cp WORK/focus_trained/NAME/model.pt ...   # glance, focus, full
    there: python benchmarks/dvt_focus_gpu.py --models .gpu/focus/models --images .gpu/focus/test.npz \\
               --out OUT/dvt_focus_gpu.json

`--backbone-shape` times the pretrained-backbone cascade of `dvt_focus.py`
instead (a ViT-S/14 glancing at 112 px and looking again at a crop, against
the same model at 224 px), with random weights and canvases: nothing to
carry to the GPU host, and a pass costs the same whatever the weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from frugalvit.cost import CostCounter
from frugalvit.tasks import load_split_arrays, to_float
from frugalvit.timing import interleaved_totals

import dvt_focus_trained as T  # the sibling benchmarks (this directory is on sys.path)
from eventful_gpu import capture_dense, device_time_table

RESULTS = Path(__file__).resolve().parent / "results"
# The two-look cascade's validation-chosen threshold in the CPU-trained run (dvt_focus_trained_cpu.json)
THRESHOLD = 0.5026406049728394
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(data: Path, out: Path, count: int) -> None:
    """The first `count` images of the task's test split (uint8) and their labels as one compressed file, for
    a host without the task (a device call carries at most 64 MiB: 1,024 images are 23 MB)."""
    arrays = load_split_arrays(data, "test")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.npz")
    np.savez_compressed(partial, images=arrays["images"][:count], labels=arrays["labels"][:count])
    partial.replace(out)
    print(f"wrote {out}: {min(count, arrays['images'].shape[0])} test images")


def captured(function: Callable[[Tensor], object]) -> Callable[[Tensor], object]:
    """`function` recorded as one CUDA graph per input shape (on first sight of the shape), then replayed."""
    graphs: dict[tuple[int, ...], Callable[[Tensor], object]] = {}

    def replay(images: Tensor) -> object:
        shape = tuple(images.shape)
        if shape not in graphs:
            graphs[shape] = capture_dense(function, images)
        return graphs[shape](images)

    return replay


def logits_of(output: object) -> Tensor:
    return output.logits if hasattr(output, "logits") else output


def time_forms(forms: dict[str, Callable[[Tensor], object]], batches: list[Tensor],
               repeats: int) -> dict[str, list[float]]:
    """Seconds per pass over `batches` for each form, `repeats` passes after one warm-up pass; within a pass the
    forms take each batch in turn, in an order that rotates from batch to batch (`interleaved_totals`)."""
    with torch.no_grad():
        interleaved_totals(forms, batches)
        passes = [interleaved_totals(forms, batches) for _ in range(repeats)]
    return {name: [totals[name] for totals in passes] for name in forms}


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def profile_forms(forms: dict[str, Callable[[Tensor], object]], batch: Tensor, path: Path,
                  calls: int = 5) -> None:
    """Device time per kernel of each form on `batch` (eager forms: the kernels a capture replays), as tables."""
    from torch.profiler import ProfilerActivity, profile

    text = []
    with torch.no_grad():
        for name, function in forms.items():
            for _ in range(3):
                function(batch)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    function(batch)
                torch.cuda.synchronize()
            kernels, device_ms, table = device_time_table(prof, calls, row_limit=25, width=60)
            text.append(f"{name}, batch {batch.shape[0]}, per call: {kernels:.0f} device kernels and copies, "
                        f"{device_ms:.3f} ms of device time\n{table}")
    path.write_text("\n\n".join(text))
    print("\n".join(line.split("\n")[0] for line in text), flush=True)


def plot(results: dict, path: Path) -> None:
    """Speed-up against the captured dense model per batch size, one line per form (log batch axis), with each
    cascade form's MAC ratio as a dotted level: how much of the saved arithmetic the device turns into time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    timings = results["timings"]
    names = list(dict.fromkeys(name for entry in timings for name in entry["speedup_vs_baseline"]
                               if name != results["config"]["baseline"]))  # in order of first appearance
    for name in names:
        points = [(entry["batch_size"], entry["speedup_vs_baseline"][name]) for entry in timings
                  if name in entry["speedup_vs_baseline"]]
        points.sort()
        style = "-o" if "captured" in name or "compiled" in name else "--o"
        line, = ax.plot([b for b, _ in points], [v["median"] for _, v in points], style, ms=4, label=name)
        ax.fill_between([b for b, _ in points], [v["min"] for _, v in points], [v["max"] for _, v in points],
                        color=line.get_color(), alpha=0.15)
    for name, ratio in results["mac_ratio"].items():
        ax.axhline(ratio, color="grey", ls=":", lw=1)
        ax.annotate(f"MAC ratio, {name} ({ratio:.2f}x)", (timings[0]["batch_size"], ratio), fontsize=7,
                    xytext=(2, 2), textcoords="offset points", color="grey")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel(f"speed-up vs {results['config']['baseline']} (same run)")
    setup = results["config"].get("setup", "glance and focus trained from scratch against the 7x7 model")
    ax.set_title(f"{results['config']['device']}, {results['config']['dtype']}: {setup[:70]}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def trained_setup(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """The trained glance and focus (`dvt_focus_trained.py`'s models) and the 7x7 model, on the exported split."""
    models = {name: model.to(device, dtype) for name, model in T.load_models(args.models, args.seed).items()}
    full = models["full"]
    arrays = np.load(args.images)

    def dense(batch: Tensor) -> Tensor:
        return full(to_float(batch).to(dtype))

    return {"cascade": T.cascade_of(models, last_resort=False), "dense": dense, "threshold": args.threshold,
            "images": torch.from_numpy(arrays["images"]).to(device),
            "labels": torch.from_numpy(arrays["labels"]).to(device),
            "setup": "glance and focus trained from scratch (dvt_focus_trained.py) against the 7x7 model"}


def backbone_setup(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    """The pretrained-backbone shape (`dvt_focus.py`, class labels only): one ViT-S/14 sees the 112 px canvas at
    112 px, then a 56 px crop where its glance head's attention points, at 112 px again; against the same model
    at 224 px. Random weights and random canvases (timing only: the cost does not depend on either); the exit
    threshold lets `args.exit_share` of the images leave after the glance (45 % at the CPU run's
    validation-matched point)."""
    import timm

    from frugalvit.dvt import AttentionPoolHead, FocusCascade, ResolutionCascade, tokens_at_resolution

    torch.manual_seed(args.seed)
    backbone = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=224).eval()
    width = backbone.embed_dim
    heads = [AttentionPoolHead(width, 10).eval() for _ in range(3)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    cascade = FocusCascade(backbone, 112, 56, heads[:2], None, input_size=112, mean=mean, std=std)
    full = ResolutionCascade(backbone, (112, 224), input_size=112, mean=mean, std=std)  # its 224 px input
    cascade, full = cascade.to(device, dtype).eval(), full.to(device, dtype).eval()
    dense_head = heads[2].to(device, dtype)
    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (args.backbone_images, 3, 112, 112), dtype=torch.uint8, generator=generator)
    images = images.to(device)

    def dense(batch: Tensor) -> Tensor:
        return dense_head(tokens_at_resolution(backbone, full.stage_input(1, batch)))

    with torch.no_grad():
        confidence = torch.cat([cascade.forward_all(images[i:i + 64])[0].float().softmax(-1).amax(-1)
                                for i in range(0, images.shape[0], 64)])
    threshold = float(confidence.quantile(1.0 - args.exit_share))
    return {"cascade": cascade, "dense": dense, "threshold": threshold, "images": images, "labels": None,
            "setup": f"pretrained-backbone shape (dvt_focus.py, class labels only): ViT-S/14 glance at 112 px + "
                     f"focus on a 56 px crop at 112 px against 224 px; random weights and canvases (timing only), "
                     f"{args.exit_share:.0%} of the images exit after the glance"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", nargs=2, type=Path, metavar=("DATA", "FILE"),
                        help="write DATA's test split to FILE and stop (run where the task's data is)")
    parser.add_argument("--export-count", type=int, default=1024, help="test images to export")
    parser.add_argument("--backbone-shape", action="store_true",
                        help="time the pretrained-backbone cascade's shape instead (ViT-S/14, random weights)")
    parser.add_argument("--exit-share", type=float, default=0.45,
                        help="--backbone-shape: the share of images leaving after the glance")
    parser.add_argument("--backbone-images", type=int, default=1024, help="--backbone-shape: random canvases")
    parser.add_argument("--models", type=Path, help="directory with glance/, focus/, full/ model.pt")
    parser.add_argument("--images", type=Path, help="the exported test split (.npz)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--threshold", type=float, default=THRESHOLD)
    parser.add_argument("--batch-sizes", default="1,64,256,1024,4096")
    parser.add_argument("--passes-images", type=int, default=2048,
                        help="images per timed pass (at least 4 batches; the split is tiled where smaller)")
    parser.add_argument("--batch1-images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="add the compiled and captured forms")
    parser.add_argument("--compile-batch-sizes", default="64,1024,4096",
                        help="the batch sizes that time the compiled forms (each compiles once per size)")
    parser.add_argument("--profile", default="",
                        help="batch sizes (comma-separated) at which to profile the eager dense and every-stage "
                             "forms' kernels (CUDA only), written beside --out")
    parser.add_argument("--capacity", type=float, default=None,
                        help="the focus's share of each batch in the within-capacity form (default: the share the "
                             "glance leaves undecided on these images + --capacity-margin)")
    parser.add_argument("--capacity-margin", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--plot-only", action="store_true", help="redraw --out's plot from its JSON and stop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "dvt_focus_gpu.json")
    args = parser.parse_args()
    if args.export:
        export(*args.export, args.export_count)
        return
    if args.plot_only:
        if not args.out.is_file():
            parser.error(f"--plot-only: no results at {args.out}; run the benchmark first")
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        print(f"wrote {args.out.with_suffix('.png')}")
        return
    if args.backbone_shape:
        if not 0.0 <= args.exit_share < 1.0:
            parser.error(f"--exit-share must lie in [0, 1), got {args.exit_share}")
    elif args.models is None or args.images is None:
        parser.error("give --models and --images (or --backbone-shape, or --export DATA FILE)")
    else:
        for name in ("glance", "focus", "full"):
            if not (args.models / name / "model.pt").is_file():
                parser.error(f"no {args.models / name / 'model.pt'}: copy the trained models there (see the "
                             "docstring)")
        if not args.images.is_file():
            parser.error(f"no images file {args.images}: make it with --export DATA FILE")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device here: run on a GPU host or pass --device cpu")
    try:
        batch_sizes = [int(value) for value in args.batch_sizes.split(",")]
        compile_sizes = {int(value) for value in args.compile_batch_sizes.split(",")}
    except ValueError:
        parser.error("--batch-sizes and --compile-batch-sizes must be integers separated by commas")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[args.dtype]
    gpu = device.type == "cuda"

    setup = (backbone_setup if args.backbone_shape else trained_setup)(args, device, dtype)
    cascade, dense, images, labels = setup["cascade"], setup["dense"], setup["images"], setup["labels"]
    cascade.set_thresholds([setup["threshold"]])
    limits = (setup["threshold"],)

    def every_stage(batch: Tensor):  # noqa: ANN202 - a CascadeOutput
        return cascade.forward_every_stage(batch, limits)

    def early_exit(batch: Tensor):  # noqa: ANN202 - a CascadeOutput
        return cascade(batch, limits)

    with torch.no_grad():  # the focus's capacity: the share of images undecided after the glance, + a margin
        undecided = torch.cat([early_exit(images[i:i + 256]).exit_stage for i in range(0, images.shape[0], 256)])
    capacity = args.capacity if args.capacity is not None else min(1.0, float((undecided >= 1).float().mean())
                                                                    + args.capacity_margin)

    def within_capacity(batch: Tensor):  # noqa: ANN202 - a CascadeOutput
        return cascade.forward_within_capacity(batch, (capacity,), limits)

    forms: dict[str, Callable[[Tensor], object]] = {"dense eager": dense, "early exit eager": early_exit,
                                                    "every stage eager": every_stage,
                                                    "within capacity eager": within_capacity}
    errors: dict[str, str] = {}
    if gpu:
        forms["dense captured"] = captured(dense)
        forms["every stage captured"] = captured(every_stage)
        forms["within capacity captured"] = captured(within_capacity)
    if args.compile:
        for name, function in (("dense", dense), ("every stage", every_stage), ("within capacity", within_capacity)):
            compiled = torch.compile(function, dynamic=False, fullgraph=gpu and name != "dense")
            forms[f"{name} compiled"] = captured(compiled) if gpu else compiled
    baseline = "dense captured" if gpu else "dense eager"

    with torch.no_grad():
        macs = {}
        for name, function in (("dense", dense), ("early exit", early_exit), ("every stage", every_stage),
                               ("within capacity", within_capacity)):
            with CostCounter() as cost:
                for start in range(0, images.shape[0], 250):
                    function(images[start:start + 250])
            macs[name] = cost.macs / images.shape[0]
        # answers of every form on the whole split, at batch 64 (the split tiled to whole batches; this also
        # records the captured forms' graphs and compiles the compiled ones for batch 64)
        count = images.shape[0]
        padded = images.repeat(2, 1, 1, 1)[:(count + 63) // 64 * 64]
        reference = torch.cat([logits_of(early_exit(padded[i:i + 64])) for i in range(0, count, 64)])[:count]
        answers = {}
        for name in list(forms):
            try:
                start_time = time.perf_counter()
                logits = torch.cat([logits_of(forms[name](padded[i:i + 64])).clone()
                                    for i in range(0, count, 64)])[:count]
                predicted = logits.argmax(-1)
                answers[name] = {"test_accuracy": None if labels is None else float((predicted == labels).float()
                                                                                    .mean()),
                                 "agrees_with_early_exit": float((predicted == reference.argmax(-1)).float().mean()),
                                 "nan": bool(logits.isnan().any()),
                                 "first_pass_seconds": time.perf_counter() - start_time}
            except Exception:  # a form that cannot run here (e.g. a capture that meets a host sync): recorded
                errors[name] = traceback.format_exc(limit=4)
                del forms[name]
                print(f"[{name}] failed:\n{errors[name]}", file=sys.stderr, flush=True)
    out = {"config": {"device": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu",
                      "setup": setup["setup"], "dtype": args.dtype, "threshold": setup["threshold"],
                      "repeats": args.repeats, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "baseline": baseline, "images": int(images.shape[0]),
                      "timing": "forms interleaved batch by batch, device synchronised around every call; "
                                "speed-up: median over repeats of each repeat's baseline / form ratio"},
           "capacity": capacity,
           "macs_per_image": macs, "mac_ratio": {name: macs["dense"] / macs[name] for name in macs if name != "dense"},
           "answers": answers, "errors": errors, "timings": []}
    print(json.dumps({"macs_per_image": macs, "answers": answers}), flush=True)
    args.out.write_text(json.dumps(out, indent=1))
    for batch_size in batch_sizes:
        count = max(args.batch1_images if batch_size == 1 else args.passes_images, 4 * batch_size)
        tiled = images.repeat((count + images.shape[0] - 1) // images.shape[0], 1, 1, 1)[:count]
        batches = [tiled[i:i + batch_size] for i in range(0, count, batch_size)]
        timed_forms = {name: function for name, function in forms.items()
                       if "compiled" not in name or batch_size in compile_sizes}
        with torch.no_grad():
            for function in timed_forms.values():  # record graphs / compile for this batch size outside the clock
                function(batches[0])
        seconds = time_forms(timed_forms, batches, args.repeats)
        entry = {"batch_size": batch_size, "images": count, "ms_per_pass": {}, "speedup_vs_baseline": {}}
        for name, values in seconds.items():
            ratios = [base / value for base, value in zip(seconds[baseline], values)]
            entry["ms_per_pass"][name] = summary([1e3 * value for value in values])
            entry["speedup_vs_baseline"][name] = summary(ratios)
        out["timings"].append(entry)
        args.out.write_text(json.dumps(out, indent=1))
        print(f"batch {batch_size}: " + ", ".join(f"{name} {entry['ms_per_pass'][name]['median']:.2f} ms "
                                                  f"({entry['speedup_vs_baseline'][name]['median']:.2f}x)"
                                                  for name in timed_forms), flush=True)
    for batch_size in [int(value) for value in args.profile.split(",") if value] if gpu else []:
        batch = images.repeat(1 + batch_size // images.shape[0], 1, 1, 1)[:batch_size]
        profile_forms({name: forms[name] for name in ("dense eager", "every stage eager", "early exit eager")},
                      batch, args.out.with_name(f"{args.out.stem}_profile_{batch_size}.txt"))
    plot(out, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
