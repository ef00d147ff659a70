"""Per-sample early exit over a cascade of classifiers, with budget-calibrated thresholds.

`EarlyExitCascade` holds what every cascade shares: the thresholds (a buffer,
saved with the model), the real early-exit `forward` (stage k+1 runs only on
the samples still undecided; the batch is regrouped and the outputs scattered
back in order), per-exit-stage costs counted by `CostCounter`, calibration on a
held-out split and `set_budget`. Subclasses say how to run stage k on a
(sub)batch given what the previous stage handed on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from frugalvit.cost import CostCounter
from frugalvit.data import model_input
from frugalvit.dvt.thresholds import ExitResult, check_thresholds, evaluate_thresholds, search_thresholds


class CascadeOutput(NamedTuple):
    """Logits of the stage each sample exited at, and that stage's index (0-based), in input order."""

    logits: Tensor
    exit_stage: Tensor


@dataclass(frozen=True)
class Calibration:
    """Per-stage confidence and correctness of every sample of a held-out split, and the cost of each exit."""

    confidence: np.ndarray  # (K, N) max softmax per stage
    correct: np.ndarray  # (K, N) bool
    stage_macs: tuple[int, ...]  # cumulative MACs per sample exiting at stage k

    def search(self, budget: float) -> ExitResult:
        return search_thresholds(self.confidence, self.correct, self.stage_macs, budget)

    def evaluate(self, thresholds: Sequence[float]) -> ExitResult:
        return evaluate_thresholds(self.confidence, self.correct, self.stage_macs, thresholds)


def select(carry: Any, keep: Tensor) -> Any:
    """Index every tensor of a nested carry (tuple/list/dict/dataclass-free) along the batch axis; `keep`: a
    boolean mask or row indices."""
    if carry is None:
        return None
    if isinstance(carry, Tensor):
        return carry.index_select(0, keep.nonzero().squeeze(1) if keep.dtype == torch.bool else keep)
    if isinstance(carry, (list, tuple)):
        return type(carry)(select(item, keep) for item in carry)
    if isinstance(carry, dict):
        return {key: select(value, keep) for key, value in carry.items()}
    raise TypeError(f"cannot regroup a carry of type {type(carry).__name__}")


class EarlyExitCascade(nn.Module):
    """Base of the cascades: thresholds, early-exit forward, costs, calibration and budget."""

    thresholds: Tensor
    takes_uint8: bool = False  # subclasses whose stages convert uint8 images themselves (prepare_input) set this

    def __init__(self, num_stages: int, input_shape: Sequence[int]) -> None:
        super().__init__()
        if num_stages < 2:
            raise ValueError(f"a cascade needs at least 2 stages, got {num_stages}")
        self.num_stages = num_stages
        self.input_shape = tuple(int(size) for size in input_shape)
        self.register_buffer("thresholds", torch.ones(num_stages - 1))
        self.calibration: Calibration | None = None

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> "EarlyExitCascade":
        """Move/cast like any module, but keep the thresholds float32: they are compared with float32
        confidences, and bfloat16 would round a calibrated 0.953 to 0.953125."""
        thresholds = self.thresholds
        super()._apply(fn, recurse)
        if self.thresholds.dtype != torch.float32:
            self.thresholds = thresholds.to(self.thresholds.device, torch.float32)
        return self

    # -- what subclasses provide ---------------------------------------------------------------
    def run_stage(self, index: int, images: Tensor, carry: Any, hand_on: bool) -> tuple[Tensor, Any]:
        """Logits of stage `index` on `images` given the previous stage's carry, and its own carry.

        `hand_on` is False for the last stage: nothing runs after it, so it need not export anything.
        """
        raise NotImplementedError

    # -- inference ---------------------------------------------------------------------------
    def check_input(self, images: Tensor) -> None:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(images.shape)}; resize them to the cascade's input size first")

    def prepare_input(self, images: Tensor) -> Tensor:
        """A stored image batch as this cascade's input: on its device and in its dtype (uint8 scaled to
        [0, 1]). Cascades that resize uint8 images themselves (faster on the CPU) keep them uint8."""
        parameter = next(self.parameters())
        if images.dtype == torch.uint8 and self.takes_uint8:
            return images.to(parameter.device)
        return model_input(images, parameter.device, parameter.dtype)

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        """Use these exit thresholds from now on (K-1 values in [0, 1]; 1.0 = never exit at that stage)."""
        values = check_thresholds(thresholds, self.num_stages)
        self.thresholds.copy_(torch.tensor(values, dtype=self.thresholds.dtype))

    def forward_all(self, images: Tensor) -> list[Tensor]:
        """Logits of every stage for every sample (training, calibration)."""
        self.check_input(images)
        outputs, carry = [], None
        for index in range(self.num_stages):
            logits, carry = self.run_stage(index, images, carry, index < self.num_stages - 1)
            outputs.append(logits)
        return outputs

    def forward(self, images: Tensor, thresholds: Sequence[float] | None = None) -> CascadeOutput:
        """Early-exit inference: each sample stops at the first stage whose confidence reaches its threshold.

        Only the samples still undecided run the next stage, so the cost of a
        batch is that of its samples' exits. `thresholds` overrides the stored ones.
        """
        self.check_input(images)
        limits = self._limits(thresholds)
        batch = images.shape[0]
        exit_stage = torch.full((batch,), self.num_stages - 1, dtype=torch.long, device=images.device)
        active = torch.arange(batch, device=images.device)
        result: Tensor | None = None
        carry: Any = None
        for index in range(self.num_stages):
            last = index == self.num_stages - 1
            logits, carry = self.run_stage(index, images, carry, not last)
            if result is None:
                result = logits.new_empty(batch, *logits.shape[1:])
            if last:
                result[active] = logits
                break
            leave = self.exits(logits, limits[index])
            result[active[leave]] = logits[leave]
            exit_stage[active[leave]] = index
            stay = ~leave
            if not bool(stay.any()):
                break
            if not bool(stay.all()):
                # Whole rows by index_select: on the CPU several times faster than a boolean mask's
                # element gather (1.9 against 0.2 ms for 44 of 64 uint8 images of 112 px)
                rows = stay.nonzero().squeeze(1)
                active, images, carry = active.index_select(0, rows), images.index_select(0, rows), select(carry, rows)
        assert result is not None
        return CascadeOutput(result, exit_stage)

    def forward_every_stage(self, images: Tensor, thresholds: Sequence[float] | None = None) -> CascadeOutput:
        """`forward`'s outputs and exit stages without its host round trips: every stage runs on every
        sample, and each sample takes the logits of the first stage confident enough.

        Costs every stage for every sample (`stage_macs()[-1]` each) and saves
        no arithmetic; what it removes is the early exit's reading of each
        decision on the host and its regrouping of the batch. Where small
        models are bound by kernel launches and syncs (a GPU at small sizes)
        that is what costs time, and this form, with stages free of host
        syncs (`GlanceFocusCascade` off the CPU), can be compiled or captured
        whole. Pass `thresholds`: without them the stored ones are read on the
        host, once per call.
        """
        limits = self._limits(thresholds)
        outputs = self.forward_all(images)
        batch = images.shape[0]
        exit_stage = torch.full((batch,), self.num_stages - 1, dtype=torch.long, device=outputs[0].device)
        for index in reversed(range(self.num_stages - 1)):  # the first confident stage wins
            exit_stage = torch.where(self.exits(outputs[index], limits[index]), index, exit_stage)
        logits = torch.stack(outputs)[exit_stage, torch.arange(batch, device=exit_stage.device)]
        return CascadeOutput(logits, exit_stage)

    def forward_within_capacity(self, images: Tensor, capacities: Sequence[float],
                                thresholds: Sequence[float] | None = None) -> CascadeOutput:
        """Early exit with static shapes: after each stage, at most ceil(capacity x batch) samples run the next
        one (`capacities`: one share of the batch per stage after the first), the least confident undecided
        samples first. No decision is read on the host, so with `thresholds` given the whole forward can be
        compiled or captured as one graph, and unlike `forward_every_stage` it saves the later stages' work.

        Equals `forward` wherever each stage's undecided samples fit its
        capacity. Where more are undecided, the most confident of them stop
        at the last stage they ran (the cost holds, accuracy may drop: choose
        the capacities from a validation split, e.g. the share reaching each
        stage plus a margin). Each stage costs its capacity whatever the
        batch holds: when fewer samples are undecided, decided ones fill the
        places and their results are discarded. Capacities of 1.0 run every
        stage on every sample, as `forward_every_stage` does.
        """
        self.check_input(images)
        limits = self._limits(thresholds)
        shares = [float(share) for share in capacities]
        if len(shares) != self.num_stages - 1 or not all(0.0 < share <= 1.0 for share in shares):
            raise ValueError(f"expected {self.num_stages - 1} capacities in (0, 1] (a share of the batch for each "
                             f"stage after the first), got {list(capacities)}")
        batch = images.shape[0]
        rows = torch.arange(batch, device=images.device)  # the batch rows running the current stage
        logits, carry = self.run_stage(0, images, None, True)
        result = logits.clone()
        exit_stage = torch.zeros(batch, dtype=torch.long, device=images.device)
        confidence = self.confidence(logits)
        undecided = ~self.confident(confidence, limits[0])
        for index in range(1, self.num_stages):
            last = index == self.num_stages - 1
            count = min(rows.shape[0], math.ceil(shares[index - 1] * batch - 1e-9))  # 0.07 x 100 is 7, not 8
            # the least confident undecided samples first (a NaN confidence, which never exits, first of all);
            # decided ones (scored above any confidence) fill up
            score = torch.where(undecided, confidence.nan_to_num(nan=-1.0), 2.0)
            picked = torch.topk(score, count, largest=False, sorted=False).indices
            rows, images, carry = rows.index_select(0, picked), images.index_select(0, picked), select(carry, picked)
            undecided = undecided.index_select(0, picked)
            logits, carry = self.run_stage(index, images, carry, not last)
            result[rows] = torch.where(undecided[:, None], logits, result[rows])
            exit_stage[rows] = torch.where(undecided, index, exit_stage[rows])
            if not last:
                confidence = self.confidence(logits)
                undecided = undecided & ~self.confident(confidence, limits[index])
        return CascadeOutput(result, exit_stage)

    def _limits(self, thresholds: Sequence[float] | None) -> tuple[float, ...]:
        """The exit thresholds of one call: `thresholds` checked, or the stored ones (read on the host)."""
        return check_thresholds(thresholds, self.num_stages) if thresholds is not None \
            else tuple(self.thresholds.tolist())

    @staticmethod
    def confidence(logits: Tensor) -> Tensor:
        """Each sample's confidence at a stage: its largest softmax probability, in float32. A logit that
        overflowed to +-inf (float16 tops out at 65504) counts as the largest finite one, so a sure sample is
        sure (1.0) rather than NaN; a NaN logit gives NaN, which never exits."""
        logits = logits.float()
        finite = torch.finfo(logits.dtype)
        return logits.nan_to_num(nan=float("nan"), posinf=finite.max, neginf=finite.min).softmax(dim=-1).amax(dim=-1)

    @staticmethod
    def confident(confidence: Tensor, threshold: float) -> Tensor:
        """Which samples of this `confidence` exit: >= threshold (threshold 1.0: none)."""
        if threshold >= 1.0:
            return torch.zeros(confidence.shape, dtype=torch.bool, device=confidence.device)
        # float32 semantics as calibrated, compared with a scalar: no tensor copied from the host per call (a
        # captured CUDA graph should not hold one)
        return confidence >= float(np.float32(threshold))

    @classmethod
    def exits(cls, logits: Tensor, threshold: float) -> Tensor:
        """Which samples exit: max softmax >= threshold (threshold 1.0: none)."""
        return cls.confident(cls.confidence(logits), threshold)

    # -- cost ------------------------------------------------------------------------------------
    @torch.no_grad()
    def stage_macs(self) -> tuple[int, ...]:
        """Cumulative MACs per image exiting at each stage, counted by `CostCounter` (reuse included)."""
        parameter = next(self.parameters())
        image = torch.zeros(1, *self.input_shape, dtype=parameter.dtype, device=parameter.device)
        was_training = self.training
        self.eval()
        costs = []
        for index in range(self.num_stages):
            thresholds = [1.0] * index + [0.0] * (self.num_stages - 1 - index)
            with CostCounter() as cost:
                self(image, thresholds=thresholds)
            costs.append(cost.macs)
        self.train(was_training)
        return tuple(costs)

    # -- calibration and budget ------------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, images: Tensor, labels: Tensor, batch_size: int = 256, progress: bool = False,
                  transform: Callable[[Tensor], Tensor] | None = None) -> Calibration:
        """Confidence and correctness of every stage on a held-out split; kept for `set_budget`.

        `transform` maps each batch before it enters the cascade (e.g. uint8 -> float), so a large
        split can stay compact in memory. Batches go through `prepare_input` (to the cascade's device
        and dtype), so the split can stay on the CPU; evaluate the same way to match the calibration.
        """
        from tqdm.auto import tqdm

        if labels.dim() != 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
            raise ValueError(f"calibration needs one label per image (labels shaped (N,), N > 0), got "
                             f"{images.shape[0]} images and labels shaped {tuple(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = self.training
        self.eval()
        confidence, correct = [], []
        for start in tqdm(range(0, images.shape[0], batch_size), desc="calibrate", disable=not progress):
            batch = images[start:start + batch_size]
            batch = transform(batch) if transform is not None else batch
            batch = self.prepare_input(batch)
            target = labels[start:start + batch_size].to(batch.device)
            stage_logits = self.forward_all(batch)
            confidence.append(torch.stack([self.confidence(l) for l in stage_logits]).cpu())
            correct.append(torch.stack([l.argmax(-1) == target for l in stage_logits]).cpu())
        self.train(was_training)
        self.calibration = Calibration(torch.cat(confidence, 1).numpy(), torch.cat(correct, 1).numpy(),
                                       self.stage_macs())
        return self.calibration

    def set_budget(self, macs: float, calibration: Calibration | None = None) -> ExitResult:
        """Choose and set the thresholds maximising held-out accuracy at <= `macs` mean MACs per image."""
        calibration = calibration or self.calibration
        if calibration is None:
            raise ValueError("no calibration data: call cascade.calibrate(val_images, val_labels) first, "
                             "or pass thresholds directly with set_thresholds()")
        result = calibration.search(macs)
        self.set_thresholds(result.thresholds)
        return result
