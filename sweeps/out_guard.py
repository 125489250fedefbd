"""A full or read-only --out stops the sweep the way a kill does, with a clear message, before a store
is half-written: the trials' checkpoints, Tune's experiment state and the Optuna/MLflow databases
all live there, and a write that fails inside any of them fails differently (a trial error, a sqlite
error, a Tune warning). A kill is the case resume is proven for (tests/test_kill_matrix.py), so a
sweep that runs out of room stops like one and `--resume` goes on once there is room again.

`SIT_OUT_HEADROOM_MB` (default 64) is the free space under which the sweep stops.
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
import time
from typing import Iterable, Optional

import ray
from ray import tune

HEADROOM_ENV = "SIT_OUT_HEADROOM_MB"
DEFAULT_HEADROOM_MB = 64
EXIT_CODE = 75  # EX_TEMPFAIL: run it again (with --resume) once the condition is gone
DISK_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES)
SQLITE_DISK_ERRORS = ("database or disk is full", "readonly database", "disk I/O error")


class OutUnusable(Exception):
    """--out cannot take the sweep's writes (full, read-only): resumable once it can."""


def headroom_bytes() -> int:
    value = os.environ.get(HEADROOM_ENV, str(DEFAULT_HEADROOM_MB))
    try:
        mb = float(value)
    except ValueError:
        raise ValueError(f"{HEADROOM_ENV}={value!r} is not a number of MB") from None
    return int(mb * 2**20)


def problem(directory: str, headroom: int) -> Optional[str]:
    """Why a sweep cannot keep writing to `directory` (an existing local directory), or None."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".sit-write-probe-") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return f"cannot write to {directory} ({e.strerror or e})"
    free = shutil.disk_usage(directory).free
    if free < headroom:
        return (f"{directory} has {free / 2**20:.0f} MiB free, under the {headroom / 2**20:.0f} MiB the sweep keeps "
                f"for checkpoints and its stores ({HEADROOM_ENV})")
    return None


def advice(what: str) -> str:
    return (f"stopping the sweep: {what}.\nWhat finished is kept (trials, their MLflow runs, the Optuna study); "
            "free some space (or make the directory writable), then run the same command with --resume: "
            "unfinished trials go on from their last checkpoint.")


def disk_error(e: BaseException) -> Optional[str]:
    """The first line of a full/read-only disk error in `e`'s chain (OSError or sqlite's), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        text = str(e)
        for marker in SQLITE_DISK_ERRORS:
            if marker in text:
                return next(line for line in text.splitlines() if marker in line).strip()
        e = e.__cause__ or e.__context__
    return None


class OutGuard(tune.Callback):
    """Checks the sweep's local directories every few seconds of Tune's loop (and the sweep once more
    after it); on a problem it prints why and ends the driver at once (Ray's processes with it),
    leaving the stores as a kill would."""

    def __init__(self, directories: Iterable[str], every_s: float = 2.0):
        self.directories = sorted(set(directories))
        self.every_s = every_s
        self._last = 0.0

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        check(self.directories)


def check(directories: Iterable[str]) -> None:
    """Stop the sweep (see `stop`) if any of `directories` cannot take its writes."""
    headroom = headroom_bytes()
    for directory in directories:
        found = problem(directory, headroom)
        if found:
            stop(found)


def stop(what: str) -> None:
    print("\n" + advice(what), file=sys.stderr, flush=True)
    sys.stdout.flush()
    ray.shutdown()  # the trials die with the driver, mid-epoch, as in a kill: resume continues them
    os._exit(EXIT_CODE)
