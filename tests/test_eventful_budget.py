"""MacBudget: an eventful model's mean cost held at a target saving, whatever the content."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

import frugalvit as fv
from frugalvit import CostCounter, MacBudget, TopFraction


def simulate(budget: MacBudget, kinds: list[str], overhead: float = 0.05) -> list[float]:
    """Run `budget` over frames of the given kinds ("full", "held", "partial"); a partial frame at share f costs
    (overhead + (1 - overhead) f) of a dense frame, a held one nothing. Returns the shares chosen."""
    shares = []
    for kind in kinds:
        share = budget.policy().fraction
        shares.append(share)
        cost = {"full": 1.0, "held": 0.0, "partial": overhead + (1 - overhead) * share}[kind]
        budget.spent(cost * budget.dense_macs, partial=kind == "partial")
    return shares


@pytest.mark.parametrize("target", [2.0, 4.0, 7.5])
def test_the_mean_saving_reaches_the_target(target: float) -> None:
    kinds = ["full"] + ["partial"] * 99
    budget = MacBudget(target, dense_macs=1e9)
    simulate(budget, kinds)
    assert budget.ratio == pytest.approx(target, rel=0.03)


def test_held_frames_savings_go_to_later_partial_frames_and_full_frames_are_repaid() -> None:
    steady = MacBudget(4.0, dense_macs=1.0)
    calm = simulate(steady, ["full"] + ["partial"] * 40)[-1]
    banked = MacBudget(4.0, dense_macs=1.0)
    after_holds = simulate(banked, ["full"] + ["partial"] * 30 + ["held"] * 5 + ["partial"])[-1]
    assert after_holds > calm  # five frames' allowance saved: the next partial frame gets more tokens
    indebted = MacBudget(4.0, dense_macs=1.0)
    after_cuts = simulate(indebted, ["full"] + ["partial"] * 30 + ["full"] * 3 + ["partial"])[-1]
    assert after_cuts < calm  # three full frames' overdraft: fewer tokens until it is repaid
    for budget in (banked, indebted):
        simulate(budget, ["partial"] * 120)
        assert budget.ratio == pytest.approx(4.0, rel=0.03)


def test_shares_stay_within_bounds_and_the_policy_is_a_top_fraction() -> None:
    budget = MacBudget(8.0, dense_macs=1.0, min_fraction=0.05, max_fraction=0.5)
    shares = simulate(budget, ["full"] + ["held"] * 40 + ["partial"] * 5 + ["full"] * 5 + ["partial"] * 5)
    assert all(0.05 <= share <= 0.5 for share in shares) and max(shares) == 0.5 and min(shares) == 0.05
    assert isinstance(budget.policy(), TopFraction)


@pytest.mark.parametrize("kwargs, message", [
    ({"target_ratio": 1.0, "dense_macs": 1.0}, "above 1"),
    ({"target_ratio": math.nan, "dense_macs": 1.0}, "above 1"),
    ({"target_ratio": 4.0, "dense_macs": 0.0}, "CostCounter"),
    ({"target_ratio": 4.0, "dense_macs": 1.0, "min_fraction": 0.0}, "min_fraction"),
    ({"target_ratio": 4.0, "dense_macs": 1.0, "min_fraction": 0.5, "max_fraction": 0.25}, "max_fraction"),
    ({"target_ratio": 4.0, "dense_macs": 1.0, "horizon": 0}, "horizon"),
    ({"target_ratio": 4.0, "dense_macs": 1.0, "smoothing": 0.0}, "smoothing"),
    ({"target_ratio": 4.0, "dense_macs": 1.0, "initial_fraction": math.nan}, "initial_fraction"),
    ({"target_ratio": 4.0, "dense_macs": 1.0, "initial_fraction": 5.0}, "initial_fraction"),
    ({"target_ratio": 4.0, "dense_macs": 1.0, "horizon": True}, "horizon"),
])
def test_bad_settings_are_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MacBudget(**kwargs)
    with pytest.raises(ValueError, match="finite number of MACs"):
        MacBudget(4.0, 1.0).spent(-1.0, partial=True)


def test_numpy_numbers_are_numbers() -> None:
    assert MacBudget(np.float32(4.0), 1.0).target_ratio == 4.0


def test_it_steers_a_real_eventful_model() -> None:
    """On a timm ViT with counted MACs, frames whose change moves about: the mean saving lands near the target
    although every frame's share was chosen from the frames before it."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    frames = torch.randn(1, 3, 64, 64) + 0.1 * torch.randn(40, 1, 3, 64, 64).cumsum(0)
    with torch.no_grad(), CostCounter() as cost:
        model.forward_features(frames[0])
    dense = cost.macs
    budget = MacBudget(3.0, dense_macs=dense)
    ev = fv.eventful(model, budget.policy())
    shares = []
    with torch.no_grad():
        for frame in frames:
            ev.policy = budget.policy()
            shares.append(ev.policy.fraction)
            with CostCounter() as cost:
                ev.forward_features(frame)
            budget.spent(cost.macs, partial=not (ev.last_frame_full or ev.last_frame_held))
    assert len(set(shares)) > 3  # it steered
    assert budget.ratio == pytest.approx(3.0, rel=0.1)


def pan(budget: MacBudget, frames: int, usual: int) -> list[str]:
    """A model on a long pan (every frame would be held, `EventfulViT.hold_share`): it holds while fewer than its
    limit held in a row, else runs a full frame; the limit is `budget.held_limit(usual)` before every frame."""
    kinds, held_in_a_row = ["full"], 0
    budget.spent(budget.dense_macs, partial=False)
    for _ in range(frames - 1):
        limit = budget.held_limit(usual)
        kind = "held" if held_in_a_row < limit else "full"
        held_in_a_row = held_in_a_row + 1 if kind == "held" else 0
        kinds.append(kind)
        budget.spent(0.0 if kind == "held" else budget.dense_macs, partial=False)
    return kinds


@pytest.mark.parametrize("target", [6.0, 8.0])
def test_in_debt_it_lets_the_model_hold_longer_so_a_high_target_is_reached_on_a_pan(target: float) -> None:
    fixed = MacBudget(target, dense_macs=1.0)
    pan(fixed, 120, usual=3)
    assert fixed.ratio == pytest.approx(4.0, rel=0.05)  # a full frame after every 3 held: 4x whatever the target
    stretched = MacBudget(target, dense_macs=1.0, max_held_frames=16)
    kinds = pan(stretched, 120, usual=3)
    assert stretched.ratio == pytest.approx(target, rel=0.05)
    runs = "".join("f" if kind == "full" else "h" for kind in kinds).split("f")[1:-1]
    assert all(len(run) >= 3 for run in runs)  # never fewer holds than the model's own limit


def test_held_limit_is_the_models_own_unless_in_debt() -> None:
    budget = MacBudget(4.0, dense_macs=1.0, max_held_frames=10)
    assert budget.held_limit(3) == 3  # nothing spent yet
    budget.spent(0.1, partial=True)
    assert budget.held_limit(3) == 3  # in credit
    budget.spent(1.0, partial=False)
    assert budget.held_limit(3) == 10 and budget.held_limit(12) == 12  # in debt: the larger of the two
    assert MacBudget(4.0, dense_macs=1.0).held_limit(3) == 3  # without max_held_frames: never changed
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_held_frames"):
            MacBudget(4.0, dense_macs=1.0, max_held_frames=bad)
