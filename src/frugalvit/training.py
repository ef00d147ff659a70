"""A small supervised training loop with progress bars, atomic checkpoints and resume.

Shared by the commands that train (DVT cascades, EcoFormer fine-tuning, the
project's small ViTs). The loss is a function argument, so a cascade can sum
its stage losses and a plain classifier use one cross-entropy.

Batches follow the model: they are moved to its device (and dtype) one at a
time, so a data set can stay on the CPU. Training keeps float32 weights;
`amp_dtype` runs the forward pass and loss in bfloat16 or float16 under
`torch.autocast` (mixed precision, with loss scaling for float16).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from frugalvit.data import Split, model_input
from frugalvit.ioutil import atomic_file
from frugalvit.timing import model_device_dtype

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
CHECKPOINT_NAME = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; AdamW with linear warm-up and cosine decay."""

    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    seed: int = 0
    max_train_samples: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "warmup_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples must be None (all) or >= 1, got {self.max_train_samples}")


def cross_entropy_loss(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """Plain classification loss for a model returning logits."""
    return nn.functional.cross_entropy(model(images), labels)


def save_atomically(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename: no half-written file on interruption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as handle:
        torch.save(obj, handle)


def mixed_precision(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """`torch.autocast` to `dtype` on `device` (mixed precision); nothing for None or float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train(model: nn.Module, data: Split, config: TrainConfig, run_dir: Path | None = None,
          loss_fn: LossFn = cross_entropy_loss, progress: bool = True,
          on_epoch_end: Callable[[int], None] | None = None, amp_dtype: torch.dtype | None = None,
          depends_on: dict[str, Any] | None = None) -> nn.Module:
    """Train `model` in place on `data`, on the model's device; with `run_dir`, checkpoint every epoch and resume.

    `on_epoch_end(epoch)` runs after each epoch (e.g. to re-fit hash functions).
    The weights must be float32 (half-precision weights lose the small updates);
    `amp_dtype` (torch.bfloat16 or torch.float16) trains in mixed precision.
    A checkpoint resumes only for the same `config` and data (a fingerprint of
    `data`), and the same `depends_on`: what else the loss reads (JSON-able,
    e.g. a fingerprint of the targets a `loss_fn` looks up by row).
    """
    device, weight_dtype = model_device_dtype(model)
    if weight_dtype != torch.float32:
        raise ValueError(f"training needs float32 weights, got {str(weight_dtype).removeprefix('torch.')}: keep "
                         f"the model in float32 and pass amp_dtype={weight_dtype} for mixed precision")
    if amp_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"amp_dtype must be torch.bfloat16, torch.float16 or None, got {amp_dtype}")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    data = data.subset(config.max_train_samples)
    if len(data) == 0:
        raise ValueError("no training samples: the split is empty")
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, total_steps, config.warmup_steps))
    start_epoch = 0
    checkpoint_path = run_dir / CHECKPOINT_NAME if run_dir is not None else None
    identity = {"config": asdict(config), "data": data_fingerprint(data)}  # what a checkpoint must match to resume
    if depends_on is not None:
        identity["depends_on"] = depends_on
    if checkpoint_path is not None and checkpoint_path.is_file():
        state = _load_checkpoint(checkpoint_path, identity)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"]
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.epochs):
        order = torch.randperm(len(data), generator=generator)  # drawn every epoch so resume sees the same order
        if epoch < start_epoch:
            continue
        model.train()
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress)
        for step in bar:
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            images, labels = model_input(data.images[index], device, weight_dtype), data.labels[index].to(device)
            with mixed_precision(device, amp_dtype):
                loss = loss_fn(model, images, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scale = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(optimizer)
            scaler.update()
            if scale is None or scaler.get_scale() >= scale:  # float16: a step skipped for overflow keeps its lr
                schedule.step()
            if step % 50 == 0 or step == steps_per_epoch - 1:  # reading the loss waits for the device
                bar.set_postfix(loss=f"{loss.item():.3f}")
        model.eval()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if checkpoint_path is not None:
            save_atomically({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "schedule": schedule.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch + 1,
                             **identity},
                            checkpoint_path)
    model.eval()
    return model


def data_fingerprint(data: Split) -> dict[str, float]:
    """A cheap summary of a training split (size, label sum, the first images' pixel sum): a checkpoint made on
    other data does not match it."""
    head = data.images[:64]
    return {"images": len(data), "label_sum": int(data.labels.sum()), "pixel_sum_first_64": float(head.double().sum())}


def _same_identity(saved: Any, current: Any) -> bool:
    """Equal settings, or the same data: counts exactly, the pixel sum to float rounding (training inputs computed
    on another device or with other threads, e.g. the crops a glance makes, differ in their last bits)."""
    if isinstance(saved, dict) and "pixel_sum_first_64" in saved and isinstance(current, dict):
        rest = {key: value for key, value in saved.items() if key != "pixel_sum_first_64"}
        return (rest == {key: value for key, value in current.items() if key != "pixel_sum_first_64"}
                and math.isclose(saved["pixel_sum_first_64"], current.get("pixel_sum_first_64", math.nan),
                                 rel_tol=1e-4, abs_tol=1e-3))
    return saved == current


def _load_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The training state in `path`, if it belongs to this training (same settings, same data): resuming from
    another run's checkpoint would silently continue, or return, that run's model."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, not a checkpoint: name the file, not pickle's words
        raise ValueError(f"{path} is not a readable training checkpoint ({str(error).splitlines()[0][:200]}); "
                         "delete it to train from the start") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "schedule", "epoch"} <= state.keys():
        raise ValueError(f"{path} is not a frugalvit training checkpoint; delete it to train from the start")
    differing = [key for key, value in identity.items() if key in state and not _same_identity(state[key], value)]
    if differing:  # (checkpoints of older versions carry no data fingerprint: those resume as before)
        raise ValueError(f"{path} belongs to a training with other {' and '.join(differing)} (it has "
                         f"{'; '.join(f'{key} {state[key]}' for key in differing)}); use a new output directory, "
                         "or the same options and data to resume it")
    return state


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Logits of `model` over `images`, in batches moved to the model's device and dtype, in eval mode."""
    if batch_size < 1 or len(images) == 0:
        raise ValueError(f"predict needs images (got {len(images)}) and a batch size >= 1 (got {batch_size})")
    model.eval()
    device, dtype = model_device_dtype(model)
    return torch.cat([model(model_input(images[start:start + batch_size], device, dtype))
                      for start in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, data: Split, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model` on `data` (run on the model's device and in its dtype)."""
    logits = predict(model, data.images, batch_size)
    return (logits.argmax(-1) == data.labels.to(logits.device)).float().mean().item()
