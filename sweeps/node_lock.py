"""A per-node readers/writer lock so speed probes never share the cores with training.

Training steps hold it shared; a speed probe holds it exclusive, so while a probe runs no other
trial on the node is inside a step, and a probe waits for steps in flight to finish. A second
"gate" lock gives the probe priority: once it is waiting, new steps queue behind it (plain flock
would let a steady stream of readers starve it). flock, not a Ray actor: steps take it thousands
of times per trial and a local syscall costs microseconds; it is per machine by construction.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile

LOCK_DIR_ENV = "SIT_NODE_LOCK_DIR"


def _path(name: str) -> str:
    root = os.environ.get(LOCK_DIR_ENV, tempfile.gettempdir())
    return os.path.join(root, f"sit-node-{name}.lock")


class NodeLock:
    """`with lock.shared():` around a training step; `with lock.exclusive():` around a probe."""

    def __init__(self, name: str = "speed-probe"):
        self.data_path, self.gate_path = _path(name), _path(name + "-gate")
        self._data = self._gate = None

    def _open(self):
        if self._data is None:  # opened lazily: the object is pickled into Ray workers
            self._data = open(self.data_path, "a+")
            self._gate = open(self.gate_path, "a+")

    @contextlib.contextmanager
    def shared(self):
        self._open()
        fcntl.flock(self._gate, fcntl.LOCK_SH)  # blocks while a probe holds or waits on the gate
        fcntl.flock(self._gate, fcntl.LOCK_UN)
        fcntl.flock(self._data, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._data, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def exclusive(self):
        self._open()
        fcntl.flock(self._gate, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._data, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._data, fcntl.LOCK_UN)
        finally:
            fcntl.flock(self._gate, fcntl.LOCK_UN)

    def __getstate__(self):
        return {"data_path": self.data_path, "gate_path": self.gate_path, "_data": None, "_gate": None}
