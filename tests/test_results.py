"""The sweep's trial table (sweeps.results.build) when Tune's results say little."""
from __future__ import annotations

import pandas as pd

from sweeps import results
from sweeps.pareto_front import Constraints


def test_trials_that_failed_before_any_report_make_a_table_not_a_crash():
    point = {"reducer": "tsm", "n_stages": 1, "pos_1": 2, "keep_1": 0.5}
    seen = {tid: {"number": n, "config": point, "error": "worker died", "stopped": False, "wall_s": 3.0,
                  "started_s": 0.0, "ended_s": 3.0, "run_id": f"run-{n}", "checkpoint": None}
            for n, tid in enumerate(("a", "b"))}
    table = results.build(pd.DataFrame(), seen, objectives={"top1": "max", "latency_ms": "min"},
                          constraints=Constraints())
    assert table["trial_id"].tolist() == ["a", "b"] and (table["status"] == "failed").all()
    assert not table["feasible"].any() and not table["pareto"].any() and table["top1"].isna().all()
    assert table["label"].tolist() == ["tsm 2@0.5 #0", "tsm 2@0.5 #1"]
