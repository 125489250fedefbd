"""Multi-objective asynchronous successive halving (MO-ASHA): which trials go on at a rung.

Pure decision logic (numpy + moocore, no Ray): the sweep's Tune scheduler (`sweeps.scheduler`)
and the replay simulator (`sweeps.replay`) drive the same object.

    rungs = ParetoRungs.geometric(grace=1, eta=2, max_t=4, directions=["max", "min"])  # rungs at 1, 2
    rungs.on_result("t1", step=1, values=[71.2, 3.4])          # -> "continue" | "stop"

The rule (ASHA's stopping variant, Li et al. 2020, with Pareto ranks as in Syne Tune's MOASHA,
Schmucker et al. 2021): when a trial first reaches a rung (its step >= the rung's), it is placed
among every trial that reached that rung so far, itself included; it continues if its place is
within the top ceil(n / eta). Places: feasible trials (no constraint violated, finite values)
before infeasible ones; feasible ones by non-dominated rank (moocore), ties in rank by hypervolume
contribution within the rank's front (or NSGA-II crowding distance), then by arrival; infeasible
ones by total violation. Asynchronous: it decides with what has arrived, so the first trials at a
rung always continue and nothing waits for a full bracket.

Every decision is recorded once per (trial, rung) and replayed if the same rung is reported again
(a trial resumed from a checkpoint after a driver kill), and a stopped trial stays stopped: with
`to_dict`/`from_dict` the state survives a restart.
"""
from __future__ import annotations

import math
from typing import Sequence

import moocore
import numpy as np

CONTINUE, STOP = "continue", "stop"
TIE_BREAKS = ("hv", "crowding")
_SIGN = {"max": -1.0, "min": 1.0}


def rung_steps(grace: int, eta: float, max_t: int) -> list[int]:
    """grace, grace*eta, grace*eta^2, ... below max_t (the full budget is not a rung)."""
    if grace < 1 or eta <= 1 or max_t < 1:
        raise ValueError(f"need grace >= 1, eta > 1, max_t >= 1 (got {grace}, {eta}, {max_t})")
    steps, k = [], 0
    while (step := int(round(grace * eta ** k))) < max_t:
        if not steps or step > steps[-1]:
            steps.append(step)
        k += 1
    return steps


def order(values: np.ndarray, violation: np.ndarray, tie_break: str = "hv") -> np.ndarray:
    """Indices of `values` (n, m) in minimisation form, best first (see the module docstring).
    `violation`: (n,) total constraint violation, > 0 infeasible."""
    n = len(values)
    ok = np.isfinite(values).all(axis=1) & (violation <= 0)
    rank = np.full(n, np.iinfo(np.int32).max, dtype=np.int64)
    spread = np.zeros(n)
    if ok.any():
        idx = np.flatnonzero(ok)
        rank[idx] = moocore.pareto_rank(values[idx])
        for r in np.unique(rank[idx]):
            members = idx[rank[idx] == r]
            spread[members] = _spread(values[members], values[idx], tie_break)
    # infeasible: by total violation; non-finite values or violation: last of all
    bad = np.where(ok, 0.0, np.where(np.isfinite(violation) & np.isfinite(values).all(axis=1),
                                     np.maximum(violation, 0.0), np.inf))
    arrival = np.arange(n)
    return np.lexsort((arrival, -spread, rank, bad, ~ok))  # np.lexsort: the last key is the primary one


def _spread(front: np.ndarray, population: np.ndarray, tie_break: str) -> np.ndarray:
    """Tie-breaker inside one non-dominated front: larger is better."""
    if len(front) == 1:
        return np.zeros(1)
    if tie_break == "crowding":
        return crowding_distance(front)
    low, high = population.min(axis=0), population.max(axis=0)
    ref = high + 0.1 * np.where(high > low, high - low, 1.0)  # beyond the rung's worst point
    return moocore.hv_contributions(front, ref=ref)


def crowding_distance(front: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of each point of one front (boundary points: inf)."""
    n, m = front.shape
    distance = np.zeros(n)
    for j in range(m):
        by = np.argsort(front[:, j], kind="stable")
        span = front[by[-1], j] - front[by[0], j]
        distance[by[0]] = distance[by[-1]] = np.inf
        if span > 0 and n > 2:
            distance[by[1:-1]] += (front[by[2:], j] - front[by[:-2], j]) / span
    return distance


class ParetoRungs:
    """The scheduler's state and rule. `directions`: "max"/"min" per objective, in the order the
    values are given. Values at a rung are whatever the trial reports then (validation top-1 after
    that many epochs, latency known before training)."""

    def __init__(self, rungs: Sequence[int], eta: float, directions: Sequence[str], tie_break: str = "hv"):
        if not rungs or any(b <= a for a, b in zip(rungs, rungs[1:])) or rungs[0] < 1:
            raise ValueError(f"rungs must be increasing steps >= 1, got {list(rungs)}")
        if eta <= 1:
            raise ValueError(f"eta must be > 1, got {eta}")
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break {tie_break!r} is not one of {TIE_BREAKS}")
        if any(d not in _SIGN for d in directions):
            raise ValueError(f"directions must be 'max' or 'min', got {list(directions)}")
        self.rungs, self.eta, self.directions, self.tie_break = [int(r) for r in rungs], float(eta), list(directions), tie_break
        self.signs = np.array([_SIGN[d] for d in directions])
        # rung step -> trial id -> [values in the given directions..., violation, decision]; insertion = arrival
        self.records: dict[int, dict[str, list]] = {r: {} for r in self.rungs}
        self.stopped: dict[str, dict] = {}  # trial id -> {"step", "values"} where it was stopped

    @classmethod
    def geometric(cls, grace: int, eta: float, max_t: int, directions: Sequence[str], tie_break: str = "hv") -> "ParetoRungs":
        steps = rung_steps(grace, eta, max_t)
        if not steps:
            raise ValueError(f"no rung below the full budget {max_t} with grace {grace}: lower the grace period")
        return cls(steps, eta, directions, tie_break)

    def on_result(self, trial_id: str, step: float, values: Sequence[float], violation: float = 0.0) -> str:
        """A trial's report after `step` (epochs): continue or stop. Idempotent per (trial, rung)."""
        if trial_id in self.stopped:
            return STOP
        passed = [r for r in self.rungs if r <= step]
        if not passed:
            return CONTINUE
        rung = passed[-1]  # the highest rung reached (a resumed trial may have skipped one)
        recorded = self.records[rung]
        if trial_id in recorded:
            return recorded[trial_id][-1]
        values = [float(v) if v is not None else math.nan for v in values]
        recorded[trial_id] = [*values, float(violation), CONTINUE]
        decision = self._decide(rung, trial_id)
        recorded[trial_id][-1] = decision
        if decision == STOP:
            self.stopped[trial_id] = {"step": step, "values": values}
        return decision

    def _decide(self, rung: int, trial_id: str) -> str:
        recorded = self.records[rung]
        ids = list(recorded)
        m = len(self.signs)
        rows = np.array([r[:m] for r in recorded.values()], dtype=float) * self.signs
        violation = np.array([r[m] for r in recorded.values()], dtype=float)
        place = int(np.flatnonzero(order(rows, violation, self.tie_break) == ids.index(trial_id))[0])
        keep = math.ceil(len(ids) / self.eta)
        return CONTINUE if place < keep else STOP

    def stopped_early(self, trial_id: str) -> bool:
        return trial_id in self.stopped

    def rung_sizes(self) -> dict[int, int]:
        return {r: len(rec) for r, rec in self.records.items()}

    # ------------------------------------------------------------------ state (JSON-friendly)
    def to_dict(self) -> dict:
        return {"rungs": self.rungs, "eta": self.eta, "directions": self.directions, "tie_break": self.tie_break,
                "records": {str(r): rec for r, rec in self.records.items()}, "stopped": self.stopped}

    @classmethod
    def from_dict(cls, state: dict) -> "ParetoRungs":
        rungs = cls(state["rungs"], state["eta"], state["directions"], state.get("tie_break", "hv"))
        rungs.merge(state)
        return rungs

    def merge(self, state: dict) -> None:
        """Add the records and stops of a saved state (what was decided before a restart): a
        decision already taken is kept, never taken again with different company."""
        if [int(r) for r in state["rungs"]] != self.rungs:
            raise ValueError(f"saved rungs {state['rungs']} differ from these {self.rungs}")
        for r, rec in state["records"].items():
            for trial_id, row in rec.items():
                self.records[int(r)].setdefault(trial_id, list(row))
        for trial_id, where in state["stopped"].items():
            self.stopped.setdefault(trial_id, dict(where))

    def __repr__(self) -> str:
        return (f"ParetoRungs(rungs={self.rungs}, eta={self.eta:g}, tie_break={self.tie_break!r}, "
                f"recorded={self.rung_sizes()}, stopped={len(self.stopped)})")
