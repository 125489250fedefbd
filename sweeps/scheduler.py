"""MO-ASHA on Ray Tune: a thin `TrialScheduler` around `sweeps.moasha.ParetoRungs`.

Ray Tune's schedulers rank trials by one metric (ray-project/ray#8018) and Optuna's pruners refuse
multi-objective studies; this one stops a trial at a rung unless it is in the top 1/eta of that
rung by Pareto rank (constraint-aware), as `ParetoRungs` decides.

    scheduler = ParetoASHA(ParetoRungs.geometric(1, 2, 4, ["max", "min"]), metrics=["top1", "latency_ms"],
                           state_path="<experiment dir>/pareto_asha.json")

State: Ray's `Tuner.restore` brings back the scheduler as it was pickled when the sweep STARTED
(Tune persists searchers and callbacks, not schedulers), so every decision is also written through
to `state_path` (atomically, before Tune acts on it) and merged back on the first event after a
restore: a trial stopped before a kill stays stopped, a rung keeps the trials that reached it.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from sit_core.files import atomic_write_text

from .moasha import STOP, ParetoRungs


class ParetoASHA(FIFOScheduler):
    def __init__(self, rungs: ParetoRungs, *, metrics: Sequence[str], time_attr: str = "epoch",
                 violation_key: str = "constraint_violation", state_path: Optional[str] = None):
        super().__init__()
        if len(metrics) != len(rungs.directions):
            raise ValueError(f"{len(metrics)} metrics for {len(rungs.directions)} directions")
        self.rungs, self.metrics, self.time_attr = rungs, list(metrics), time_attr
        self.violation_key, self.state_path = violation_key, state_path
        self._loaded = False

    def _state(self) -> ParetoRungs:
        if not self._loaded:  # first event in this driver: merge what an earlier driver decided
            self._loaded = True
            if self.state_path and os.path.exists(self.state_path):
                with open(self.state_path) as f:
                    self.rungs.merge(json.load(f))
        return self.rungs

    def _save(self) -> None:
        if self.state_path:
            atomic_write_text(self.state_path, json.dumps(self.rungs.to_dict()))

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec) -> bool:
        return True  # the metrics and directions are this scheduler's own

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        self._state()

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        step = result.get(self.time_attr)
        if step is None:
            return TrialScheduler.CONTINUE
        rungs = self._state()
        before = rungs.rung_sizes(), len(rungs.stopped)
        violation = sum(max(0.0, float(v)) for v in (result.get(self.violation_key) or ()))
        decision = rungs.on_result(trial.trial_id, step, [result.get(m) for m in self.metrics], violation)
        if (rungs.rung_sizes(), len(rungs.stopped)) != before:
            self._save()  # durable before Tune stops the trial
        return TrialScheduler.STOP if decision == STOP else TrialScheduler.CONTINUE

    def stopped_early(self, trial_id: str) -> bool:
        """For the MLflow logger: close this trial's run as KILLED (stopped), not FINISHED."""
        return self._state().stopped_early(trial_id)

    def debug_string(self) -> str:
        rungs = self._state()
        sizes = ", ".join(f"{step}: {n}" for step, n in rungs.rung_sizes().items())
        return (f"Pareto-ASHA (eta {rungs.eta:g}, {self.time_attr} rungs {rungs.rungs}): reached {{{sizes}}}, "
                f"{len(rungs.stopped)} stopped")
