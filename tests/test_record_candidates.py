"""The recorder on 2 tiny candidates (slow: a real sweep), then the replay on its table: the
command a lead runs for hours, checked end to end in minutes."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from sweeps.candidates import CandidateTable, epoch_s_col, top1_col
from sweeps.record_candidates import load_function

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def keep_model(spec) -> float:
    """A stand-in latency model (any function of a ModelSpec will do): 10 ms plus the keep ratios."""
    return 10.0 + sum(spec.schedule.keep)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tempfile.mkdtemp(prefix="sit-rec-", dir="/tmp")  # short: Ray's socket paths
    out = tmp_path_factory.mktemp("record") / "out"
    table = out / "candidates.csv"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": tmp, "RAY_TMPDIR": tmp,
           "SIT_NODE_LOCK_DIR": os.path.join(tmp, "locks"), "SIT_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    os.makedirs(env["SIT_NODE_LOCK_DIR"], exist_ok=True)
    try:
        r = subprocess.run([sys.executable, "sweeps/record_candidates.py", "--smoke-test", "--trials", "2",
                            "--out", str(out), "--table", str(table),
                            "--latency-model", "tests.test_record_candidates:keep_model"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return r, out, table, env


def test_the_table_holds_every_epoch_of_every_candidate(recorded):
    r, out, path, _ = recorded
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 candidates (2 trained to the end)" in r.stdout
    table = CandidateTable.read(path)
    frame, meta = table.frame, table.meta
    assert len(frame) == 2 and (frame["status"] == "ok").all() and table.epochs == 2
    for k in (1, 2):
        assert frame[top1_col(k)].between(0, 100).all() and (frame[epoch_s_col(k)] > 0).all()
    assert (frame["setup_s"] >= 0).all() and (frame["latency_ms"] > 0).all()
    assert (frame["latency_measured_ms"] > 0).all() and (frame["gmacs"] > 0).all()
    expected = [10.0 + sum(row[f"keep_{i}"] for i in range(1, int(row["n_stages"]) + 1)) for _, row in frame.iterrows()]
    assert frame["latency_model_ms"].tolist() == pytest.approx(expected)  # the model asked for, on every candidate
    # the first candidates are the warm starts, with their exact points
    warm = meta["warm_starts"]
    for _, row in frame.iterrows():
        point = warm[int(row["candidate"])]
        assert row["schedule"].startswith("tsm:") and row["keep_1"] == pytest.approx(point["keep_1"])
    # the JSON is strict (no NaN), states the command that rebuilds the table, and the teacher
    text = path.with_suffix(".json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert meta["command"].startswith("python sweeps/record_candidates.py --smoke-test --trials 2")
    assert meta["teacher"]["latency_model_ms"] == 10.0 and meta["concurrent"] >= 1
    assert path.stat().st_size < 400 * 1024


def test_the_replay_runs_on_the_recording(recorded, tmp_path):
    r, out, path, env = recorded
    assert r.returncode == 0, r.stderr[-3000:]
    replay = subprocess.run([sys.executable, "sweeps/replay.py", "--table", str(path), "--samplers", "random,tpe",
                             "--schedulers", "none,moasha", "--seeds", "2", "--budget-trials", "6", "--oracle", "nearest",
                             "--latency-col", "latency_model_ms", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert replay.returncode == 0, replay.stderr[-3000:]
    summary = pd.read_csv(tmp_path / "replay_summary.csv")
    assert len(summary) == 4 and (summary["runs"] == 2).all() and (summary["trials"] >= 3).all()


def test_the_table_is_rebuilt_without_training(recorded):
    """--skip-run: the table again from the finished recording (nothing trains)."""
    r, out, path, env = recorded
    assert r.returncode == 0
    before = path.read_text()
    again = subprocess.run([sys.executable, "sweeps/record_candidates.py", "--skip-run", "--out", str(out),
                            "--table", str(path), "--latency-model", "tests.test_record_candidates:keep_model"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert path.read_text() == before
    assert "recording:" not in again.stdout


def test_a_bad_latency_model_is_one_line():
    with pytest.raises(ValueError, match="no_such_module"):
        load_function("no_such_module:f")
    with pytest.raises(ValueError, match="has no attribute"):
        load_function("math:no_such_function")
    assert not math.isnan(load_function("math:sqrt")(4.0))
