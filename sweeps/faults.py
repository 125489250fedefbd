"""Kill points for the resume tests: `SIT_KILL_AT=<point>` makes the process that passes `<point>`
(the sweep's driver, or a Ray Train worker) SIGKILL itself.

A trial's end is written to three stores in a fixed order (Optuna, then MLflow; Tune's experiment
state every few seconds), and a kill can fall between any two writes. Killing from outside cannot
hit those windows reliably; these points can, so every case of the kill matrix is a test
(tests/test_kill_matrix.py). `SIT_HOLD_AT` holds a process at a point instead, until the test
removes a file. Unset, `kill_point` is two dictionary lookups.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

ENV = "SIT_KILL_AT"
POINTS = ("trial-told",      # a trial's result told to Optuna, its MLflow run still open
          "trial-logged",    # ... and its MLflow run ended, Tune's state not saved since
          "card-written",    # the first card of the front written, the others not
          "teacher-epoch",   # the teacher training, its first epoch's checkpoint saved
          "front-measured",  # the front timed end to end, none of the measurements written
          "worker-epoch")    # a Ray Train worker (the last rank) a second into its second epoch

DRIVER_POINTS = POINTS[:5]


def armed(name: str) -> bool:
    assert name in POINTS, name
    return os.environ.get(ENV) == name


def kill_when(name: str, ready: Callable[[], bool], every_s: float = 0.2) -> None:
    """Kill this process as soon as `ready()` holds (polled from a thread: the point is inside work
    this process waits on, e.g. a Ray Train run's first checkpoint)."""
    if not armed(name):
        return

    def poll() -> None:
        while not ready():
            time.sleep(every_s)
        kill_point(name)

    threading.Thread(target=poll, daemon=True, name=f"kill-at-{name}").start()


HOLD_ENV = "SIT_HOLD_AT"  # "<point>:<file>": the process waits at <point> while <file> exists


def hold_point(name: str) -> None:
    """Wait here while the hold file exists (touching `<file>.reached` first): a test does something
    at this exact moment (fills the disk), then lets the process go on."""
    point, _, flag = os.environ.get(HOLD_ENV, "").partition(":")
    if point != name or not flag or not os.path.exists(flag):
        return
    open(flag + ".reached", "w").close()
    while os.path.exists(flag):
        time.sleep(0.1)


def kill_point(name: str, *, after_s: float = 0.0) -> None:
    """Kill this process here (or `after_s` later, from a timer: mid-way through what follows). With
    `SIT_KILL_ONCE=<file>` only the first process to create that file dies (restarted workers go on).
    A point held (`SIT_HOLD_AT`) waits first."""
    hold_point(name)
    if not armed(name):
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
