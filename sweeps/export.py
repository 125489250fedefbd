"""Export the chosen configurations of a finished sweep as cards, from MLflow (no re-running).

    python sweeps/export.py --out runs/pareto                       # the whole Pareto front
    python sweeps/export.py --out runs/pareto --pick knee
    python sweeps/export.py --out runs/pareto --pick budget:12.5    # best accuracy under 12.5 ms

The trial table is rebuilt from the sweep's MLflow runs with the sweep's own objectives and
constraints (recorded on its parent run), so the picks are the sweep's: on measured latency where
the sweep confirmed its front, and never a candidate measured no faster than its teacher. Each card embeds the whole
job (`sit_core.card_job` gives it back), the measured accuracy and speed, the MLflow run and the
weights; `sit_core.load_card(path)` rebuilds the model.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Mapping

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pandas as pd

from search_spaces import apply_point
from sit_core.card import write_card
from sit_core.config import DistillJob
from sweeps import pareto_front, results, tracking
from sweeps.cli import doc_parser
from sweeps.pareto_front import Constraints
from sweeps.train_loop import MODEL_FILE

# latency_ms: what the search saw (predicted, or probed per trial); latency_measured_ms and the rest: the
# sweep's end-to-end confirmation, interleaved with the teacher (its p50 beside them)
CARD_METRICS = ("top1", "test_top1", "latency_ms", "latency_measured_ms", "latency_iqr_ms", "latency_p25_ms",
                "latency_p75_ms", "speedup_measured", "teacher_latency_measured_ms", "gmacs", "params_m")


def pick_rows(table: pd.DataFrame, pick: str, objectives: Mapping[str, str]) -> pd.DataFrame:
    """The rows to export: the front, its knee, or the most accurate under a latency budget."""
    front = table[table["pareto"]]
    if front.empty:
        raise ValueError("the sweep has no feasible full-budget trial to export")
    latency_col = "latency_measured_ms" if table.get("latency_measured_ms", pd.Series(dtype=float)).notna().any() else "latency_ms"
    if pick == "front":
        return front
    objective_cols = {(latency_col if c == "latency_ms" else c): d for c, d in objectives.items()}
    if pick == "knee":
        return table.loc[[pareto_front.knee_point(table, objective_cols)]]
    if pick.startswith("budget:"):
        return table.loc[[pareto_front.budget_pick(table, latency_col, float(pick.split(":", 1)[1]))]]
    raise ValueError(f"--pick {pick!r} must be front, knee or budget:<ms>")


def export_cards(rows: pd.DataFrame, cards_dir: str, base_job: DistillJob, mlflow_info: Mapping) -> list[Path]:
    """One card per row: the row's job (the base job with its point applied), metrics and weights."""
    paths = []
    for _, row in rows.iterrows():
        job = apply_point(base_job, row["config"])
        name = f"{job.model.schedule.reducer}-{int(row['trial_number'])}"
        metrics = {m: (None if pd.isna(row.get(m)) else float(row[m])) for m in CARD_METRICS if m in row}
        speed = {k.removeprefix("speed."): row[k] for k in row.index if k.startswith("speed.") and pd.notna(row[k])}
        paths.append(write_card(
            Path(cards_dir, f"{name}.yaml"), name=name, job=job, weights_path=Path(row["checkpoint"], MODEL_FILE),
            metrics=metrics, speed=speed, mlflow={**mlflow_info, "run_id": row.get("run_id")}))
    return paths


def main(argv=None) -> int:
    p = doc_parser(__doc__)
    p.add_argument("--out", default="runs/pareto", help="the sweep's --out directory (default: %(default)s)")
    p.add_argument("--tracking-uri", help="MLflow store (default: the one the sweep recorded in --out)")
    p.add_argument("--pick", default="front", help="front | knee | budget:<latency ms> (default: front)")
    p.add_argument("--cards-dir", help="where cards go (default: OUT/cards)")
    args = p.parse_args(argv)
    try:
        out = os.path.abspath(args.out)
        sweep = _recorded_sweep(out)
        uri = tracking.resolve_tracking_uri(args.tracking_uri or sweep["tracking_uri"], out)
        exp_id = tracking.ensure_experiment(uri, sweep.get("experiment", "sit-pareto"))
        parent = tracking.find_parent_run(uri, exp_id, sweep["name"])
        if parent is None:
            raise ValueError(f"no sweep {sweep['name']!r} at {uri}")
        record = tracking.read_json_artifact(uri, parent, "sweep.json")  # the sweep's own settings
        objectives = record["objectives"]
        constraints = Constraints(record["max_latency_ms"], record["min_top1"])
        table = results.from_mlflow(tracking.trial_table(uri, exp_id, parent), objectives, constraints)
        base_job = DistillJob.from_dict(record["base_job"])
        paths = export_cards(pick_rows(table, args.pick, objectives), args.cards_dir or os.path.join(out, "cards"),
                             base_job, {"tracking_uri": uri, "experiment": sweep.get("experiment", "sit-pareto"),
                                        "parent_run_id": parent})
    except (ValueError, LookupError, KeyError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    for path in paths:
        print(path)
    return 0


def _recorded_sweep(out: str) -> dict:
    marker = Path(out, "sweep.json")
    if not marker.exists():
        raise ValueError(f"{out} holds no sweep (no sweep.json): pass --out of a finished sweep")
    return json.loads(marker.read_text())


if __name__ == "__main__":
    sys.exit(main())
