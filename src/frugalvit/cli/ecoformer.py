"""`frugalvit ecoformer finetune`: softmax ViT -> EcoFormer ViT -> fitted hashes -> short fine-tune -> report.

Runs on CPU for the project's small ViT, or on `--device cuda`. Every stage
writes into `--out` atomically (training checkpoints resume after an
interruption), and the run ends with `results.json`: test accuracy and counted
energy of both models, and the device, dtype and torch version they ran with.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import asdict
from pathlib import Path

import torch

from frugalvit.cli.main import UsageError
from frugalvit.cli.options import (add_device_arguments, describe, device_report, resolve_device_dtype,
                                   training_precision)
from frugalvit.cli.runs import start_run
from frugalvit.data import load_dataset
from frugalvit.ecoformer import ecoformer, ecoformer_layers, fit_hashes
from frugalvit.ecoformer.attention import NORMALISERS
from frugalvit.ecoformer.cost import (hashed_attention_counted, hashed_attention_elementwise, model_energy,
                                      softmax_attention_counted, softmax_attention_elementwise)
from frugalvit.ioutil import check_output_dir, write_json_atomically
from frugalvit.models import checkpoint_kind, small_vit
from frugalvit.timing import Stopwatch, timed
from frugalvit.training import TrainConfig, accuracy, mixed_precision, save_atomically, train

# What an --out run is: resuming it with other values of these would return the earlier run's models
RUN_SETTINGS = ("image_size", "patch_size", "teacher_epochs", "teacher_samples", "bits", "anchors", "normaliser",
                "bias", "calibration_images", "top_l", "fit_iterations", "epochs", "train_samples", "lr",
                "batch_size", "refit_every", "control", "seed")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ecoformer", help="EcoFormer hashed linear attention: the finetune pipeline",
                                   description="EcoFormer hashed linear attention. One action, finetune: train (or "
                                               "load) a softmax small ViT, convert it, fit the hashes, fine-tune, "
                                               "report accuracy and energy. Conversion and fitting on their own are "
                                               "library calls: frugalvit.ecoformer(model), frugalvit.fit_hashes.")
    commands = parser.add_subparsers(dest="ecoformer_command", required=True, metavar="ACTION")
    run = commands.add_parser("finetune", help="softmax ViT -> EcoFormer -> fitted hashes -> fine-tune, with energy")
    run.add_argument("--data", required=True, help="'mnist', a directory of class folders, or FILE.npz")
    run.add_argument("--out", required=True, type=Path, help="run directory (checkpoints, results.json)")
    run.add_argument("--teacher", type=Path, help="checkpoint of a trained softmax small ViT (else one is trained)")
    run.add_argument("--image-size", type=int, default=28, help="image side for folder data (default 28)")
    run.add_argument("--patch-size", type=int, default=7, help="ViT patch size (default 7: 16 tokens at 28 px)")
    run.add_argument("--teacher-epochs", type=int, default=3)
    run.add_argument("--teacher-samples", type=int, default=20000, help="training images for the teacher")
    run.add_argument("--bits", type=int, default=16)
    run.add_argument("--anchors", type=int, default=25)
    run.add_argument("--normaliser", choices=NORMALISERS, default="consistent")
    run.add_argument("--bias", type=float, help="similarity offset, > bits (default bits + 1)")
    run.add_argument("--calibration-images", type=int, default=256, help="validation images used to fit hashes")
    run.add_argument("--top-l", type=int, help="similar/dissimilar pairs per row (default N // 8)")
    run.add_argument("--fit-iterations", type=int, default=100)
    run.add_argument("--epochs", type=int, default=2, help="fine-tuning epochs")
    run.add_argument("--train-samples", type=int, default=20000, help="training images for fine-tuning")
    run.add_argument("--lr", type=float, default=5e-4, help="fine-tuning learning rate")
    run.add_argument("--batch-size", type=int, default=128)
    run.add_argument("--refit-every", type=int, default=0, metavar="TAU",
                     help="re-fit hashes every TAU fine-tuning epochs (0: never)")
    run.add_argument("--control", action="store_true",
                     help="also fine-tune the softmax model the same way (accuracy control for the extra training)")
    run.add_argument("--test-samples", type=int, help="evaluate on the first N test images (default all)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    add_device_arguments(run, "precision of training and evaluation: float32, or mixed precision (torch.autocast) in "
                              "bfloat16 or float16 (with loss scaling); weights, checkpoints and the hash fit stay "
                              "float32")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.set_defaults(handler=finetune)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise UsageError(f"--{name} must be >= 1, got {value}")


def _load_teacher(path: Path, model: torch.nn.Module) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such teacher checkpoint")
    kind = checkpoint_kind(path)
    if kind.startswith("not "):
        raise UsageError(f"--teacher {path}: {kind}; expected teacher.pt from an earlier finetune run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # unpickling raises many kinds
        raise UsageError(f"--teacher {path}: a {kind} that cannot be read ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200] if str(error) else ''}); expected teacher.pt "
                         "from an earlier finetune run") from error
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UsageError(f"{path}: does not fit this small ViT (check --patch-size/--image-size and the data's "
                         f"channels and classes): {str(error).splitlines()[0]}") from error


def _core_energy(tokens: int, model: torch.nn.Module) -> dict[str, float]:
    """Energy (uJ) of one layer's attention core, projections excluded, with and without element-wise work."""
    layer = next(iter(ecoformer_layers(model).values()))
    shape = (tokens, layer.num_heads, layer.head_dim)
    soft, soft_ew = softmax_attention_counted(*shape), softmax_attention_elementwise(*shape)
    hashed = hashed_attention_counted(*shape, layer.bits, layer.num_anchors, normaliser=layer.normaliser)
    hashed_ew = hashed_attention_elementwise(*shape, layer.bits, layer.num_anchors, normaliser=layer.normaliser)
    return {"softmax_uj": soft.energy_joules() * 1e6, "hashed_uj": hashed.energy_joules() * 1e6,
            "softmax_with_elementwise_uj": (soft.energy_joules() + soft_ew.energy_joules()) * 1e6,
            "hashed_with_elementwise_uj": (hashed.energy_joules() + hashed_ew.energy_joules()) * 1e6}


def finetune(args: argparse.Namespace) -> int:
    for name in ("image_size", "patch_size", "teacher_epochs", "teacher_samples", "calibration_images",
                 "fit_iterations", "epochs", "train_samples", "batch_size", "test_samples", "threads"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.refit_every < 0:
        raise UsageError(f"--refit-every must be >= 0, got {args.refit_every}")
    device, amp_dtype = resolve_device_dtype(args)
    out: Path = args.out
    check_output_dir(out, ("config.json", "results.json", "teacher.pt", "ecoformer.pt"))
    if args.teacher is not None and not args.teacher.is_file():
        raise FileNotFoundError(f"{args.teacher}: no such teacher checkpoint")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    progress = not args.no_progress
    data = load_dataset(args.data, args.image_size, seed=args.seed)
    channels, height, width = data.image_shape
    if height != width or height % args.patch_size:
        raise UsageError(f"images are {height}x{width}: need square images whose side is a multiple of "
                         f"--patch-size {args.patch_size}")
    test = data.test.subset(args.test_samples)
    config = {"image_size": height, "patch_size": args.patch_size, "in_chans": channels,
              "num_classes": data.num_classes}
    tokens = (height // args.patch_size) ** 2 + 1
    if args.top_l is not None and not 1 <= args.top_l <= tokens // 2:  # checked here, not after the teacher trains
        raise UsageError(f"--top-l must lie in [1, {tokens // 2}] for {tokens} tokens, got {args.top_l}")
    finetune_config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  warmup_steps=20, seed=args.seed, max_train_samples=args.train_samples)
    stopwatch = Stopwatch(device)
    print(f"running on {describe(device, amp_dtype)}")

    teacher = small_vit(**config).to(device)
    ecoformer(teacher, bits=args.bits, anchors=args.anchors, bias=args.bias,
              normaliser=args.normaliser)  # bad values fail before any training
    if args.teacher is not None:
        _load_teacher(args.teacher, teacher)
        print(f"teacher: loaded {args.teacher}")
    # only now: bad data or a bad teacher leave no directory behind; an existing run resumes only with the same
    # settings (its checkpoints would otherwise come back as this run's models)
    record = {name: getattr(args, name) for name in RUN_SETTINGS}
    record |= {"data": str(args.data), "teacher": None if args.teacher is None else str(args.teacher)}
    start_run(out, record, device, amp_dtype)
    if args.teacher is None:
        print(f"teacher: training a softmax small ViT ({tokens} tokens) for {args.teacher_epochs} epochs "
              f"on {min(args.teacher_samples, len(data.train))} images")
        train(teacher, data.train, TrainConfig(epochs=args.teacher_epochs, batch_size=args.batch_size, lr=1e-3,
                                               seed=args.seed, max_train_samples=args.teacher_samples),
              out / "teacher", progress=progress, amp_dtype=amp_dtype)
        save_atomically({"model": teacher.state_dict(), "config": config}, out / "teacher.pt")
    teacher.eval()

    def evaluate(model: torch.nn.Module) -> float:
        with mixed_precision(device, amp_dtype):
            return accuracy(model, test)

    teacher_accuracy = evaluate(teacher)
    print(f"teacher test accuracy: {teacher_accuracy:.4f}")

    model = ecoformer(teacher, bits=args.bits, anchors=args.anchors, bias=args.bias, normaliser=args.normaliser)
    calibration = data.val.images[:args.calibration_images]
    _, fit_ms = timed(lambda: fit_hashes(model, calibration, top_l=args.top_l, iterations=args.fit_iterations,
                                         seed=args.seed, progress=progress), device=device)
    fit_seconds = fit_ms / 1e3
    fitted_accuracy = evaluate(model)
    print(f"EcoFormer with fitted hashes, before fine-tuning: test accuracy {fitted_accuracy:.4f} "
          f"(hashes fitted in {fit_seconds:.1f} s)")

    def refit(epoch: int) -> None:
        if args.refit_every and (epoch + 1) % args.refit_every == 0:
            fit_hashes(model, calibration, supervision="tied", warm_start=True, top_l=args.top_l,
                       iterations=args.fit_iterations, seed=args.seed + epoch + 1, progress=progress)

    train(model, data.train, finetune_config, out / "finetune", progress=progress, on_epoch_end=refit,
          amp_dtype=amp_dtype)
    model.eval()
    eco_accuracy = evaluate(model)
    hyper = {"bits": args.bits, "anchors": args.anchors, "normaliser": args.normaliser,
             "bias": next(iter(ecoformer_layers(model).values())).bias}
    save_atomically({"model": model.state_dict(), "config": config, "ecoformer": hyper}, out / "ecoformer.pt")

    control_accuracy = None
    if args.control:
        control = copy.deepcopy(teacher)
        train(control, data.train, finetune_config, out / "control", progress=progress, amp_dtype=amp_dtype)
        control_accuracy = evaluate(control)
        print(f"softmax model fine-tuned the same way (control): test accuracy {control_accuracy:.4f}")

    one = test.images[:1]
    energy_softmax, energy_eco = model_energy(teacher, one), model_energy(model, one)
    attn_saving = 1 - energy_eco["attention_layers_energy_uj"] / energy_softmax["attention_layers_energy_uj"]
    total_saving = 1 - energy_eco["total"]["energy_uj"] / energy_softmax["total"]["energy_uj"]
    results = {
        "data": args.data, "model": {**config, "tokens": tokens, "embed_dim": 192, "depth": 6, "heads": 3},
        "ecoformer": hyper, "threads": args.threads, "test_images": len(test), **device_report(device, amp_dtype),
        "precision": training_precision(amp_dtype),
        "teacher": {"source": str(args.teacher) if args.teacher else "trained in this run",
                    "epochs": None if args.teacher else args.teacher_epochs,
                    "train_images": None if args.teacher else min(args.teacher_samples, len(data.train))},
        "fit": {"calibration_images": len(calibration), "iterations": args.fit_iterations, "top_l": args.top_l,
                "seconds": fit_seconds},
        "finetune": asdict(finetune_config) | {"refit_every": args.refit_every},
        "accuracy": {"softmax": teacher_accuracy, "ecoformer_fitted_before_finetune": fitted_accuracy,
                     "ecoformer_finetuned": eco_accuracy, "difference_points": 100 * (eco_accuracy - teacher_accuracy),
                     "softmax_finetuned_control": control_accuracy},
        "energy_per_image": {"softmax": energy_softmax, "ecoformer": energy_eco,
                             "attention_layers_saving": attn_saving, "total_saving": total_saving,
                             "attention_core_per_layer": _core_energy(tokens, model),
                             "baseline": "the same ViT with softmax attention, counted as executed (matrix products; "
                                         "fused SDPA has the same count)"},
    }
    results["seconds"] = stopwatch.seconds()
    write_json_atomically(results, out / "results.json")
    print(f"test accuracy: softmax {teacher_accuracy:.4f}, EcoFormer {eco_accuracy:.4f} "
          f"({100 * (eco_accuracy - teacher_accuracy):+.2f} points)")
    print(f"energy per image (45 nm, matrix products): attention layers {energy_softmax['attention_layers_energy_uj']:.2f}"
          f" -> {energy_eco['attention_layers_energy_uj']:.2f} uJ ({100 * attn_saving:.1f}% saved), whole model "
          f"{energy_softmax['total']['energy_uj']:.1f} -> {energy_eco['total']['energy_uj']:.1f} uJ "
          f"({100 * total_saving:.1f}% saved)")
    print(f"wrote {out / 'results.json'}")
    return 0
