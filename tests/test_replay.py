"""The replay benchmark on synthetic candidate tables: the simulated sweep goes through the real
searcher (ParetoOptunaSearch) and scheduler rule (ParetoRungs); it is deterministic for a seed; it
ranks the sampler the table was built to favour first; the CLI writes its table and plots."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from sweeps.candidates import CandidateTable, synthetic_table
from sweeps.replay import default_budget, room_left, run_benchmark, simulate, summarise

optuna.logging.set_verbosity(optuna.logging.WARNING)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def table():
    return synthetic_table()


@pytest.fixture(scope="module")
def surrogate(table):
    return table.oracle("surrogate")


def test_table_round_trips_through_csv_and_json(table, tmp_path):
    path = table.write(tmp_path / "t.csv")
    back = CandidateTable.read(path)
    assert back.meta == table.meta and back.epochs == 4 and back.space == table.space
    pd.testing.assert_frame_equal(back.frame, table.frame, check_exact=False, rtol=1e-5, check_dtype=False)
    with pytest.raises(ValueError, match="needs the CSV and its t2.json"):
        CandidateTable.read(tmp_path / "t2.csv")


def test_nearest_lookup_finds_recorded_points_exactly(table):
    for i, row in table.frame.head(10).iterrows():
        point = {k: row[k] for k in ("reducer", "n_stages", "lambda_token", "lambda_logits", "tau", "lr")}
        for s in range(1, int(row["n_stages"]) + 1):
            point[f"pos_{s}"], point[f"keep_{s}"] = row[f"pos_{s}"], row[f"keep_{s}"]
        assert table.lookup(point) == i
    # a point is matched within its reducer and stage count first
    one_stage = table.frame[table.frame["n_stages"] == 1].iloc[0]
    probe = {"reducer": "tsm", "n_stages": 1, "pos_1": 1, "keep_1": 0.9, "lambda_token": 1, "lambda_logits": 1,
             "tau": 2, "lr": 1e-3}
    assert table.frame.iloc[table.lookup(probe)]["n_stages"] == 1 == one_stage["n_stages"]


def test_surrogate_answers_the_proposed_learning_rate(table, surrogate):
    """The table's accuracy peaks at lr 1.1e-3; the GP surrogate must follow the proposal's lr (the
    nearest oracle cannot: in 12 dimensions the neighbour of a point is far from it)."""
    point = {"reducer": "tsm", "n_stages": 1, "pos_1": 3, "keep_1": 0.6, "lambda_token": 2.0, "lambda_logits": 2.0,
             "tau": 2.0}
    good, bad = surrogate({**point, "lr": 1.1e-3}, "latency_ms"), surrogate({**point, "lr": 2.2e-4}, "latency_ms")
    assert good.top1[-1] > bad.top1[-1] + 20
    assert good.latency_ms == pytest.approx(bad.latency_ms, abs=0.5)  # latency follows the architecture only
    assert np.all(np.diff(good.top1) > 0)                               # accuracy rises over the epochs


def test_a_replay_is_deterministic(table, surrogate):
    for sampler, scheduler in (("nsga2", (1, 2.0)), ("tpe", None)):
        budget = default_budget(table, 16, 2)
        a = simulate(table, sampler, 3, scheduler=scheduler, budget_s=budget, oracle=surrogate)
        b = simulate(table, sampler, 3, scheduler=scheduler, budget_s=budget, oracle=surrogate)
        pd.testing.assert_frame_equal(a.trials, b.trials)
        pd.testing.assert_frame_equal(a.curve, b.curve)
    c = simulate(table, "tpe", 4, budget_s=budget, oracle=surrogate)
    assert not c.trials["top1"].equals(a.trials["top1"]), "another seed, another sweep"


def test_the_simulated_clock_and_the_scheduler(table):
    """Trials occupy `concurrent` slots for their recorded time; MO-ASHA stops some at its rungs and
    so starts more trials in the same budget; stopped trials never count on the front."""
    budget = default_budget(table, 12, 2)
    plain = simulate(table, "random", 0, budget_s=budget)
    early = simulate(table, "random", 0, scheduler=(1, 2.0), budget_s=budget)
    assert set(plain.trials["status"]) <= {"ok", "failed", "running"}
    stopped = early.trials[early.trials["status"] == "stopped"]
    assert len(stopped) and stopped["epochs"].isin([1, 2]).all()  # 4 epochs: rungs after 1 and 2
    assert len(early.trials) > len(plain.trials)
    for run in (plain, early):
        busy = run.trials.dropna(subset=["end_s"])
        # never more than 2 trials at once
        edges = sorted([(t, 1) for t in busy["start_s"]] + [(t, -1) for t in busy["end_s"]], key=lambda e: (e[0], e[1]))
        assert max(np.cumsum([d for _, d in edges])) <= 2
        assert (run.curve["end_s"] <= budget).all() and run.curve["hypervolume"].is_monotonic_increasing
        assert run.curve["n_ended"].tolist() == list(range(1, len(run.curve) + 1))
    # the front's hypervolume counts only trials that trained their full budget
    full = early.trials[early.trials["status"] == "ok"]
    assert early.hv_at(budget) == pytest.approx(_hv(full, table))


def _hv(trials, table):
    from sweeps.replay import hypervolume
    ref = table.reference("latency_ms")
    points = np.column_stack([-trials["top1"], trials["latency_ms"]])
    return hypervolume(points, np.array([-ref["top1"], ref["latency_ms"]]))


def test_failed_candidates_are_failed_trials(table):
    """The nearest oracle replays divergence: such a trial ends after its first epoch as FAIL."""
    failed = table.frame[table.frame["status"] == "failed"]
    assert len(failed), "the synthetic table has diverging candidates"
    run = simulate(table, "random", 1, budget_s=default_budget(table, 60, 2))
    hit = run.trials[run.trials["candidate"].isin(failed["candidate"])]
    assert len(hit) and (hit["status"] == "failed").all() and hit["top1"].isna().all()


def test_the_replay_ranks_the_sampler_the_table_favours_first(table, surrogate):
    """TPE models where the narrow good lr band lies; random search does not: over 4 seeds TPE's
    median final hypervolume is first, and the Mann-Whitney test sees it."""
    budget = default_budget(table, 30, 2)
    runs = run_benchmark(table, samplers=["random", "tpe"], schedulers=["none"], seeds=4, budget_s=budget,
                         oracle=surrogate, log=lambda *_: None)
    summary, goals = summarise(runs, budget, at_trials=24)
    assert summary["method"].tolist() == ["tpe/none", "random/none"]
    tpe = summary.set_index("method").loc["tpe/none"]
    assert tpe["p_vs_random"] < 0.05 and tpe["time_to_random_frac"] < 1
    assert goals["best_mo_at_trials"] == "tpe/none" and math.isfinite(goals["best_mo_ratio"])
    assert summarise(runs, budget)[0].equals(summary)  # summarising is deterministic too


def test_the_room_a_table_leaves_bounds_every_replayed_front(table):
    """With the nearest oracle every answer is a recorded candidate: no simulated sweep can beat the
    front of the whole table, and that front cannot beat one model with its best top-1 and lowest
    latency. The summary turns both into ratios over random search after `at_trials` trials."""
    nearest = table.oracle("nearest")
    room = room_left(table, nearest, points=50)
    ok = table.frame[table.frame["status"].eq("ok")]
    assert room["best_top1"] == pytest.approx(ok["top1_e4"].max())
    assert room["lowest_latency_ms"] == pytest.approx(table.frame["latency_ms"].min())
    budget = default_budget(table, 16, 2)
    runs = run_benchmark(table, samplers=["random", "tpe"], schedulers=["none"], seeds=2, budget_s=budget,
                         oracle=nearest, log=lambda *_: None)
    best_run = max(r.hv_at(budget) for r in runs)
    assert 0 < best_run <= room["front_hv"] + 1e-9 < room["utopia_hv"]
    _, goals = summarise(runs, budget, at_trials=8, room=room)
    assert goals["utopia_ratio"] == pytest.approx(room["utopia_hv"] / goals["random_hv_at_trials"])
    assert goals["front_ratio"] <= goals["utopia_ratio"]


def test_replay_cli_writes_its_table_and_plots(tmp_path):
    out = tmp_path / "replay"
    r = subprocess.run([sys.executable, str(ROOT / "sweeps" / "replay.py"), "--synthetic", "--samplers", "random,tpe",
                        "--schedulers", "none,moasha", "--seeds", "2", "--budget-trials", "10", "--at-trials", "6", "--oracle", "nearest",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("replay_summary.csv", "replay_trials.csv", "replay_curves.csv", "replay_hypervolume.png",
                 "replay_attainment.png"):
        assert (out / name).is_file(), name
    assert (out / "replay_hypervolume.png").read_bytes()[:4] == b"\x89PNG"
    summary = pd.read_csv(out / "replay_summary.csv")
    assert sorted(summary["method"]) == ["random/moasha", "random/none", "tpe/moasha", "tpe/none"]
    assert "goal 1:" in r.stdout and "goal 2:" in r.stdout and "Mann-Whitney" in r.stdout and "room:" in r.stdout
    goals = json.loads((out / "replay_goals.json").read_text())
    assert goals["front_hv"] <= goals["utopia_hv"] and goals["random_hv_at_trials"] > 0


@pytest.mark.parametrize("args, message", [(["--samplers", "cmaes"], "choose from tpe, nsga2, random, gp"),
                                           (["--samplers", "tpe"], "keep random in --samplers"),
                                           (["--schedulers", "asha"], "choose from none, moasha"),
                                           (["--eta", "1"], "--eta 1 must be > 1")])
def test_replay_cli_refuses_bad_input(args, message):
    r = subprocess.run([sys.executable, str(ROOT / "sweeps" / "replay.py"), "--synthetic", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_replay_cli_refuses_a_missing_table(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "sweeps" / "replay.py"), "--table", str(tmp_path / "nope.csv")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "needs the CSV" in r.stderr and "Traceback" not in r.stderr, r.stderr
