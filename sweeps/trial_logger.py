"""A Tune callback in the sweep's driver that keeps MLflow live: one nested child run per trial,
opened when the trial starts, its epoch metrics logged as they arrive (stamped with the time the
trial reported them, `REPORTED_AT` in its results, else their arrival), and closed FINISHED, FAILED or
KILLED (stopped early by the scheduler, or still running when the sweep ended) with the time the
trial ended. A finished trial is first handed to `on_finished` (the sweep logs its model and card),
on a background thread: packaging a model takes seconds, and Tune's event loop (which starts the
next trials) waits for its callbacks. `on_experiment_end` waits for that thread.

Why not Ray's MLflowLoggerCallback: it cannot nest runs under a sweep's parent run, name them, or
reopen a trial's run on resume, and it logs from whatever process the trial runs in. Running in the
driver, this callback also sees trials that crash or are stopped, which never run their own cleanup.
"""
from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping, Optional

from ray.tune import Callback

from . import storage, tracking

# Result keys Tune adds itself: bookkeeping, not metrics of the candidate.
TUNE_KEYS = {"training_iteration", "time_this_iter_s", "time_total_s", "timestamp", "pid", "time_since_restore",
             "iterations_since_restore", "done", "timesteps_total", "episodes_total", "timesteps_since_restore",
             "experiment_tag", "config"}
PACKAGE_ERROR_TAG = "sit.package_error"
REPORTED_AT = "reported_at"  # time.time() when the trial reported a result: its timestamp, not a metric
log = logging.getLogger(__name__)


class TrialRunLogger(Callback):
    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str, *,
                 name_of: Callable[[dict, int], str], stopped_early: Callable[[str], bool] = lambda trial_id: False,
                 on_finished: Optional[Callable[..., Mapping[str, str]]] = None, step_key: str = "epoch"):
        """`on_finished(run_id, config, number, last_result, checkpoint_dir) -> tags` runs for each trial
        that finished with a checkpoint, before its run is closed; an error there is logged and
        tagged `sit.package_error` on the run (the trial itself stays FINISHED; the sweep retries at its end)."""
        self.uri, self.experiment_id, self.parent = tracking_uri, experiment_id, parent_run_id
        self.name_of, self.stopped_early, self.step_key = name_of, stopped_early, step_key
        self.on_finished = on_finished
        self.runs: dict[str, str] = {}
        self.logged_steps: dict[str, int] = {}  # run id -> last step logged by this process
        self.open: set[str] = set()  # trial ids whose runs this process opened and has not closed
        self.numbers: Optional[dict[str, int]] = None  # trial id -> its number, loaded from MLflow on first use
        self._packer: Optional[ThreadPoolExecutor] = None  # made on first use: Tune pickles this callback

    def __getstate__(self):
        return {**self.__dict__, "_packer": None}

    def _known_numbers(self) -> dict[str, int]:
        # Loaded lazily, not passed in: Tuner.restore brings back this object as pickled by the first run.
        if self.numbers is None:
            runs = tracking.trial_table(self.uri, self.experiment_id, self.parent)
            self.numbers = ({} if runs.empty else
                            {t: int(n) for t, n in zip(runs["tags.sit.trial_id"], runs["tags.sit.trial_number"])})
        return self.numbers

    def _run(self, trial) -> str:
        if trial.trial_id not in self.runs:
            if trial.trial_id not in self._known_numbers():
                self.numbers[trial.trial_id] = _number(trial, set(self.numbers.values()))
            number = self.numbers[trial.trial_id]
            self.runs[trial.trial_id] = tracking.start_trial_run(
                self.uri, self.experiment_id, self.parent, trial.trial_id, self.name_of(trial.config, number),
                params=trial.config, tags={"sit.point": json.dumps(trial.config), "sit.trial_number": number})
        return self.runs[trial.trial_id]

    def _start(self, trial) -> None:
        self._run(trial)
        self.open.add(trial.trial_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._start(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):  # retried after a worker failure
        self._start(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        metrics = {k: v for k, v in result.items() if k not in TUNE_KEYS and k != REPORTED_AT}
        step = int(result.get(self.step_key, result.get("training_iteration", 0)))
        run_id = self._run(trial)
        # the first report of a run in this process checks its history (a resumed trial's epochs are there)
        tracking.log_epoch(self.uri, run_id, metrics, step=step, timestamp_ms=_ms(result.get(REPORTED_AT) or time.time()),
                           logged_through=self.logged_steps.get(run_id))
        self.logged_steps[run_id] = max(step, self.logged_steps.get(run_id, step))

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        ended = _ms(last.get(REPORTED_AT) or time.time())  # its last report; closing the run comes later
        status = "KILLED" if self.stopped_early(trial.trial_id) else "FINISHED"
        checkpoint = trial.checkpoint
        # the node(s) that trained it: the trial process, or the Train workers of a multi-worker trial
        nodes = last.get("worker_nodes") or [last.get("trial_node")]
        tags = {"sit.stopped_early": str(status == "KILLED").lower(), "sit.nodes": ",".join(n for n in nodes if n),
                **({"sit.checkpoint": storage.checkpoint_location(checkpoint)} if checkpoint else {})}
        run_id = self._run(trial)
        if status == "FINISHED" and checkpoint and self.on_finished is not None:
            if self._packer is None:
                self._packer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sit-package")
            number = self.numbers[trial.trial_id]
            self._packer.submit(self._package_and_close, trial.trial_id, run_id, dict(trial.config), number, last,
                                checkpoint, tags, ended)
        else:
            self._close(trial.trial_id, run_id, status, tags, ended)

    def _package_and_close(self, trial_id: str, run_id: str, config: dict, number: int, last: dict, checkpoint,
                           tags: dict, ended: int) -> None:
        try:
            with checkpoint.as_directory() as d:
                tags = {**tags, **self.on_finished(run_id, config, number, last, d)}
        except Exception as e:  # noqa: BLE001  (the trial trained: keep it, say what is missing)
            log.warning("trial %s: its model could not be logged to MLflow: %r", trial_id, e)
            tags = {**tags, PACKAGE_ERROR_TAG: f"{type(e).__name__}: {e}"[:500]}
        try:
            self._close(trial_id, run_id, "FINISHED", tags, ended)
        except Exception:  # noqa: BLE001  (a thread's exception would vanish: say it; the sweep's end retries)
            log.exception("trial %s: its MLflow run could not be closed", trial_id)

    def _close(self, trial_id: str, run_id: str, status: str, tags: dict, ended: int) -> None:
        tracking.end_trial_run(self.uri, run_id, status, tags=tags, end_time_ms=ended)
        self.open.discard(trial_id)

    def on_trial_error(self, iteration, trials, trial, **info):
        tracking.end_trial_run(self.uri, self._run(trial), "FAILED", failure=_error_text(trial))
        self.open.discard(trial.trial_id)

    def on_experiment_end(self, trials, **info):
        if self._packer is not None:
            self._packer.shutdown(wait=True)  # every finished trial packaged and closed
            self._packer = None
        # Trials still running when Tune stops (the sweep interrupted): their runs end KILLED rather
        # than RUNNING forever; a resumed sweep reopens them.
        for trial_id in sorted(self.open):
            tracking.end_trial_run(self.uri, self.runs[trial_id], "KILLED", tags={"sit.interrupted": "true"})
        self.open.clear()


def _number(trial, taken: set[int]) -> int:
    """Trials are numbered in the order Tune created them (its experiment tag starts with that count,
    `3_lr=...`): the sampler's order, warm starts first, whichever trial's process started first.
    A count already taken (a resumed sweep's counter may start again) gives the next free number."""
    m = re.match(r"(\d+)_", getattr(trial, "experiment_tag", "") or "")
    preferred = int(m.group(1)) - 1 if m else None
    return preferred if preferred is not None and preferred >= 0 and preferred not in taken else max(taken, default=-1) + 1


def _ms(seconds: float) -> int:
    return int(float(seconds) * 1000)


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        text = open(path).read() if path else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "trial failed"
