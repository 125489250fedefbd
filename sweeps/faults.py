"""Kill points for the resume tests: `SIT_KILL_AT=<point>` makes the sweep's driver SIGKILL itself
the first time it passes `<point>`.

A trial's end is written to three stores in a fixed order (Optuna, then MLflow; Tune's experiment
state every few seconds), and a kill can fall between any two writes. Killing from outside cannot
hit those windows reliably; these points can, so every case of the kill matrix is a test
(tests/test_kill_matrix.py). Unset, `kill_point` is a dictionary lookup.
"""
from __future__ import annotations

import os
import signal

ENV = "SIT_KILL_AT"
POINTS = ("trial-told",     # a trial's result told to Optuna, its MLflow run still open
          "trial-logged",   # ... and its MLflow run ended, Tune's state not saved since
          "card-written")   # the first card of the front written, the others not


def kill_point(name: str) -> None:
    assert name in POINTS, name
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
