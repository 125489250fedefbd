"""`--resume` after a kill: bring Tune's experiment state, the Optuna study and the MLflow runs to
one account of the trials before Tune restores.

The three stores are written at different moments. Tune saves its experiment state every few
seconds, while the study and MLflow are written as things happen, so a driver killed between two
saves leaves trials the study and MLflow hold but Tune's state never saw (started, or even
finished, after Tune's last save). Tune will not restore those; without this step the resumed
sweep would ask Optuna for new points beside them (a duplicate trial left RUNNING forever) and log
new MLflow runs beside their old ones.

Such an orphan is re-run, with its own Optuna trial: its number goes on the study's adoption list
(the study user attr `sit.adopt`, which `ParetoOptunaSearch.suggest` empties before it asks the
sampler for anything new), and its MLflow run (a partial record: the re-run logs a complete one)
is deleted. A trial that also ENDED between two of Tune's saves stays as the study and MLflow hold
it: the searcher counts the sweep's budget in the study (no replacement is started) and the trial
table takes its values from its MLflow run. Trials Tune does know are left to Tune: finished ones
are kept, unfinished ones go on from their last checkpoint, and the searcher ignores a second
report of a finished trial.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState
from ray import tune

from . import tracking
from .optuna_search import ADOPT_ATTR, TUNE_ID_ATTR


@dataclass(frozen=True)
class Reconciled:
    tune_trials: int            # trials Tune's saved state holds (it restores these)
    adopted: tuple[int, ...]    # Optuna trial numbers Tune never saw: re-run under their own numbers
    deleted_runs: tuple[str, ...]  # their partial MLflow runs

    def summary(self) -> str:
        if not self.adopted:
            return f"resume: Tune, Optuna and MLflow agree on {self.tune_trials} trial(s)"
        return (f"resume: {len(self.adopted)} trial(s) started after Tune's last saved state "
                f"(Optuna #{', #'.join(map(str, self.adopted))}) run again under their own Optuna trials; "
                f"{len(self.deleted_runs)} partial MLflow run(s) of theirs deleted")


def tune_trial_ids(experiment_path: str) -> Optional[set[str]]:
    """The trials Tune restores from its latest saved experiment state; None if it cannot be read
    (then nothing is reconciled: Tune's restore says what is wrong)."""
    if "://" not in experiment_path and not os.path.isdir(experiment_path):
        return None
    try:
        return {t.trial_id for t in tune.ExperimentAnalysis(experiment_path).trials}
    except Exception:  # noqa: BLE001  (no state saved, or unreadable: Tune's own restore reports it)
        return None


def reconcile(experiment_path: str, study_name: str, optuna_storage: str, tracking_uri: str, experiment_id: str,
              parent_run_id: str) -> Reconciled:
    known = tune_trial_ids(experiment_path)
    try:
        study = optuna.load_study(study_name=study_name, storage=optuna_storage)
    except KeyError:  # the kill came before the study was made: nothing in it to reconcile
        study = None
    if known is None or study is None:
        return Reconciled(tune_trials=0, adopted=(), deleted_runs=())
    orphans = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
               if t.user_attrs.get(TUNE_ID_ATTR) not in known]
    numbers = tuple(t.number for t in orphans)
    pending = [n for n in study.user_attrs.get(ADOPT_ATTR, []) if n not in numbers]  # a resume killed in turn
    study.set_user_attr(ADOPT_ATTR, [*pending, *numbers])
    orphan_ids = {t.user_attrs.get(TUNE_ID_ATTR) for t in orphans}
    runs = tracking.trial_table(tracking_uri, experiment_id, parent_run_id)
    deleted = []
    if len(runs):
        client = MlflowClient(tracking_uri)
        for _, run in runs.iterrows():
            tid = run.get("tags.sit.trial_id")
            # an orphan's run, or a run whose trial no store can resume (Tune never saw it, Optuna has no trial for it)
            if tid in orphan_ids or (tid not in known and run["status"] == "RUNNING"):
                client.delete_run(run["run_id"])
                deleted.append(run["run_id"])
    return Reconciled(tune_trials=len(known), adopted=numbers, deleted_runs=tuple(deleted))
