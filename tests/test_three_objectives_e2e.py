"""End to end with three objectives (`--objectives top1:max,latency_ms:min,gmacs:min`): the front is
derived once, so the table's Pareto column, the MLflow `sit.pareto` tags, the sweep's cards and a
standalone `export.py` all name the same trials, and that set is the non-dominated set of the
confirmed rows under the three objectives on measured latency (checked here by brute force);
Optuna's best trials are the front the search saw, on predicted latency (`pareto_predicted`)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_sweep_e2e import (EXPORT, SWEEP, assert_ok, cache_dir, kill_processes_using,  # noqa: F401 (fixtures)
                            pareto_table, parent_and_children, private_tmp, run_pareto, sweep_env)

pytestmark = pytest.mark.slow

OBJECTIVES = {"top1": "max", "latency_ms": "min", "gmacs": "min"}


def dominates(a, b, objectives=OBJECTIVES) -> bool:
    """a is no worse than b on every objective and better on one (signs turn every objective into min)."""
    sa = [-a[k] if d == "max" else a[k] for k, d in objectives.items()]
    sb = [-b[k] if d == "max" else b[k] for k, d in objectives.items()]
    return all(x <= y for x, y in zip(sa, sb)) and any(x < y for x, y in zip(sa, sb))


@pytest.fixture(scope="module")
def three_objective_sweep(tmp_path_factory, private_tmp, cache_dir):  # noqa: F811
    out = tmp_path_factory.mktemp("three") / "out"
    t0 = time.time()
    objectives = ",".join(f"{k}:{d}" for k, d in OBJECTIVES.items())
    # no early stopping: every trial trains its full budget, so all four can be on the front
    result = run_pareto(["--smoke-test", "--trials", "4", "--objectives", objectives, "--scheduler", "none",
                         "--out", str(out)],
                        sweep_env(private_tmp, cache_dir), out.parent / "pareto.log")
    print(f"three-objective sweep: {time.time() - t0:.0f}s")
    kill_processes_using(private_tmp)
    return out, result


def test_every_view_of_the_front_names_the_same_trials(three_objective_sweep, private_tmp, tmp_path):  # noqa: F811
    import optuna

    out, result = three_objective_sweep
    assert_ok(result)
    table = pareto_table(out)
    assert len(table) == 4 and (table["status"] == "ok").all()
    front = set(table.loc[table["pareto"], "trial_id"])

    # the table's column is the brute-force non-dominated set of its feasible rows confirmed end to end,
    # on their measured latency (the front the search saw, on the predicted one, is `pareto_predicted`)
    measured = {("latency_measured_ms" if k == "latency_ms" else k): d for k, d in OBJECTIVES.items()}
    rows = table[table["feasible"] & table["latency_measured_ms"].notna()].to_dict("records")
    expected = {r["trial_id"] for r in rows if not any(dominates(o, r, measured) for o in rows if o is not r)}
    assert front == expected and front
    searched = table.to_dict("records")  # all trained their full budget, no constraints: all were candidates
    assert set(table.loc[table["pareto_predicted"], "trial_id"]) == {
        r["trial_id"] for r in searched if not any(dominates(o, r) for o in searched if o is not r)}

    # MLflow tags
    _, children = parent_and_children(out)
    tagged = {r.data.tags["sit.trial_id"] for r in children if r.data.tags["sit.pareto"] == "true"}
    assert tagged == front

    # Optuna's own Pareto set over the same three directions
    study = optuna.load_study(study_name=SWEEP, storage=f"sqlite:///{out}/optuna.db")
    assert len(study.directions) == 3
    assert {t.user_attrs.get("tune_trial_id") for t in study.best_trials} == set(
        table.loc[table["pareto_predicted"], "trial_id"])  # Optuna saw the search's latency

    # the sweep's cards, and the standalone export's (rebuilt from MLflow with the recorded objectives)
    numbers = dict(zip(table["trial_id"], table["trial_number"]))
    names = {f"tsm-{numbers[t]}" for t in front}
    assert {p.stem for p in Path(out, "cards").glob("*.yaml")} == names
    cards_dir = tmp_path / "cards"
    r = subprocess.run([sys.executable, EXPORT, "--out", str(out), "--cards-dir", str(cards_dir), "--no-register"],
                       cwd=tmp_path, env=sweep_env(private_tmp), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert {p.stem for p in cards_dir.glob("*.yaml")} == names
