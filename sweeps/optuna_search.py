"""A Ray Tune `Searcher` on Optuna's public ask/tell API, for multi-objective sweeps with
constraints and early stopping.

    searcher = ParetoOptunaSearch(space, metric=["top1", "latency_ms"], mode=["max", "min"],
                                  sampler=make_sampler("tpe", seed=0), study_name="s", storage="sqlite:///optuna.db")

- `suggest` asks the study for a trial and runs the define-by-run `space(trial)` on it (warm starts
  are `study.enqueue_trial` points, so they are asked first); the Tune trial id is stored on the
  Optuna trial at once (user attr `tune_trial_id`), so the study alone says which trial is which.
- a resumed sweep first hands out again the trials `sweeps/reconcile.py` put on the study's
  adoption list (started after Tune's last saved state), each under its own Optuna trial.
- `on_trial_complete` tells the study, once:
  FAIL      the trial raised, or its objectives are missing or not finite;
  PRUNED    it ended before its full budget (`epoch` < `full_epochs`), or the scheduler says it
            stopped it (`stopped_early(trial_id)`: a stop is final, even for a trial that a resumed
            sweep re-ran to its end), its last values kept as user attrs `last_values` /
            `last_epoch` (`Trial.report` refuses multi-objective studies);
  COMPLETE  otherwise, with its constraint values (`Trial.set_constraint`, <= 0 satisfied), which
            Optuna's samplers and `best_trials` read.
  A trial the study already holds as finished is left alone (Tune can tell a trial twice, and a
  resumed sweep can re-run one the study finished before a kill): never `UpdateFinishedTrialError`.
- `save`/`restore` (Tune's experiment checkpoints) keep the sampler and where the study lives;
  the trial mapping is read back from the study by the `tune_trial_id` attrs, not trusted from a
  checkpoint that may be older than the study.

Why not Ray's `OptunaSearch`: it tells a trial without objectives as COMPLETE (Optuna refuses it
and leaves it RUNNING), knows no constraints and no PRUNED, and a subclass has to read its private
attributes.
"""
from __future__ import annotations

import math
import pickle
from typing import Any, Callable, Optional, Sequence, Union

import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from sit_core.files import atomic_write

from .cli import SAMPLERS
from .faults import kill_point

CONSTRAINTS = ("latency_budget", "min_top1")  # values <= 0 mean satisfied (Optuna's convention)
TUNE_ID_ATTR = "tune_trial_id"
ADOPT_ATTR = "sit.adopt"  # study attr: numbers of trials to hand out again before asking (sweeps/reconcile.py)
_DIRECTIONS = {"max": "maximize", "min": "minimize"}


def make_sampler(name: str, seed: int, *, startup: int = 4) -> optuna.samplers.BaseSampler:
    """tpe | nsga2 | random | gp (Optuna's GPSampler: log-EHVI for several objectives, constrained
    when trials carry constraints). `startup`: random trials before the model-based samplers model.
    Constraints reach every sampler through the trials themselves (`Trial.set_constraint`)."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, 2 * startup - 2))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        # The define-by-run space is conditional (pos_2 exists only with 2+ stages): GPSampler models
        # the parameters every trial has and samples the others independently; no warning per trial.
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
    raise ValueError(f"sampler {name!r} is not one of {', '.join(SAMPLERS)}")


def finite(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


class ParetoOptunaSearch(Searcher):
    """See the module docstring. `storage`: an Optuna storage URL or object (in memory by default)."""

    def __init__(self, space: Callable[[optuna.Trial], Any], *, metric: Sequence[str], mode: Sequence[str],
                 sampler: optuna.samplers.BaseSampler, study_name: str,
                 storage: Union[str, optuna.storages.BaseStorage, None] = None,
                 points_to_evaluate: Optional[list[dict]] = None,
                 constraint_key: str = "constraint_violation", budget_keys: tuple[str, str] = ("epoch", "full_epochs"),
                 stopped_early: Optional[Callable[[str], bool]] = None, max_trials: Optional[int] = None):
        super().__init__(metric=list(metric), mode=list(mode))
        self._max_trials = max_trials  # the sweep's budget, counted in the study (see `suggest`)
        self._space, self._sampler, self._study_name = space, sampler, study_name
        self._storage = (optuna.storages.RDBStorage(storage) if isinstance(storage, str)
                         else storage if storage is not None else optuna.storages.InMemoryStorage())
        self._constraint_key, self._budget_keys, self._stopped_early = constraint_key, budget_keys, stopped_early
        self._ids: dict[str, int] = {}  # tune trial id -> storage trial id (a cache of the study's attrs)
        self._study: Optional[optuna.Study] = None
        for point in points_to_evaluate or ():  # created now: a bad storage fails before Tune starts
            self.study.enqueue_trial(point)

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = optuna.create_study(
                study_name=self._study_name, storage=self._storage, sampler=self._sampler, load_if_exists=True,
                directions=[_DIRECTIONS[m] for m in self._mode])
        return self._study

    def _storage_id(self, trial_id: str) -> Optional[int]:
        """The Optuna trial of a Tune trial: this process's cache, else the study's `tune_trial_id`
        attrs (a trial suggested before a driver restart)."""
        if trial_id not in self._ids:
            for t in self.study.get_trials(deepcopy=False):
                if t.user_attrs.get(TUNE_ID_ATTR) == trial_id:
                    self._ids[trial_id] = self._id_of(t.number)
        return self._ids.get(trial_id)

    def _id_of(self, number: int) -> int:
        study_id = self._storage.get_study_id_from_name(self._study_name)
        return self._storage.get_trial_id_from_study_id_trial_number(study_id, number)

    # ------------------------------------------------------------------ Tune's searcher protocol
    def suggest(self, trial_id: str) -> Optional[dict]:
        if (known := self._storage_id(trial_id)) is not None:  # asked again after a restore: the same point
            return dict(self._storage.get_trial(known).params)
        if (adopted := self._adopt(trial_id)) is not None:
            return adopted
        if self._max_trials is not None and self._asked() >= self._max_trials:
            # a resumed sweep whose study holds trials Tune's saved state never saw (started and
            # finished between two of its saves): they count, Tune starts no replacement
            return Searcher.FINISHED
        trial = self.study.ask()
        try:
            trial.set_user_attr(TUNE_ID_ATTR, trial_id)
            self._space(trial)
        except Exception:
            self.study.tell(trial, state=TrialState.FAIL)
            raise
        self._ids[trial_id] = self._id_of(trial.number)
        return dict(trial.params)

    def _asked(self) -> int:
        return sum(t.state != TrialState.WAITING for t in self.study.get_trials(deepcopy=False))

    def _adopt(self, trial_id: str) -> Optional[dict]:
        """The point of a trial a resumed sweep runs again (Tune never saved it), under its own Optuna
        trial, which now names the new Tune trial."""
        pending = list(self.study.user_attrs.get(ADOPT_ATTR, []))
        while pending:
            number = pending.pop(0)
            self.study.set_user_attr(ADOPT_ATTR, pending)
            storage_id = self._id_of(number)
            if self._storage.get_trial(storage_id).state == TrialState.RUNNING:
                trial = optuna.trial.Trial(self.study, storage_id)
                trial.set_user_attr(TUNE_ID_ATTR, trial_id)
                # the space again: params it already holds come back as they were, and those a kill
                # cut off (between `ask` and the last suggestion) are drawn now
                self._space(trial)
                self._ids[trial_id] = storage_id
                return dict(trial.params)
        return None

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False) -> None:
        storage_id = self._storage_id(trial_id)
        if storage_id is None or self._storage.get_trial(storage_id).state.is_finished():
            return  # not ours, or told before (Tune tells twice; a resumed sweep re-runs a finished trial)
        trial = optuna.trial.Trial(self.study, storage_id)
        result = result or {}
        values = [result.get(m) for m in self._metric]
        if error or not finite(values):
            self.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            return
        for key, value in zip(CONSTRAINTS, result.get(self._constraint_key) or ()):
            trial.set_constraint(key, value)
        step, full = (result.get(k) for k in self._budget_keys)
        short = step is not None and full is not None and step < full
        if short or (self._stopped_early is not None and self._stopped_early(trial_id)):  # stopped by the scheduler
            trial.set_user_attr("last_values", [float(v) for v in values])
            trial.set_user_attr("last_epoch", step)
            self.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        else:
            self.study.tell(trial, [float(v) for v in values], state=TrialState.COMPLETE, skip_if_finished=True)
        kill_point("trial-told")

    # ------------------------------------------------------------------ Tune's experiment checkpoints
    def get_state(self) -> dict:
        """The sampler (its random state goes on) and where the study lives; trial ids are re-read
        from the study, which may be newer than this checkpoint."""
        return {"study_name": self._study_name, "storage": self._storage, "sampler": self._sampler,
                "metric": self._metric, "mode": self._mode, "max_trials": self._max_trials}

    def set_state(self, state: dict) -> None:
        self._study_name, self._storage, self._sampler = state["study_name"], state["storage"], state["sampler"]
        self._metric, self._mode = state["metric"], state["mode"]
        self._max_trials = state.get("max_trials")
        self._ids, self._study = {}, None

    def save(self, checkpoint_path: str) -> None:
        atomic_write(checkpoint_path, lambda f: pickle.dump(self.get_state(), f))  # restore never reads half

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_study": None}  # reopened where the searcher is unpickled


