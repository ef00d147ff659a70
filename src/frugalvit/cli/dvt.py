"""`frugalvit dvt`: train a DVT cascade, calibrate its exit thresholds for a budget, evaluate it.

    frugalvit dvt data --out DATA                     # the scaled-digits task (real images), cached, resumable
    frugalvit dvt data --write-sources SRC.npz        # its digits and decoded backgrounds in one file; then, on a
    frugalvit dvt data --sources SRC.npz --out DATA   # machine without PyAV: the same chunks (--workers N)
    frugalvit dvt train --data mnist --out RUN        # joint training, resumable (--data DATA for the task)
    frugalvit dvt train --kind glance-focus --data DATA --out RUN   # glance, box locator, focus on the crops
    frugalvit dvt calibrate RUN --budget 8M           # thresholds for <= 8M mean MACs per image
    frugalvit dvt eval RUN                            # accuracy, mean MACs, exit shares on the test split

A run directory holds `config.json` (model, data and training settings),
`checkpoint.pt` (per epoch, for resuming), `model.pt` (final weights),
`calibration.npz` and `thresholds.json`. Every file is written atomically.

train, calibrate and eval take `--device` (default: cuda if available) and
`--dtype`. Training keeps float32 weights: bfloat16/float16 train in mixed
precision (torch.autocast). Calibration and evaluation cast the model and the
images to the dtype; calibrate in the dtype you evaluate in.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from frugalvit.cli.options import add_device_arguments, describe, device_report, resolve_device_dtype
from frugalvit.cli.runs import start_run
from frugalvit.ioutil import atomic_file, check_output_dir, read_json, write_json_atomically

CONFIG_NAME, MODEL_NAME, THRESHOLDS_NAME, CALIBRATION_NAME = "config.json", "model.pt", "thresholds.json", \
    "calibration.npz"
_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9}


def parse_macs(text: str) -> float:
    """'8e6', '8M', '1.5G' -> MACs."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kKmMgG]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a MAC count: {text!r} (examples: 8e6, 8M, 1.5G)")
    return float(match.group(1)) * _SUFFIXES[match.group(2).lower()]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from error


def _capacities(text: str) -> str | tuple[float, ...]:
    return "auto" if text.strip() == "auto" else _float_list(text)


AUTO_CAPACITY_MARGIN = 0.05


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, "restore it, or remake the run with frugalvit dvt train / calibrate")


def _positive_batch(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")


def _check_labels(data: Any, record: dict[str, Any], spec: str) -> None:
    """Labels the run's classifier can give: a data set with more classes cannot be scored by it."""
    classes = record["model"]["num_classes"]
    largest = max((int(split.labels.max()) for split in (data.train, data.val, data.test) if len(split)), default=-1)
    if largest >= classes:
        raise ValueError(f"{spec} has labels up to {largest}, but this run's model has {classes} classes; evaluate "
                         "it on data of its own task (the --data it was trained on)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dvt", help="Dynamic Vision Transformer cascades: train, calibrate, eval",
                                   description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="dvt_command", required=True, metavar="ACTION")

    data = commands.add_parser("data", help="generate the scaled-digits task (MNIST digits of widely varying size "
                                            "on real video backgrounds), seeded, cached in chunks; resumable")
    data.add_argument("--out", type=Path, help="data directory (an existing one resumes)")
    data.add_argument("--canvas", type=int, default=112, help="image side in pixels (default 112)")
    data.add_argument("--counts", type=_int_list, default=(8000, 2000, 2000),
                      help="images per split: train,val,test (default 8000,2000,2000)")
    data.add_argument("--min-size", type=int, default=10, help="smallest digit box side in pixels (default 10)")
    data.add_argument("--max-size", type=int, default=None, help="largest digit box side (default: canvas - 8)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--chunk-size", type=int, default=500)
    data.add_argument("--clips", default="bigbuckbunny,bikes,carphone_pristine",
                      help="bundled clips giving the backgrounds (comma-separated)")
    data.add_argument("--splits", type=lambda text: tuple(part for part in text.split(",") if part),
                      default=("train", "val", "test"), help="which splits to make (default train,val,test)")
    data.add_argument("--workers", type=int, default=1, help="processes making chunks (default 1)")
    data.add_argument("--sources", type=Path, default=None,
                      help="read the digits and backgrounds from a --write-sources file (no PyAV or MNIST package "
                           "needed, e.g. on a GPU host); the chunks are the same")
    data.add_argument("--write-sources", type=Path, default=None, metavar="FILE",
                      help="write the digits and decoded backgrounds of --splits to FILE (.npz) instead of images")
    data.add_argument("--threads", type=int, default=None)
    data.add_argument("--no-progress", action="store_true")
    data.set_defaults(handler=run_data)

    train = commands.add_parser("train", help="train a cascade: DVT stages jointly (sum of the stage losses), or "
                                              "glance and focus (--kind glance-focus); resumable")
    train.add_argument("--kind", choices=("dvt", "glance-focus"), default="dvt",
                       help="dvt: stages with more tokens each, feature and relation reuse (default); glance-focus: a "
                            "small ViT glances at the whole image, a box locator on its tokens finds the object, a "
                            "second small ViT sees a crop sized to it (needs recorded boxes: a `dvt data` directory)")
    train.add_argument("--data", required=True, help="'mnist', a scaled-digits directory (`dvt data`), a directory "
                                                     "of class folders, or a FILE.npz")
    train.add_argument("--out", required=True, type=Path, help="run directory (created; an existing one resumes)")
    train.add_argument("--image-size", type=int, default=None,
                       help="image size for image folders (default 32); MNIST and .npz keep theirs")
    train.add_argument("--patch-sizes", type=_int_list, default=(14, 7, 4),
                       help="one patch size per stage, fewest tokens first (default 14,7,4: 2x2/4x4/7x7 at 28 px)")
    train.add_argument("--stage-image-sizes", type=_int_list, default=None,
                       help="optional per-stage input sizes (e.g. 112,160,224 with patch 16,16,16)")
    train.add_argument("--embed-dim", type=int, default=96)
    train.add_argument("--depth", type=int, default=4)
    train.add_argument("--heads", type=int, default=3)
    train.add_argument("--context-dim", type=int, default=16, help="feature-reuse context width D'")
    train.add_argument("--conv-stem", type=_int_list, default=None,
                       help="channels of a stride-2 conv stem before each stage's tokens, e.g. 16,32,64 "
                            "(default: none for dvt, 16,32,64 for glance-focus)")
    focus = train.add_argument_group("glance-focus (--kind glance-focus)")
    focus.add_argument("--look-size", type=int, default=48, help="both looks' input size in pixels (default 48)")
    focus.add_argument("--look-patch-size", type=int, default=16,
                       help="both looks' patch size (default 16: 3x3 tokens at 48 px behind the conv stem)")
    focus.add_argument("--crop-sides", type=_int_list, default=None,
                       help="the crop sides (image pixels) the focus may use (default 24,32,40,48,56,64,80,96,112 "
                            "at 112 px, scaled to other image sizes)")
    focus.add_argument("--margin", type=float, default=1.2, help="crop side / located object side (default 1.2)")
    focus.add_argument("--box-weight", type=float, default=5.0,
                       help="weight of the locator's L1 box loss beside the glance's cross-entropy (default 5)")
    focus.add_argument("--jitter", type=_float_list, default=(0.05, 0.1),
                       help="focus training crops: centre shift (x side) and log-side scale standard deviations "
                            "(default 0.05,0.1)")
    train.add_argument("--no-feature-reuse", action="store_true")
    train.add_argument("--no-relation-reuse", action="store_true")
    train.add_argument("--epochs", type=int, default=2)
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--max-train-samples", type=int, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_device_arguments(train, "training precision: float32, or mixed precision (torch.autocast) in bfloat16 or "
                                "float16 (with loss scaling); weights, optimiser and model.pt stay float32")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(handler=run_train)

    calibrate = commands.add_parser("calibrate", help="choose exit thresholds for a mean-MACs budget on the "
                                                      "validation split")
    calibrate.add_argument("run", type=Path)
    calibrate.add_argument("--budget", required=True, type=parse_macs, help="mean MACs per image, e.g. 8M or 8e6")
    calibrate.add_argument("--data", default=None, help="override the run's data set")
    calibrate.add_argument("--batch-size", type=int, default=256)
    calibrate.add_argument("--threads", type=int, default=None)
    add_device_arguments(calibrate, "model and image dtype of the calibration pass; the confidences depend on it, "
                                    "so calibrate in the dtype you evaluate in")
    calibrate.add_argument("--no-progress", action="store_true")
    calibrate.set_defaults(handler=run_calibrate)

    evaluate = commands.add_parser("eval", help="early-exit inference on the test split: accuracy, mean MACs, "
                                                "exit shares")
    evaluate.add_argument("run", type=Path)
    evaluate.add_argument("--split", choices=("test", "val"), default="test")
    evaluate.add_argument("--thresholds", type=_float_list, default=None,
                          help="override the calibrated thresholds, e.g. 0.9,0.95 (1.0 = never exit)")
    evaluate.add_argument("--capacities", type=_capacities, default=None,
                          help="evaluate early exit with static shapes (forward_within_capacity, the GPU form): "
                               "the share of each batch that runs each later stage, e.g. 0.6 (one per stage after "
                               "the first), or 'auto': the calibrated share reaching each stage + 0.05")
    evaluate.add_argument("--data", default=None, help="override the run's data set")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--threads", type=int, default=None)
    add_device_arguments(evaluate, "model and image dtype of the evaluation")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(handler=run_eval)


def _threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def _load_data(spec: str, image_size: int | None):
    from frugalvit.data import load_dataset
    from frugalvit.tasks import is_scaled_digits, load_scaled_digits

    if is_scaled_digits(Path(spec)):
        return load_scaled_digits(Path(spec))  # uint8 images: batches go through cascade.prepare_input
    if image_size is not None and image_size < 1:
        raise ValueError(f"--image-size must be >= 1 pixel, got {image_size}")
    return load_dataset(spec, image_size or 32)


def run_data(args: argparse.Namespace) -> int:
    from frugalvit.tasks import SPLITS, ScaledDigitsConfig, build_scaled_digits, save_sources

    if (args.out is None) == (args.write_sources is None):
        raise ValueError("give --out DIR (make the data set) or --write-sources FILE (write its sources), one of them")
    unknown = [split for split in args.splits if split not in SPLITS]
    if unknown or not args.splits:
        raise ValueError(f"--splits: choose among {','.join(SPLITS)}, got {','.join(args.splits) or 'nothing'}")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.sources is not None and not args.sources.is_file():
        raise ValueError(f"--sources {args.sources}: no such file; write one with: frugalvit dvt data "
                         f"--write-sources {args.sources}")
    _threads(args)
    config = ScaledDigitsConfig(canvas=args.canvas, min_size=args.min_size,
                                max_size=args.max_size if args.max_size is not None else args.canvas - 8,
                                counts=args.counts, seed=args.seed, chunk_size=args.chunk_size,
                                clips=tuple(part for part in args.clips.split(",") if part))
    if args.write_sources is not None:
        check_output_dir(args.write_sources.parent, (args.write_sources.name,), option="--write-sources")
        save_sources(args.write_sources, config, splits=args.splits)
        print(f"{args.write_sources}: digits and backgrounds of {', '.join(args.splits)}; make the data anywhere "
              f"with: frugalvit dvt data --sources {args.write_sources} --out DIR (same options)")
        return 0
    check_output_dir(args.out)
    build_scaled_digits(args.out, config, progress=not args.no_progress, sources=args.sources, splits=args.splits,
                        workers=args.workers)
    made = ", ".join(f"{s} {c}" for s, c in zip(SPLITS, config.counts) if s in args.splits)
    print(f"{args.out}: scaled-digits, {made} images of "
          f"3x{config.canvas}x{config.canvas}; next: frugalvit dvt train --data {args.out} --out RUN "
          f"--stage-image-sizes 48,80,{config.canvas} --patch-sizes 16,16,16 --conv-stem 16,32,64 "
          f"(or --kind glance-focus)")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from frugalvit.dvt import DVTConfig, cascade_loss
    from frugalvit.training import TrainConfig, save_atomically, train

    check_output_dir(args.out, (CONFIG_NAME, MODEL_NAME))
    _threads(args)
    device, amp_dtype = resolve_device_dtype(args)
    train_config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               max_train_samples=args.max_train_samples)
    if args.kind == "glance-focus":
        return _train_glance_focus(args, train_config, device, amp_dtype)
    data = _load_data(args.data, args.image_size)
    channels, height, width = data.image_shape
    if height != width:
        raise ValueError(f"{args.data}: images are {height}x{width}; DVT here needs square images")
    model_config = DVTConfig(image_size=height, patch_sizes=args.patch_sizes, image_sizes=args.stage_image_sizes,
                             in_chans=channels, num_classes=data.num_classes, embed_dim=args.embed_dim,
                             depth=args.depth, num_heads=args.heads, context_dim=args.context_dim,
                             conv_stem=args.conv_stem or (), feature_reuse=not args.no_feature_reuse,
                             relation_reuse=not args.no_relation_reuse)
    record = {"model": model_config.to_dict(), "data": args.data, "image_size": args.image_size,
              "train": asdict(train_config)}
    cascade = _fresh_cascade(model_config, args, record, device, amp_dtype)
    print(f"stages: token grids {' / '.join(f'{g}x{g}' for g in model_config.grids)}, "
          f"cumulative MACs per image {', '.join(f'{m / 1e6:.2f}M' for m in cascade.stage_macs())}")
    train(cascade, data.train, train_config, args.out, progress=not args.no_progress, loss_fn=cascade_loss,
          amp_dtype=amp_dtype)
    save_atomically(cascade.state_dict(), args.out / MODEL_NAME)
    _report_validation(cascade, data, device, amp_dtype, args.out)
    return 0


def _fresh_cascade(model_config: Any, args: argparse.Namespace, record: dict[str, Any], device: torch.device,
                   amp_dtype: torch.dtype | None) -> Any:
    """The untrained cascade drawn from --seed, on the device (a resumed run then loads its checkpoints over these
    weights), and the run directory started (or checked, to resume): only once the model builds, so a setting it
    refuses leaves no directory behind."""
    torch.manual_seed(args.seed)
    cascade = model_config.build().to(device)
    start_run(args.out, record, device, amp_dtype, CONFIG_NAME)
    print(f"training on {describe(device, amp_dtype)}")
    return cascade


def _report_validation(cascade: Any, data: Any, device: torch.device, amp_dtype: torch.dtype | None,
                       run: Path) -> None:
    """Each stage's accuracy on the validation split (every stage on every image), and what to run next."""
    from frugalvit.training import mixed_precision

    with torch.no_grad(), mixed_precision(device, amp_dtype):
        stage_logits = [torch.cat(parts) for parts in zip(*(
            cascade.forward_all(cascade.prepare_input(data.val.images[i:i + 256]))
            for i in range(0, len(data.val), 256)))]
    labels = data.val.labels.to(device)
    accuracies = [(logits.argmax(-1) == labels).float().mean().item() for logits in stage_logits]
    print("validation accuracy per stage: " + ", ".join(f"{100 * a:.2f}%" for a in accuracies))
    print(f"saved {run / MODEL_NAME}; next: frugalvit dvt calibrate {run} --budget MACS")


def _train_glance_focus(args: argparse.Namespace, train_config: Any, device: torch.device,
                        amp_dtype: torch.dtype | None) -> int:
    """`dvt train --kind glance-focus`: the glance and its box locator, then the focus on the glance's crops."""
    from frugalvit.dvt.glance_training import GlanceFocusConfig, train_glance_focus
    from frugalvit.tasks import is_scaled_digits, load_scaled_digits, load_split_arrays
    from frugalvit.training import save_atomically

    if not is_scaled_digits(Path(args.data)):
        raise ValueError(f"--kind glance-focus trains its locator on recorded object boxes: give a scaled-digits "
                         f"directory (frugalvit dvt data --out DIR), got {args.data}")
    if len(args.jitter) != 2 or min(args.jitter) < 0:
        raise ValueError(f"--jitter takes two standard deviations >= 0 (centre, log side), got {list(args.jitter)}")
    if args.box_weight < 0:
        raise ValueError(f"--box-weight must be >= 0, got {args.box_weight}")
    data = load_scaled_digits(Path(args.data))
    channels, height, width = data.image_shape
    crop_sides = args.crop_sides or tuple(sorted({max(1, round(side * height / 112)) for side in
                                                  GlanceFocusConfig.crop_sides}))
    model_config = GlanceFocusConfig(image_size=height, look_size=args.look_size, patch_size=args.look_patch_size,
                                     in_chans=channels, num_classes=data.num_classes, embed_dim=args.embed_dim,
                                     depth=args.depth, num_heads=args.heads,
                                     conv_stem=(16, 32, 64) if args.conv_stem is None else args.conv_stem,
                                     crop_sides=crop_sides, margin=args.margin)
    arrays = load_split_arrays(Path(args.data), "train")
    boxes = torch.from_numpy(np.stack([arrays[key] for key in ("top", "left", "size")], axis=1))
    record = {"kind": "glance-focus", "model": model_config.to_dict(), "data": args.data, "image_size": None,
              "train": asdict(train_config), "box_weight": args.box_weight, "jitter": list(args.jitter)}
    cascade = _fresh_cascade(model_config, args, record, device, amp_dtype)
    print(f"looks: {model_config.grid}x{model_config.grid} tokens at {model_config.look_size} px each; cumulative "
          f"MACs per image {', '.join(f'{m / 1e6:.2f}M' for m in cascade.stage_macs())}")
    train_glance_focus(cascade, data.train, boxes, train_config, args.out, box_weight=args.box_weight,
                       jitter=tuple(args.jitter), progress=not args.no_progress, amp_dtype=amp_dtype,
                       on_phase=lambda name: print(f"phase: {name}", flush=True))
    save_atomically(cascade.state_dict(), args.out / MODEL_NAME)
    _report_validation(cascade, data, device, amp_dtype, args.out)
    return 0


def load_run(run: Path):
    """The trained cascade and the recorded settings of a run directory."""
    from frugalvit.dvt import DVTConfig

    config_path, model_path = run / CONFIG_NAME, run / MODEL_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{run}: no {CONFIG_NAME}; create the run with: frugalvit dvt train --out {run}")
    if not model_path.is_file():
        raise FileNotFoundError(f"{run}: no trained model ({MODEL_NAME}); finish training with "
                                f"`frugalvit dvt train` and the same options")
    record = _read_json(config_path)
    if record.get("kind", "dvt") == "glance-focus":
        from frugalvit.dvt.glance_training import GlanceFocusConfig

        cascade = GlanceFocusConfig.from_dict(record["model"]).build()
    else:
        cascade = DVTConfig.from_dict(record["model"]).build()
    try:
        cascade.load_state_dict(torch.load(model_path, map_location="cpu"))
    except Exception as error:  # not a state dict, damaged, or another run's weights: name the file, not pickle's words
        raise ValueError(f"{model_path} is not this run's trained model ({str(error).splitlines()[0][:200]}); train "
                         f"it again with frugalvit dvt train --out {run} and the options in {config_path}") from None
    return cascade.eval(), record


def run_calibrate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    _threads(args)
    _positive_batch(args)
    device, dtype = resolve_device_dtype(args)
    cascade, record = load_run(args.run)
    cascade.to(device, dtype)
    first = cascade.stage_macs()[0]
    if args.budget < first:
        raise ValueError(f"budget {args.budget:.4g} MACs is below the first stage's cost {first:.4g} MACs per image; "
                         f"raise it to at least {first / 1e6:.3f}M")
    data = _load_data(args.data or record["data"], record.get("image_size"))
    _check_labels(data, record, args.data or record["data"])
    calibration = cascade.calibrate(data.val.images, data.val.labels, args.batch_size, progress=not args.no_progress)
    with tqdm(total=1, desc="threshold search", disable=args.no_progress) as bar:  # exact search: can take a while
        result = cascade.set_budget(args.budget)
        bar.update()
    with atomic_file(args.run / CALIBRATION_NAME) as handle:
        np.savez(handle, confidence=calibration.confidence, correct=calibration.correct,
                 stage_macs=np.asarray(calibration.stage_macs))
    write_json_atomically({"budget_macs": args.budget, "thresholds": list(result.thresholds),
                           "val_accuracy": result.accuracy, "val_mean_macs": result.mean_macs,
                           "val_exit_fractions": list(result.exit_fractions),
                           "stage_macs": list(calibration.stage_macs), **device_report(device, dtype)},
                          args.run / THRESHOLDS_NAME)
    print(f"thresholds {', '.join(f'{t:.6f}' for t in result.thresholds)} for <= {args.budget / 1e6:.3f}M MACs: "
          f"validation accuracy {100 * result.accuracy:.2f}% at {result.mean_macs / 1e6:.3f}M mean MACs "
          f"(all stages: {calibration.stage_macs[-1] / 1e6:.3f}M), on {describe(device, dtype)}")
    print(f"saved {args.run / THRESHOLDS_NAME}; next: frugalvit dvt eval {args.run}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from frugalvit.cost import CostCounter

    _threads(args)
    _positive_batch(args)
    device, dtype = resolve_device_dtype(args)
    cascade, record = load_run(args.run)
    cascade.to(device, dtype)
    calibrated = _read_json(args.run / THRESHOLDS_NAME) if (args.run / THRESHOLDS_NAME).is_file() else None
    if args.thresholds is not None:
        cascade.set_thresholds(args.thresholds)
        source = "given"
    elif calibrated is not None:
        cascade.set_thresholds(calibrated["thresholds"])
        source = "calibrated"
    else:
        source = "none calibrated: every sample runs every stage"
    capacities = args.capacities
    if capacities == "auto":
        if calibrated is None or args.thresholds is not None:
            raise ValueError("--capacities auto takes the calibrated shares reaching each stage: run frugalvit dvt "
                             f"calibrate {args.run} first (without --thresholds), or give the shares, e.g. 0.6")
        from frugalvit.dvt import ExitResult

        capacities = ExitResult(tuple(calibrated["thresholds"]), calibrated["val_accuracy"],
                                calibrated["val_mean_macs"], tuple(calibrated["val_exit_fractions"])
                                ).capacities(AUTO_CAPACITY_MARGIN)
    if capacities is not None and (len(capacities) != cascade.num_stages - 1
                                   or not all(0.0 < share <= 1.0 for share in capacities)):
        raise ValueError(f"--capacities: give {cascade.num_stages - 1} shares in (0, 1], one per stage after the "
                         f"first, got {','.join(map(str, capacities))}")
    thresholds = tuple(cascade.thresholds.tolist())
    data = _load_data(args.data or record["data"], record.get("image_size"))
    _check_labels(data, record, args.data or record["data"])
    split = getattr(data, args.split)
    stage_macs = cascade.stage_macs()
    exits, correct, macs = [], 0, 0
    with torch.no_grad():
        for start in tqdm(range(0, len(split), args.batch_size), desc="eval", disable=args.no_progress):
            images = cascade.prepare_input(split.images[start:start + args.batch_size])  # as calibrate does
            labels = split.labels[start:start + args.batch_size].to(device)
            with CostCounter() as cost:
                out = cascade(images, thresholds) if capacities is None else \
                    cascade.forward_within_capacity(images, capacities, thresholds)
            macs += cost.macs
            correct += int((out.logits.argmax(-1) == labels).sum())
            exits.append(out.exit_stage)
    stages = torch.cat(exits)
    shares = torch.bincount(stages, minlength=cascade.num_stages).float() / len(split)
    print(f"thresholds ({source}): {', '.join(f'{t:.6f}' for t in thresholds)}")
    if capacities is not None:
        stages = "stage 2" if cascade.num_stages == 2 else f"stages 2-{cascade.num_stages}"
        print(f"early exit with static shapes: {stages} run on at most {', '.join(f'{c:.3f}' for c in capacities)} "
              f"of each batch (the least confident first; MACs counted as run)")
    print(f"{args.split} accuracy {100 * correct / len(split):.2f}% over {len(split)} images, "
          f"on {describe(device, dtype)}")
    print(f"mean MACs per image {macs / len(split) / 1e6:.3f}M (counted), all stages {stage_macs[-1] / 1e6:.3f}M")
    print("exits per stage: " + ", ".join(f"stage {k + 1} {100 * s:.1f}%" for k, s in enumerate(shares.tolist())))
    return 0
