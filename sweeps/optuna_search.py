"""Ray Tune's OptunaSearch, made honest for multi-objective sweeps with constraints.

Ray's `on_trial_complete` tells a multi-objective trial as COMPLETE even when its objectives are
missing (a failed trial's last result is an epoch report without latency), which Optuna then
refuses, leaving the trial RUNNING in the study. This subclass tells FAIL instead, and records each
trial's constraint values (`Trial.set_constraint`, Optuna 5's API) so Optuna's samplers and
`best_trials` know which trials are infeasible.
"""
from __future__ import annotations

import math
from typing import Optional

import optuna
from ray.tune.search.optuna import OptunaSearch

CONSTRAINTS = ("latency_budget", "min_top1")  # values <= 0 mean satisfied (Optuna's convention)
TUNE_ID_ATTR = "tune_trial_id"


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """tpe | nsga2 | random. Constraints reach them through the trials themselves."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=4)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=6)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler {name!r} is not one of tpe, nsga2, random")


class ParetoOptunaSearch(OptunaSearch):
    """OptunaSearch that fails trials without finite objectives and records constraints."""

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        ot_trial = self._ot_trials[trial_id]
        ot_trial.set_user_attr(TUNE_ID_ATTR, trial_id)
        values = [(result or {}).get(m) for m in self._metric]
        finite = all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        if error or not finite:
            self._ot_study.tell(ot_trial, None, state=optuna.trial.TrialState.FAIL)
        else:
            for key, value in zip(CONSTRAINTS, (result or {}).get("constraint_violation", [0.0, 0.0])):
                ot_trial.set_constraint(key, value)
            self._ot_study.tell(ot_trial, [float(v) for v in values], state=optuna.trial.TrialState.COMPLETE)
        self._completed_trials.add(trial_id)
