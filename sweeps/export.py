"""Export the chosen configurations of a finished sweep as cards, from MLflow (no re-running).

    python sweeps/export.py --out runs/pareto                       # the whole Pareto front
    python sweeps/export.py --out runs/pareto --pick knee
    python sweeps/export.py --out runs/pareto --pick budget:12.5    # best accuracy under 12.5 ms
    python sweeps/export.py --out runs/pareto --pick knee --formats pt2,onnx   # + deployable files

The trial table is rebuilt from the sweep's MLflow runs with the sweep's own objectives and
constraints (recorded on its parent run), so the picks are the sweep's: on measured latency where
the sweep confirmed its front, and never a candidate measured no faster than its teacher. Each card embeds the whole
job (`sit_core.card_job` gives it back), the measured accuracy and speed, the MLflow run, model and
registered version, and the weights (the same file, by sha256, as the card in the run's MLflow
model); `sit_core.load_card(path)` rebuilds the model. The picks are registered in MLflow's Model
Registry as versions of one model per sweep, with the aliases `knee`, `fastest`, `most-accurate`
(and `budget-<ms>` for a budget pick): `sit_core.load_card("models:/<sweep>@knee")`.
`--formats pt2,onnx` also writes each pick as a torch.export program and as ONNX beside its card,
each checked against the PyTorch model's logits (sweeps/deploy.py).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Mapping

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pandas as pd

from search_spaces import apply_point
from sit_core.card import load_card, write_card
from sit_core.config import DistillJob
from sweeps import deploy, mlflow_models, pareto_front, results, storage, tracking
from sweeps.cli import doc_parser
from sweeps.faults import kill_point
from sweeps.pareto_front import Constraints
from sweeps.train_loop import MODEL_FILE
from sweeps.trial_model import card_fields, card_name, example_input


MEASURED_TAGS = ("latency_measured_ms", "latency_iqr_ms", "latency_p25_ms", "latency_p75_ms", "speedup_measured",
                 "teacher_latency_measured_ms")


def latency_column(table: pd.DataFrame) -> str:
    """Measured latency once confirmed (`latency_measured_ms`), else the sweep's own."""
    measured = table.get("latency_measured_ms", pd.Series(dtype=float))
    return "latency_measured_ms" if measured.notna().any() else "latency_ms"


def pick_rows(table: pd.DataFrame, pick: str, objectives: Mapping[str, str]) -> pd.DataFrame:
    """The rows to export: the front, its knee, or the most accurate under a latency budget."""
    front = table[table["pareto"]]
    if front.empty:
        raise ValueError("the sweep has no feasible full-budget trial to export")
    latency_col = latency_column(table)
    if pick == "front":
        return front
    objective_cols = {(latency_col if c == "latency_ms" else c): d for c, d in objectives.items()}
    if pick == "knee":
        return table.loc[[pareto_front.knee_point(table, objective_cols)]]
    if pick.startswith("budget:"):
        return table.loc[[pareto_front.budget_pick(table, latency_col, float(pick.split(":", 1)[1]))]]
    raise ValueError(f"--pick {pick!r} must be front, knee or budget:<ms>")


def alias_rows(table: pd.DataFrame, pick: str, objectives: Mapping[str, str]) -> dict:
    """Registry alias -> index label: the front's knee, fastest and most accurate trial, and the
    budget pick's `budget-<ms>` when `pick` is `budget:<ms>`."""
    front = table[table["pareto"]]
    if front.empty:
        return {}
    latency_col = latency_column(table)
    objective_cols = {(latency_col if c == "latency_ms" else c): d for c, d in objectives.items()}
    aliases = {"knee": pareto_front.knee_point(table, objective_cols),
               "fastest": front.sort_values([latency_col, "top1"], ascending=[True, False], kind="stable").index[0],
               "most-accurate": front.sort_values(["top1", latency_col], ascending=[False, True], kind="stable").index[0]}
    if pick.startswith("budget:"):
        budget = float(pick.split(":", 1)[1])
        aliases[mlflow_models.budget_alias(budget)] = pareto_front.budget_pick(table, latency_col, budget)
    return aliases


def register(table: pd.DataFrame, picked: pd.DataFrame, pick: str, objectives: Mapping[str, str], *,
             tracking_uri: str, name: str) -> dict:
    """Register the picked rows' MLflow models as versions of `name`, with the aliases of
    `alias_rows`. Returns {run_id: {"registered_model", "version", "aliases"}} (for the cards)."""
    aliases = {alias: table.loc[i, "run_id"] for alias, i in alias_rows(table, pick, objectives).items()}
    versions = mlflow_models.register_picks(tracking_uri, name, picked["run_id"].tolist(), aliases,
                                            description="Picks of SiT Pareto sweep "
                                                        f"{name!r}: load with sit_core.load_card('models:/{name}@knee')",
                                            tags=measured_tags(table[table["run_id"].isin(
                                                [*picked["run_id"], *aliases.values()])]))
    return {run_id: {"registered_model": name, "version": version,
                     "aliases": [a for a, r in aliases.items() if r == run_id]} for run_id, version in versions.items()}


def measured_tags(rows: pd.DataFrame) -> dict:
    """run id -> the confirmation's measurements as model version tags: the card inside a logged model
    was written when its trial finished, before the sweep measured its front."""
    cols = [c for c in MEASURED_TAGS if c in rows]
    return {row["run_id"]: {f"sit.{c}": f"{float(row[c]):.6g}" for c in cols if pd.notna(row[c])}
            for _, row in rows.iterrows() if isinstance(row["run_id"], str)}


def export_cards(rows: pd.DataFrame, cards_dir: str, base_job: DistillJob, mlflow_info: Mapping,
                 registry: Mapping | None = None, formats: tuple[str, ...] = ()) -> list[Path]:
    """One card per row: the row's job (the base job with its point applied), metrics and weights,
    the run's MLflow model and, from `registry` (`register`'s result), its registered version and
    aliases; `formats` adds deployable files beside the card (`deploy.FORMATS`)."""
    paths = []
    with tempfile.TemporaryDirectory() as tmp:  # weights of checkpoints in object storage come here first
        for _, row in rows.iterrows():
            job = apply_point(base_job, row["config"])
            name = card_name(job, row["trial_number"])
            metrics, speed = card_fields(row)
            run_id = row.get("run_id")
            found = mlflow_models.logged_model(mlflow_info["tracking_uri"], run_id) if isinstance(run_id, str) else None
            mlflow = {**mlflow_info, "run_id": run_id, **({"model_uri": f"models:/{found.model_id}"} if found else {}),
                      **(registry or {}).get(run_id, {})}
            weights = storage.fetch(storage.join(row["checkpoint"], MODEL_FILE), os.path.join(tmp, f"{name}.pt"))
            card = write_card(Path(cards_dir, f"{name}.yaml"), name=name, job=job, weights_path=weights, metrics=metrics,
                              speed=speed, mlflow=mlflow)
            if formats:
                exports = deploy.export(load_card(card), example_input(job, deploy.CHECK_BATCH), card.with_suffix(""),
                                        formats)
                card = write_card(card, name=name, job=job, weights_path=card.with_suffix(".pt"), metrics=metrics,
                                  speed=speed, mlflow=mlflow, extra={"exports": exports})
            paths.append(card)
            kill_point("card-written")
    return paths


def main(argv=None) -> int:
    p = doc_parser(__doc__)
    p.add_argument("--out", default="runs/pareto", help="the sweep's --out directory (default: %(default)s)")
    p.add_argument("--tracking-uri", help="MLflow store (default: the one the sweep recorded in --out)")
    p.add_argument("--pick", default="front", help="front | knee | budget:<latency ms> (default: front)")
    p.add_argument("--cards-dir", help="where cards go (default: OUT/cards)")
    p.add_argument("--formats", default="", help=f"deployable files beside each card: comma list of "
                   f"{', '.join(deploy.FORMATS)} (default: none)")
    p.add_argument("--no-register", action="store_true", help="do not register the picks in MLflow's Model Registry")
    args = p.parse_args(argv)
    try:
        formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
        if bad := [f for f in formats if f not in deploy.FORMATS]:
            raise ValueError(f"--formats {','.join(bad)}: choose from {', '.join(deploy.FORMATS)}")
        out = storage.normalise(args.out)
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
        picked = pick_rows(table, args.pick, objectives)
        registry = None if args.no_register else register(table, picked, args.pick, objectives, tracking_uri=uri,
                                                           name=sweep["name"])
        remote = storage.local_path(out) is None and not args.cards_dir  # cards go to OUT/cards via a local copy
        staged = tempfile.mkdtemp(prefix="sit-cards-") if remote else None
        cards_dir = args.cards_dir or os.path.join(staged or out, "cards")
        paths = export_cards(picked, cards_dir, base_job,
                             {"tracking_uri": uri, "experiment": sweep.get("experiment", "sit-pareto"),
                              "parent_run_id": parent}, registry=registry, formats=formats)
        if staged:
            storage.publish(staged, out, ["cards"])
            paths = [storage.join(out, "cards", p.name) for p in paths]
    except (ValueError, LookupError, KeyError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    for path in paths:
        print(path)
    return 0


def _recorded_sweep(out: str) -> dict:
    marker = storage.join(out, "sweep.json")
    if not storage.exists(marker):
        raise ValueError(f"{out} holds no sweep (no sweep.json): pass --out of a finished sweep")
    return json.loads(storage.read_text(marker))


if __name__ == "__main__":
    sys.exit(main())
