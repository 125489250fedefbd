"""Export the chosen configurations of a finished sweep as cards, from MLflow (no re-running).

    python sweeps/export.py --out runs/pareto                       # the whole Pareto front
    python sweeps/export.py --out runs/pareto --pick knee
    python sweeps/export.py --out runs/pareto --pick budget:12.5    # best accuracy under 12.5 ms

Each card holds the model spec, schedule, loss weights, measured speed with its protocol, accuracy,
the MLflow run id and the weights; `sit_core.load_card(path)` rebuilds the model.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pandas as pd

from sweeps.cli import doc_parser
from sit_core.card import write_card
from sit_core.config import DistillJob
from sweeps import pareto_front, tracking

METRICS = ("top1", "test_top1", "latency_ms", "latency_ms_std", "latency_ms_p90", "img_s", "gmacs", "params_m")


def finished_trials(tracking_uri: str, experiment: str, sweep_id: str) -> pd.DataFrame:
    """The sweep's trials from MLflow, one row each, with the objective columns unprefixed."""
    exp_id = tracking.ensure_experiment(tracking_uri, experiment)
    parent = tracking.find_parent_run(tracking_uri, exp_id, sweep_id)
    if parent is None:
        raise ValueError(f"no sweep {sweep_id!r} in experiment {experiment!r} at {tracking_uri}")
    runs = tracking.trial_table(tracking_uri, exp_id, parent)
    if runs.empty:
        raise ValueError(f"sweep {sweep_id!r} has no logged trials yet")
    table = pd.DataFrame({"run_id": runs["run_id"], "status": runs["status"],
                          "trial_id": runs.get("tags.sit.trial_id")})
    for m in METRICS:
        table[m] = pd.to_numeric(runs.get(f"metrics.{m}"), errors="coerce")
    table["feasible"] = (runs.get("tags.sit.feasible", pd.Series("false", index=runs.index)) == "true") & (
        runs["status"] == "FINISHED")
    for tag in ("sit.job", "sit.weights", "sit.speed"):
        table[tag] = runs.get(f"tags.{tag}")
    table.attrs.update(tracking_uri=tracking_uri, experiment=experiment, experiment_id=exp_id, parent_run_id=parent)
    return table


def pick_rows(table: pd.DataFrame, pick: str, objectives: dict) -> pd.DataFrame:
    front = table[pareto_front.pareto_mask(table, objectives)]
    if front.empty:
        raise ValueError("the sweep has no feasible finished trial to export")
    if pick == "front":
        return front
    if pick == "knee":
        return table.loc[[pareto_front.knee_point(table, objectives)]]
    if pick.startswith("budget:"):
        budget = float(pick.split(":", 1)[1])
        return table.loc[[pareto_front.budget_pick(table, "latency_ms", budget, "top1")]]
    raise ValueError(f"--pick {pick!r} must be front, knee or budget:<ms>")


def export_cards(table: pd.DataFrame, rows: pd.DataFrame, cards_dir: str) -> list[Path]:
    """Write one card per row; returns their paths."""
    paths = []
    for _, row in rows.iterrows():
        job = DistillJob.from_dict(json.loads(row["sit.job"]))
        name = f"{job.model.schedule.reducer}-{row['trial_id']}".replace("/", "_")
        paths.append(write_card(
            Path(cards_dir, f"{name}.yaml"), name=name, job_or_model_spec=job, weights_path=row["sit.weights"],
            metrics={m: (None if pd.isna(row[m]) else float(row[m])) for m in METRICS},
            speed=json.loads(row["sit.speed"]),
            mlflow={"tracking_uri": table.attrs["tracking_uri"], "experiment": table.attrs["experiment"],
                    "run_id": row["run_id"], "parent_run_id": table.attrs["parent_run_id"]},
        ))
    return paths


def main(argv=None) -> int:
    p = doc_parser(__doc__)
    p.add_argument("--out", default="runs/pareto", help="the sweep's --out directory (default: %(default)s)")
    p.add_argument("--name", default=None, help="sweep name (default: the only/latest sweep recorded in --out)")
    p.add_argument("--tracking-uri", help="MLflow store (default: sqlite database in --out, or MLFLOW_TRACKING_URI)")
    p.add_argument("--experiment", default="sit-pareto", help="MLflow experiment (default: %(default)s)")
    p.add_argument("--pick", default="front", help="front | knee | budget:<latency ms> (default: front)")
    p.add_argument("--cards-dir", help="where cards go (default: OUT/cards)")
    args = p.parse_args(argv)
    try:
        out = os.path.abspath(args.out)
        uri = tracking.resolve_tracking_uri(args.tracking_uri, out)
        name = args.name or _recorded_sweep(out)
        table = finished_trials(uri, args.experiment, name)
        rows = pick_rows(table, args.pick, {"top1": "max", "latency_ms": "min"})
        paths = export_cards(table, rows, args.cards_dir or os.path.join(out, "cards"))
    except (ValueError, LookupError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    for path in paths:
        print(path)
    return 0


def _recorded_sweep(out: str) -> str:
    marker = Path(out, "sweep.json")
    if not marker.exists():
        raise ValueError(f"{out} holds no sweep (no sweep.json); pass --out of a finished sweep or --name")
    return json.loads(marker.read_text())["name"]


if __name__ == "__main__":
    sys.exit(main())
