"""Kill points for the resume tests: `SIT_KILL_AT=<point>` makes the process that passes `<point>`
(the sweep's driver, or a Ray Train worker) SIGKILL itself.

A trial's end is written to three stores in a fixed order (Optuna, then MLflow; Tune's experiment
state every few seconds), and a kill can fall between any two writes. Killing from outside cannot
hit those windows reliably; these points can, so every case of the kill matrix is a test
(tests/test_kill_matrix.py). Unset, `kill_point` is a dictionary lookup.
"""
from __future__ import annotations

import os
import signal
import threading

ENV = "SIT_KILL_AT"
POINTS = ("trial-told",     # a trial's result told to Optuna, its MLflow run still open
          "trial-logged",   # ... and its MLflow run ended, Tune's state not saved since
          "card-written",   # the first card of the front written, the others not
          "worker-epoch")   # a Ray Train worker (the last rank) a second into its second epoch

DRIVER_POINTS = POINTS[:3]


def kill_point(name: str, *, after_s: float = 0.0) -> None:
    """Kill this process here (or `after_s` later, from a timer: mid-way through what follows). With
    `SIT_KILL_ONCE=<file>` only the first process to create that file dies (restarted workers go on)."""
    assert name in POINTS, name
    if os.environ.get(ENV) != name:
        return
    once = os.environ.get("SIT_KILL_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    if after_s:
        threading.Timer(after_s, os.kill, (os.getpid(), signal.SIGKILL)).start()
    else:
        os.kill(os.getpid(), signal.SIGKILL)
