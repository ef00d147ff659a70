"""Exit thresholds for a budget: pure functions over per-stage confidences of a held-out split.

Conventions shared with the cascades: stage `k < K-1` lets a sample exit when
its confidence (max softmax) is `>= thresholds[k]`, except that a threshold of
exactly 1.0 means "never exit here" (a float32 softmax can round to 1.0).
`stage_macs[k]` is the cumulative cost of a sample that exits at stage `k`
(all stages up to `k`, reuse modules included). All functions take NumPy-like
arrays: `confidence` (K, N) and `correct` (K, N), one row per stage.

Three searches live here: `search_thresholds` (exact for K <= 3, a grid over
the early stages plus an exact last step otherwise), and the two baselines it
must beat: the geometric exit-fraction rule of the authors' code and a genetic
algorithm as named in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

NEVER_EXIT = 1.0
_BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


@dataclass(frozen=True)
class ExitResult:
    """Thresholds and what they give on the data they were evaluated on."""

    thresholds: tuple[float, ...]
    accuracy: float
    mean_macs: float
    exit_fractions: tuple[float, ...]

    def capacities(self, margin: float = 0.05) -> tuple[float, ...]:
        """Capacities for `EarlyExitCascade.forward_within_capacity` at these thresholds: the share of the
        samples that reached each stage after the first, plus `margin` (a batch's share varies around the
        split's), at most 1."""
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        return tuple(min(1.0, float(sum(self.exit_fractions[stage:])) + margin)
                     for stage in range(1, len(self.exit_fractions)))


def _as_arrays(confidence: object, correct: object, stage_macs: Sequence[float]) -> tuple[np.ndarray, np.ndarray,
                                                                                          np.ndarray]:
    conf = np.nan_to_num(np.asarray(confidence, dtype=np.float32), nan=-1.0)  # NaN never exits: below every threshold
    corr = np.asarray(correct, dtype=bool)
    costs = np.asarray(stage_macs, dtype=np.float64)
    if conf.ndim != 2 or conf.shape != corr.shape:
        raise ValueError(f"confidence and correct must both be (K, N), got {conf.shape} and {corr.shape}")
    if costs.shape != (conf.shape[0],):
        raise ValueError(f"stage_macs must have one entry per stage ({conf.shape[0]}), got {costs.shape}")
    if conf.shape[0] < 2:
        raise ValueError("a cascade needs at least 2 stages")
    if np.any(np.diff(costs) < 0):
        raise ValueError(f"stage_macs must be cumulative (non-decreasing), got {costs.tolist()}")
    return conf, corr, costs


def check_thresholds(thresholds: Sequence[float], num_stages: int) -> tuple[float, ...]:
    """Validate `thresholds` for a K-stage cascade: K-1 values in [0, 1]."""
    if isinstance(thresholds, (str, bytes)) or not hasattr(thresholds, "__iter__"):
        raise ValueError(f"thresholds must be a sequence of {num_stages - 1} numbers in [0, 1] (one per stage but "
                         f"the last), got {thresholds!r}")
    values = tuple(float(np.float32(value)) for value in thresholds)  # as stored and compared (float32): one
    # semantics whether thresholds are passed or set (0.99999999 is 1.0, never exit, either way)
    if len(values) != num_stages - 1:
        raise ValueError(f"a {num_stages}-stage cascade needs {num_stages - 1} thresholds "
                         f"(one per stage but the last), got {len(values)}")
    bad = [value for value in values if not 0.0 <= value <= 1.0]
    if bad:
        raise ValueError(f"thresholds must lie in [0, 1] (1.0 = never exit), got {list(values)}")
    return values


def exits_at(confidence: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask of samples whose `confidence` lets them exit at `threshold` (1.0 = none)."""
    if threshold >= NEVER_EXIT:
        return np.zeros(np.shape(confidence), dtype=bool)
    return np.asarray(confidence, dtype=np.float32) >= np.float32(threshold)


def exit_stages(confidence: object, thresholds: Sequence[float]) -> np.ndarray:
    """Stage index (0..K-1) at which each sample exits under `thresholds`."""
    conf = np.asarray(confidence, dtype=np.float32)
    values = check_thresholds(thresholds, conf.shape[0])
    stage = np.full(conf.shape[1], conf.shape[0] - 1, dtype=np.int64)
    undecided = np.ones(conf.shape[1], dtype=bool)
    for k, threshold in enumerate(values):
        leave = undecided & exits_at(conf[k], threshold)
        stage[leave] = k
        undecided &= ~leave
    return stage


def evaluate_thresholds(confidence: object, correct: object, stage_macs: Sequence[float],
                        thresholds: Sequence[float]) -> ExitResult:
    """Accuracy, mean MACs per sample and exit shares of `thresholds` on this split."""
    conf, corr, costs = _as_arrays(confidence, correct, stage_macs)
    stage = exit_stages(conf, thresholds)
    n = conf.shape[1]
    accuracy = float(corr[stage, np.arange(n)].mean())
    fractions = np.bincount(stage, minlength=conf.shape[0]) / n
    return ExitResult(tuple(float(t) for t in thresholds), accuracy, float(costs[stage].mean()),
                      tuple(float(f) for f in fractions))


def _cut_points(sorted_conf: np.ndarray) -> np.ndarray:
    """Exit counts reachable by one threshold on descending confidences: 0, every tie boundary, all (all that can
    exit: a NaN confidence, stored as -1, exits at no threshold in [0, 1])."""
    n = sorted_conf.shape[0]
    inner = np.nonzero(sorted_conf[:-1] > sorted_conf[1:])[0] + 1 if n > 1 else np.zeros(0, dtype=np.int64)
    points = np.concatenate([[0], inner, [n]]).astype(np.int64)
    return points[points <= int(np.count_nonzero(sorted_conf >= 0))]


def _threshold_for(sorted_conf: np.ndarray, count: int) -> float:
    """A threshold letting exactly the first `count` (descending) samples exit: midway between the last one
    taken and the first one left, so that it generalises to unseen confidences (a max-margin cut)."""
    if count == 0:
        return NEVER_EXIT
    taken = sorted_conf[count - 1]
    if count == sorted_conf.shape[0]:
        return float(taken)
    middle = np.float32(max((np.float64(taken) + np.float64(sorted_conf[count])) / 2, 0.0))  # >= 0 next to a NaN
    return float(middle) if sorted_conf[count] < middle <= taken else float(taken)


class _Search:
    """Exact enumeration over cut points; the last threshold is solved in closed form."""

    def __init__(self, conf: np.ndarray, corr: np.ndarray, costs: np.ndarray, budget_total: float,
                 grid: int | None) -> None:
        # Confidences of exactly 1.0 are treated as the largest float32 below 1.0, so that a
        # threshold can let them exit (1.0 itself means never exit).
        self.conf = np.minimum(conf, np.float32(_BELOW_ONE))
        self.corr = corr.astype(np.int64)
        self.costs = costs
        self.budget = budget_total
        self.grid = grid
        self.orders = [np.argsort(-row, kind="stable") for row in self.conf]

    def _sorted(self, stage: int, remaining: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = self.orders[stage]
        order = order[remaining[order]]
        return order, self.conf[stage, order]

    def last(self, stage: int, remaining: np.ndarray, spent: float) -> tuple[int, float, float] | None:
        """Best (correct count, cost, threshold) for stage `stage` = K-2 on `remaining` samples."""
        order, conf = self._sorted(stage, remaining)
        cuts = _cut_points(conf)
        gain = np.concatenate([[0], np.cumsum(self.corr[stage, order] - self.corr[-1, order])])
        base = int(self.corr[-1, order].sum())
        count = order.shape[0]
        cost = spent + cuts * self.costs[stage] + (count - cuts) * self.costs[-1]
        feasible = cost <= self.budget * (1 + 1e-12)
        if not feasible.any():
            return None
        cuts, cost = cuts[feasible], cost[feasible]
        score = gain[cuts]
        best = np.flatnonzero(score == score.max())
        pick = best[np.argmin(cost[best])]
        return base + int(score[pick]), float(cost[pick]), _threshold_for(conf, int(cuts[pick]))

    def solve(self, stage: int, remaining: np.ndarray, spent: float,
              banked: int) -> tuple[int, float, list[float]] | None:
        """Best (correct count, cost, thresholds from `stage` on) for the `remaining` samples."""
        last_free = self.conf.shape[0] - 2
        if stage == last_free:
            found = self.last(stage, remaining, spent)
            return None if found is None else (banked + found[0], found[1], [found[2]])
        order, conf = self._sorted(stage, remaining)
        cuts = _cut_points(conf)
        if self.grid is not None and cuts.shape[0] > self.grid:
            cuts = np.unique(cuts[np.linspace(0, cuts.shape[0] - 1, self.grid).round().astype(np.int64)])
        count = order.shape[0]
        cheapest_rest = spent + cuts * self.costs[stage] + (count - cuts) * self.costs[stage + 1]
        gained = np.concatenate([[0], np.cumsum(self.corr[stage, order])])
        best: tuple[int, float, list[float]] | None = None
        for cut, cheapest in zip(cuts.tolist(), cheapest_rest.tolist()):
            if cheapest > self.budget * (1 + 1e-12):
                continue
            rest = remaining.copy()
            rest[order[:cut]] = False
            found = self.solve(stage + 1, rest, spent + cut * self.costs[stage], banked + int(gained[cut]))
            if found is None:
                continue
            if best is None or found[0] > best[0] or (found[0] == best[0] and found[1] < best[1]):
                best = (found[0], found[1], [_threshold_for(conf, cut)] + found[2])
        return best


def search_thresholds(confidence: object, correct: object, stage_macs: Sequence[float], budget: float,
                      grid: int | None = None) -> ExitResult:
    """Thresholds that maximise accuracy on this split with mean MACs per sample <= `budget`.

    Exact for 2 and 3 stages: every distinct confidence is a candidate cut for
    the first K-2 thresholds and the last one is solved exactly given them (a
    prefix-sum scan), O(N^(K-2) N). For K >= 4 pass `grid` (candidate cuts per
    early stage, e.g. 64) to bound the work; by default it is chosen so that
    about 10^4 combinations are tried. Ties in accuracy go to the cheaper
    solution.

    Raises:
        ValueError: the budget is below the first stage's cost (nothing fits).
    """
    conf, corr, costs = _as_arrays(confidence, correct, stage_macs)
    _check_budget(budget, costs)
    num_stages, n = conf.shape
    if grid is None and num_stages > 3:
        grid = max(2, int(round(1e4 ** (1.0 / (num_stages - 2)))))
    search = _Search(conf, corr, costs, budget * n, grid)
    found = search.solve(0, np.ones(n, dtype=bool), 0.0, 0)
    if found is None:  # only float round-off can get here: all-exit-first costs exactly costs[0] <= budget
        found = (int(corr[0].sum()), float(costs[0] * n), [0.0] * (num_stages - 1))
    return evaluate_thresholds(conf, corr, costs, found[2])


def _check_budget(budget: float, costs: np.ndarray) -> None:
    """A budget some thresholds can meet: a number (not NaN) of at least the first stage's cost."""
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a number of MACs per image, got {budget!r}") from None
    if value != value:
        raise ValueError("budget is NaN; give a number of MACs per image (e.g. the cost of the model to beat / 2)")
    if budget < costs[0]:
        raise ValueError(f"budget {budget:.4g} MACs is below the first stage's cost {costs[0]:.4g} MACs per image; "
                         f"no thresholds can meet it (raise the budget to at least {costs[0]:.4g})")


def geometric_thresholds(confidence: object, ratio: float) -> tuple[float, ...]:
    """The authors' exit rule: the share exiting at stage k is proportional to `ratio`**(k+1).

    Stage by stage, the still-undecided samples with the highest confidence
    exit until the stage's share of the whole split is reached; the threshold is
    the confidence of the last one taken (MSDNet's `dynamic_evaluate`, reused by DVT).
    """
    conf = np.minimum(np.asarray(confidence, dtype=np.float32), np.float32(_BELOW_ONE))
    num_stages, n = conf.shape
    shares = ratio ** np.arange(1, num_stages + 1, dtype=np.float64)
    shares /= shares.sum()
    undecided = np.ones(n, dtype=bool)
    thresholds = []
    for k in range(num_stages - 1):
        take = int(np.floor(n * shares[k]))
        order = np.argsort(-conf[k], kind="stable")
        order = order[undecided[order]]
        threshold = NEVER_EXIT if take == 0 or order.shape[0] == 0 else float(conf[k, order[min(take, len(order)) - 1]])
        thresholds.append(threshold)
        undecided &= ~exits_at(conf[k], threshold)
    return tuple(thresholds)


def geometric_search(confidence: object, correct: object, stage_macs: Sequence[float], budget: float,
                     ratios: Sequence[float] = tuple(p / 20 for p in range(1, 40))) -> ExitResult:
    """Best geometric-rule thresholds under `budget` over the authors' sweep of ratios (0.05 .. 1.95)."""
    conf, corr, costs = _as_arrays(confidence, correct, stage_macs)
    _check_budget(budget, costs)
    best: ExitResult | None = None
    for ratio in ratios:
        result = evaluate_thresholds(conf, corr, costs, geometric_thresholds(conf, ratio))
        if result.mean_macs <= budget and (best is None or result.accuracy > best.accuracy):
            best = result
    if best is None:  # every ratio overspends: exit everything at the first stage
        best = evaluate_thresholds(conf, corr, costs, [0.0] * (conf.shape[0] - 1))
    return best


def genetic_search(confidence: object, correct: object, stage_macs: Sequence[float], budget: float,
                   population: int = 48, generations: int = 60, seed: int = 0) -> ExitResult:
    """A genetic algorithm over thresholds (the paper's choice): fitness is accuracy, over-budget is penalised.

    Tournament selection, blend crossover, Gaussian mutation, elitism; the
    individuals start uniform in [0, 1] plus the all-exit-first solution.
    """
    conf, corr, costs = _as_arrays(confidence, correct, stage_macs)
    _check_budget(budget, costs)
    rng = np.random.default_rng(seed)
    dims = conf.shape[0] - 1
    pool = rng.uniform(0.0, 1.0, size=(population, dims))
    pool[0] = 0.0

    def fitness(genome: np.ndarray) -> tuple[float, ExitResult]:
        result = evaluate_thresholds(conf, corr, costs, np.clip(genome, 0.0, 1.0))
        over = max(0.0, result.mean_macs - budget) / budget
        return result.accuracy - 10.0 * over - (1.0 if over > 0 else 0.0), result

    scored = [fitness(genome) for genome in pool]
    for _ in range(generations):
        scores = np.array([score for score, _ in scored])
        elite = np.argsort(-scores)[:2]
        children = [pool[i].copy() for i in elite]
        while len(children) < population:
            parents = []
            for _ in range(2):
                a, b = rng.integers(0, population, size=2)
                parents.append(pool[a] if scores[a] >= scores[b] else pool[b])
            mix = rng.uniform(-0.25, 1.25, size=dims)
            child = parents[0] + mix * (parents[1] - parents[0])
            mutate = rng.random(dims) < 0.3
            child = child + mutate * rng.normal(0.0, 0.05, size=dims)
            children.append(np.clip(child, 0.0, 1.0))
        pool = np.stack(children)
        scored = [fitness(genome) for genome in pool]
    feasible = [(score, result) for score, result in scored if result.mean_macs <= budget]
    if not feasible:
        return evaluate_thresholds(conf, corr, costs, [0.0] * dims)
    return max(feasible, key=lambda pair: (pair[1].accuracy, -pair[1].mean_macs))[1]
