"""sweeps/latency_check.py: its statistics on constructed numbers, its held-out schedules, and one
smoke run of the command (mechanics only; the real validation runs on a quiet machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import tiny_job
from sit_core.config import override
from sit_core.presets import get_preset
from sweeps.latency_check import accuracy, draw_schedules, main, stability

ROOT = Path(__file__).resolve().parents[1]


def test_accuracy_figures():
    a = accuracy([10.0, 22.0, 27.0, 50.0], [10.0, 20.0, 30.0, 40.0])
    assert a["n"] == 4
    assert a["mape_pct"] == pytest.approx((0 + 10 + 10 + 25) / 4)
    assert a["within"] == pytest.approx(0.75)   # exactly 10% off counts as within
    assert a["spearman"] == pytest.approx(1.0)  # same order
    assert accuracy([3.0, 2.0, 1.0], [1.0, 2.0, 3.0])["spearman"] == pytest.approx(-1.0)


def test_stability_figures():
    runs = pd.DataFrame({"c1": [10.0, 20.0, 30.0, 40.0], "c2": [10.0, 22.0, 29.0, 41.0]}, index=list("abcd"))
    st = stability(runs)
    assert st["cv"]["a"] == 0.0
    assert st["cv"]["b"] == pytest.approx(pd.Series([20.0, 22.0]).std() / 21.0)
    assert st["kendall"] == pytest.approx(1.0)
    swapped = pd.DataFrame({"c1": [1.0, 2.0, 3.0], "c2": [2.0, 1.0, 3.0]})
    assert stability(swapped)["kendall"] == pytest.approx(1 / 3)
    assert "relative_cv" not in st  # no teacher among the models: no speed-ups


def test_stability_over_the_teacher_separates_the_machines_drift():
    """The second confirmation ran on a machine 10% slower for everyone, and model b moved 5% more:
    absolute CVs see the drift, the teacher-relative CV only b's own change."""
    runs = pd.DataFrame({"c1": [100.0, 50.0, 40.0], "c2": [110.0, 55.0, 44.0 * 1.05]}, index=["teacher", "a", "b"])
    st = stability(runs)
    assert st["cv_max"] > 0.06 and st["teacher_change"] == pytest.approx(0.10)
    assert st["relative_cv"]["a"] == pytest.approx(0.0, abs=1e-12)
    assert st["relative_cv"]["b"] == pytest.approx(pd.Series([0.4, 0.4 * 1.05]).std() / (0.4 * 1.025))
    assert st["relative_within_goal"] == 1 and "teacher" not in st["relative_cv"]


def test_held_out_schedules_come_from_the_search_space():
    job = get_preset("fmnist-cpu")
    geometry = job.model.geometry()
    schedules = draw_schedules(job, ["tsm", "drop", "merge"], 30, seed=0)
    assert len({str(s) for s in schedules}) == 30
    assert {s.reducer for s in schedules} == {"tsm", "drop", "merge"}
    for s in schedules:
        s.validate_for(geometry.depth, geometry.num_patches)
        assert 1 <= len(s.positions) <= 3 and all(0.3 <= k <= 0.9 for k in s.keep)
    assert [str(s) for s in draw_schedules(job, ["tsm", "drop", "merge"], 30, seed=0)] == [str(s) for s in schedules]
    two_blocks = override(job, {"model.kwargs.depth": 2})  # one position, 13 keep ratios: 13 schedules in all
    assert len(draw_schedules(two_blocks, ["tsm"], 13, seed=0)) == 13
    with pytest.raises(ValueError, match="distinct schedules"):
        draw_schedules(two_blocks, ["tsm"], 14, seed=0)


def test_bad_reducer_is_one_line_and_exit_2():
    r = subprocess.run([sys.executable, "sweeps/latency_check.py", "--reducers", "prune"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "choose from tsm, drop, merge" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_smoke_run_prints_every_figure(tmp_path):
    csv = tmp_path / "check.csv"
    env = {**os.environ, "SIT_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "sweeps/latency_check.py", "--smoke-test", "--csv", str(csv)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for needle in ("latency table: built in", "held-out schedules", "MAPE", "within +-10%", "Spearman rho",
                   "parts alone", "coefficient of variation", "Kendall tau", "protocol (table)",
                   "protocol (end to end", "goal"):
        assert needle in r.stdout, needle
    table = pd.read_csv(csv)
    assert len(table) == 7 and table["schedule"].iloc[0] == "teacher"
    assert {"predicted_ms", "measured_ms", "iqr_ms", "confirmation_1", "confirmation_2", "error_pct"} <= set(table)
    assert (table["predicted_ms"] > 0).all() and (table["measured_ms"] > 0).all()
    assert list((tmp_path / "cache" / "latency").glob("*.json")), "the table was stored in the cache"


def finished_sweep(out: Path, confirmed: bool = True) -> Path:
    """What a sweep leaves in --out for the front check: sweep.json (the base job) and pareto.csv."""
    out.mkdir()
    (out / "sweep.json").write_text(json.dumps({"name": "s", "base_job": tiny_job().to_dict()}))
    rows = pd.DataFrame({"trial_number": [0, 1, 2, 3], "schedule": ["tsm:1@0.5", "merge:1,2@0.6,0.6", "tsm:1@0.5",
                                                                     "tsm:2@0.9"],
                         "latency_ms": [1.0, 1.2, 1.0, 1.4], "pareto": [True, True, False, False],
                         "latency_measured_ms": [1.1, 1.3, 1.05, None] if confirmed else [None] * 4,
                         "teacher_latency_measured_ms": [2.0, 2.0, 2.0, None] if confirmed else [None] * 4})
    rows.to_csv(out / "pareto.csv", index=False)
    return out


def test_front_check_reconfirms_a_finished_sweeps_front(tmp_path, capsys):
    """Mechanics on a tiny model (two rounds: the numbers mean nothing): the confirmed architectures
    (two distinct, the unconfirmed trial left out) and the teacher, each confirmation its own column."""
    out = finished_sweep(tmp_path / "sweep")
    csv = tmp_path / "front.csv"
    assert main(["--front", str(out), "--rounds", "2", "--warmup", "1", "--threads", "1", "--csv", str(csv)]) == 0
    printed = capsys.readouterr().out
    for needle in ("re-confirming the front", "2 architecture(s) + the teacher", "confirmation 2/2",
                   "stability over 2 independent confirmations of the same 3 models", "coefficient of variation",
                   "Kendall tau between the first two orderings", "over the teacher timed beside it",
                   "against the sweep's own confirmation",
                   "protocol (end to end", "goal"):
        assert needle in printed, needle
    frame = pd.read_csv(csv).set_index("schedule")
    assert list(frame.index) == ["teacher", "tsm:1@0.5", "merge:1,2@0.6,0.6"]
    assert frame.loc["tsm:1@0.5", "sweep_ms"] == pytest.approx(1.075)  # median of the sweep's two trials
    assert frame.loc["teacher", "sweep_ms"] == pytest.approx(2.0)
    assert (frame[["confirmation_1", "confirmation_2"]] > 0).all().all() and (frame["cv"] >= 0).all()


def test_front_check_mistakes_are_one_line_and_exit_2(tmp_path, capsys):
    for argv, message in [(["--front", str(tmp_path)], "holds no finished sweep"),
                          (["--front", str(finished_sweep(tmp_path / "raw", confirmed=False))], "confirmed no front"),
                          (["--front", str(tmp_path / "raw"), "--confirmations", "1"], "--confirmations >= 2")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, (argv, err)
