"""A Tune callback in the sweep's driver that keeps MLflow live: one nested child run per trial,
opened when the trial starts, its epoch metrics logged as they arrive (with their real time), and
closed FINISHED, FAILED or KILLED (stopped early by the scheduler).

Why not Ray's MLflowLoggerCallback: it cannot nest runs under a sweep's parent run, name them, or
reopen a trial's run on resume, and it logs from whatever process the trial runs in. Running in the
driver, this callback also sees trials that crash or are stopped, which never run their own cleanup.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Optional

from ray.tune import Callback

from . import storage, tracking

# Result keys Tune adds itself: bookkeeping, not metrics of the candidate.
TUNE_KEYS = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid", "time_since_restore",
             "iterations_since_restore", "done", "timesteps_total", "episodes_total", "timesteps_since_restore",
             "experiment_tag", "config"}


class TrialRunLogger(Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, *,
                 name_of: Callable[[dict, int], str], stopped_early: Callable[[str], bool] = lambda trial_id: False,
                 step_key: str = "epoch"):
        self.uri, self.experiment_id, self.parent = tracking_uri, experiment_id, parent_run_id
        self.name_of, self.stopped_early, self.step_key = name_of, stopped_early, step_key
        self.runs: dict[str, str] = {}
        self.numbers: Optional[dict[str, int]] = None  # trial id -> its number, loaded from MLflow on first use

    def _known_numbers(self) -> dict[str, int]:
        # Loaded lazily, not passed in: Tuner.restore brings back this object as pickled by the first run.
        if self.numbers is None:
            runs = tracking.trial_table(self.uri, self.experiment_id, self.parent)
            self.numbers = ({} if runs.empty else
                            {t: int(n) for t, n in zip(runs["tags.sit.trial_id"], runs["tags.sit.trial_number"])})
        return self.numbers

    def _run(self, trial) -> str:
        if trial.trial_id not in self.runs:
            self._known_numbers()
            self.numbers.setdefault(trial.trial_id, max(self.numbers.values(), default=-1) + 1)
            number = self.numbers[trial.trial_id]
            self.runs[trial.trial_id] = tracking.start_trial_run(
                self.uri, self.experiment_id, self.parent, trial.trial_id, self.name_of(trial.config, number),
                params=trial.config, tags={"sit.point": json.dumps(trial.config), "sit.trial_number": number})
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):  # retried after a worker failure
        self._run(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = {k: v for k, v in result.items() if k not in TUNE_KEYS}
        step = int(result.get(self.step_key, result.get("training_iteration", 0)))
        stamp = int(result.get("timestamp", time.time()) * 1000) if result.get("timestamp") else None
        tracking.log_epoch(self.uri, self._run(trial), metrics, step=step, timestamp_ms=stamp)

    def on_trial_complete(self, iteration, trials, trial, **info):
        status = "KILLED" if self.stopped_early(trial.trial_id) else "FINISHED"
        checkpoint, last = trial.checkpoint, trial.last_result or {}
        # the node(s) that trained it: the trial process, or the Train workers of a multi-worker trial
        nodes = last.get("worker_nodes") or [last.get("trial_node")]
        tracking.end_trial_run(self.uri, self._run(trial), status,
                               tags={"sit.stopped_early": str(status == "KILLED").lower(),
                                     "sit.nodes": ",".join(n for n in nodes if n),
                                     **({"sit.checkpoint": storage.checkpoint_location(checkpoint)} if checkpoint else {})})

    def on_trial_error(self, iteration, trials, trial, **info):
        tracking.end_trial_run(self.uri, self._run(trial), "FAILED", failure=_error_text(trial))


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = open(path).read() if path else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "trial failed"
