"""A compute budget for an eventful model: the mean cost per frame held at a target share of the dense model's.

Token shares, thresholds and the held-frame and cut tests are set in units
of *change*, so what a setting saves follows the content: on real video the
same setting saves 9.7x on a calm stretch and 6.5x on a busier one
(docs/eventful.md, "Out of sample"). A user who needs a given saving cannot
get it from those knobs. `MacBudget` closes the loop: after every frame it
is told what the frame cost (multiply-accumulates, counted with
`frugalvit.CostCounter` or estimated), keeps an account of the allowance
(dense cost / target ratio per frame) minus what was spent, and picks the
next partial frame's token share so that the account returns to zero over a
few frames: a held frame's savings are spent on later partial frames, a
full frame's overdraft is repaid by them. It chooses the share of partial
frames (a `TopFraction`); held and full frames stay the model's decisions
(`EventfulViT.hold_share`, `cut_share`), except that with `max_held_frames`
it also lets a model in debt hold longer: a held stream normally gets a
full frame after `ev.max_held_frames` held frames in a row, and where
change is widespread (a pan) those full frames alone cost more than a high
target allows. In debt, `held_limit` raises the limit to `max_held_frames`,
so the holds repay the last full frame before the next one comes: with
widespread change the model then runs like keyframe-and-hold at the
target's period, with local change it keeps making partial frames.

    budget = MacBudget(target_ratio=4.0, dense_macs=dense_frame_macs, max_held_frames=12)
    for frame in frames:
        ev.policy = budget.policy()              # before the frame
        ev.max_held_frames = budget.held_limit(usual=3)
        with CostCounter() as cost:
            out = ev(frame)
        budget.spent(cost.macs, partial=not (ev.last_frame_full or ev.last_frame_held))

The cost of a partial frame is modelled as proportional to its share (the
token-wise layers are; the patch embedding and the attention update are
not quite, which the feedback absorbs). The share changes from frame to
frame, so the frames do not have one fixed shape: no CUDA graph capture.
"""

from __future__ import annotations

import math

from frugalvit.eventful.policies import TopFraction, is_real


class MacBudget:
    """Chooses each partial frame's `TopFraction` so that the mean cost per frame approaches dense / `target_ratio`.

    State: the account (allowance minus spending, in MACs, over the frames so
    far) and an estimate of a partial frame's cost per unit of token share
    (from the partial frames seen, an exponential average). Plain Python
    numbers: nothing here touches a tensor or synchronises a device.
    """

    def __init__(self, target_ratio: float, dense_macs: float, initial_fraction: float | None = None,
                 horizon: int = 8, min_fraction: float = 1.0 / 64, max_fraction: float = 1.0,
                 smoothing: float = 0.5, max_held_frames: int | None = None) -> None:
        """`target_ratio`: dense MACs / eventful MACs to hold on average (> 1); `dense_macs`: one dense frame's
        MACs, counted the same way as the frames' costs; `initial_fraction`: the first partial frame's share
        (default 1 / target_ratio); `horizon`: frames over which a surplus is spent or a debt repaid;
        `min_fraction` / `max_fraction`: the shares it may choose; `smoothing`: weight of the newest partial
        frame in the cost estimate; `max_held_frames`: how many frames in a row a model in debt may hold
        (`held_limit`; None: the model's own limit always)."""
        if not (is_real(target_ratio) and math.isfinite(target_ratio) and target_ratio > 1.0):
            raise ValueError(f"MacBudget(target_ratio={target_ratio!r}): a saving, dense / eventful MACs, above 1 "
                             "(e.g. 4.0 for a quarter of the dense cost)")
        if not (math.isfinite(dense_macs) and dense_macs > 0):
            raise ValueError(f"MacBudget(dense_macs={dense_macs!r}): one dense frame's multiply-accumulates, > 0 "
                             "(count them with frugalvit.CostCounter)")
        if not 0.0 < min_fraction <= max_fraction <= 1.0:
            raise ValueError(f"MacBudget: need 0 < min_fraction <= max_fraction <= 1, got {min_fraction!r} and "
                             f"{max_fraction!r}")
        if initial_fraction is not None and not min_fraction <= initial_fraction <= max_fraction:
            raise ValueError(f"MacBudget(initial_fraction={initial_fraction!r}): the first partial frame's share, "
                             f"within [min_fraction, max_fraction] = [{min_fraction:g}, {max_fraction:g}] (or None "
                             "for 1 / target_ratio)")
        if not (isinstance(horizon, int) and not isinstance(horizon, bool) and horizon >= 1):
            raise ValueError(f"MacBudget(horizon={horizon!r}): a whole number of frames, 1 or more")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"MacBudget(smoothing={smoothing!r}): must lie in (0, 1]")
        if max_held_frames is not None and not (isinstance(max_held_frames, int)
                                                and not isinstance(max_held_frames, bool) and max_held_frames >= 1):
            raise ValueError(f"MacBudget(max_held_frames={max_held_frames!r}): a whole number of frames, 1 or more "
                             "(or None to leave the model's own limit)")
        self.max_held_frames = max_held_frames
        self.target_ratio, self.dense_macs, self.horizon = float(target_ratio), float(dense_macs), horizon
        self.min_fraction, self.max_fraction, self.smoothing = min_fraction, max_fraction, smoothing
        start = 1.0 / self.target_ratio if initial_fraction is None else initial_fraction
        self.fraction = self._clamp(start)
        self.account = 0.0  # MACs allowed so far minus MACs spent
        self.frames = 0
        self.total_macs = 0.0
        # a partial frame's MACs per unit of share; before any is seen, a dense frame's (share 1 costs a frame)
        self.cost_per_share = self.dense_macs

    @property
    def allowance(self) -> float:
        """MACs one frame may cost on average."""
        return self.dense_macs / self.target_ratio

    def _clamp(self, fraction: float) -> float:
        return min(self.max_fraction, max(self.min_fraction, fraction))

    def policy(self) -> TopFraction:
        """The policy for the next frame (assign it to the eventful model, and to a gated decoder, before it)."""
        return TopFraction(self.fraction)

    def held_limit(self, usual: int) -> int:
        """How many frames in a row the model may hold before the next frame (assign it to
        `EventfulViT.max_held_frames`): `usual` (the model's own limit) while the account is not in debt, else
        `max_held_frames` if that is larger. Held frames cost almost nothing, so each one repays about a frame's
        allowance; the full frame that ends a run of holds then waits until the last one is repaid."""
        if self.max_held_frames is None or self.account >= 0.0:
            return usual
        return max(usual, self.max_held_frames)

    def spent(self, macs: float, partial: bool) -> None:
        """Record what the last frame cost, and whether it was a partial frame (run at `policy()`'s share; held
        and full frames are recorded but do not inform the cost estimate); then choose the next share."""
        if not (math.isfinite(macs) and macs >= 0):
            raise ValueError(f"MacBudget.spent: a frame's cost must be a finite number of MACs >= 0, got {macs!r}")
        self.frames += 1
        self.total_macs += macs
        self.account += self.allowance - macs
        if partial:
            observed = macs / self.fraction
            self.cost_per_share += self.smoothing * (observed - self.cost_per_share)
        wanted = self.allowance + self.account / self.horizon  # this frame's allowance, plus a share of the account
        self.fraction = self._clamp(wanted / self.cost_per_share)

    @property
    def ratio(self) -> float:
        """The saving so far: dense MACs / MACs spent over the frames recorded (inf before any cost)."""
        return math.inf if self.total_macs == 0 else self.frames * self.dense_macs / self.total_macs
