"""Record a candidate table for the replay benchmark: train many candidates of a preset, each once.

    python sweeps/record_candidates.py --trials 200                  # the fmnist-cpu table (hours on 2 cores)
    python sweeps/record_candidates.py --smoke-test --trials 3 --out /tmp/rec --table /tmp/rec/candidates.csv

Runs `sweeps/pareto.py` with random sampling (the paper's warm starts first) and no early stopping,
so every candidate trains its full budget, two at a time as the default sweep does; then reads every
trial's per-epoch reports (Tune's `result.json`) and the sweep's trial table (`pareto.csv`) into one
compact table (`sweeps.candidates`): the point, validation top-1 after each epoch, each epoch's
seconds, the rest of the trial's wall time, the latency the sweep used (`latency_ms`), the latency
measured alone on this machine (`latency_measured_ms`, `sweeps.speed_probe`, cached per
architecture) and, with `--latency-model pkg.module:function` (a function of a `ModelSpec`
returning ms, or a dict with `latency_ms`), a modelled latency (`latency_model_ms`). Killed? Run the
same command again: the sweep resumes (`pareto.py --resume`) and the table is rebuilt. Other
options (`--preset`, `--teacher-checkpoint`, `--epochs`...) go to pareto.py as they are.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pandas as pd

from sweeps.candidates import PARAMS, CandidateTable, epoch_s_col, top1_col
from sweeps.cli import doc_parser, positive_int

ROOT = Path(__file__).resolve().parents[1]
PARETO = ROOT / "sweeps" / "pareto.py"


def build_parser():
    p = doc_parser(__doc__)
    p.add_argument("--trials", type=positive_int, default=200, help="candidates to train (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random sampling seed (default: %(default)s)")
    p.add_argument("--out", default="runs/record", help="the recording sweep's directory (default: %(default)s)")
    p.add_argument("--table", help="where to write the table (default: benchmarks/<preset>-candidates.csv)")
    p.add_argument("--latency-model", metavar="MODULE:FUNCTION",
                   help="a latency model for the latency_model_ms column (default: none)")
    p.add_argument("--skip-run", action="store_true", help="only rebuild the table from a finished recording")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args, passthrough = p.parse_known_args(argv)
    out = Path(args.out).resolve()
    name = "record"
    try:
        model_fn = load_function(args.latency_model) if args.latency_model else None
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    if not args.skip_run:
        sweep = [sys.executable, str(PARETO), "--sampler", "random", "--scheduler", "none", "--trials", str(args.trials),
                 "--seed", str(args.seed), "--out", str(out), "--name", name, *passthrough]
        if (out / "ray" / name).exists():
            sweep.append("--resume")
        print("recording:", shlex.join(sweep), flush=True)
        rc = subprocess.run(sweep, cwd=ROOT).returncode
        if rc != 0:
            print(f"the recording sweep exited with {rc}; its trials are kept: run the same command again to resume",
                  file=sys.stderr)
            return rc
    if not (out / "pareto.csv").is_file():
        p.exit(2, f"{p.prog}: error: no finished recording in {out} (pareto.csv missing)\n")
    command = shlex.join(["python", "sweeps/record_candidates.py", *(sys.argv[1:] if argv is None else argv)])
    table = build_table(out, name, command=command, latency_model=model_fn)
    dest = Path(args.table or ROOT / "benchmarks" / f"{table.meta['preset']}-candidates.csv")
    table.write(dest)
    ok = int((table.frame["status"] == "ok").sum())
    print(f"{len(table.frame)} candidates ({ok} trained to the end) -> {dest} ({dest.stat().st_size / 1024:.0f} KB) "
          f"and {dest.with_suffix('.json').name}")
    return 0


def load_function(spec: str) -> Callable:
    module, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"--latency-model {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"--latency-model {spec!r} is not callable")
    return fn


def build_table(out: Path, name: str, *, command: str, latency_model: Optional[Callable] = None) -> CandidateTable:
    """The table from a finished recording sweep in `out` (see the module docstring)."""
    from search_spaces import SearchSpace, apply_point, warm_starts
    from sit_core.config import DistillJob
    from sweeps.speed_probe import probe

    record = json.loads((out / "sweep.json").read_text())
    job = DistillJob.from_dict(record["base_job"])
    epochs = job.train.epochs
    trials = pd.read_csv(out / "pareto.csv", dtype={"trial_id": str}).set_index("trial_id")
    points = _points(record)
    reports = _reports(out / "ray" / name)
    def measure(spec):  # here, cached per architecture (the sweep's own probe cache with --latency measure)
        return probe(spec, job.speed, cache_dir=str(out / "speed_cache"))
    rows = []
    for trial_id, trial in trials.iterrows():
        config = points[trial_id]
        spec = apply_point(job, config).model
        epochs_seen = reports.get(trial_id, {})
        row = {"candidate": int(trial["trial_number"]), **{k: config.get(k, math.nan) for k in PARAMS},
               "schedule": str(spec.schedule), "status": "ok" if trial["status"] == "ok" else "failed"}
        spent = 0.0
        for k in range(1, epochs + 1):
            r = epochs_seen.get(k, {})
            row[top1_col(k)] = r.get("val_top1", math.nan)
            row[epoch_s_col(k)] = r.get("train_s", math.nan) + r.get("eval_s", 0.0) if r else math.nan
            spent += row[epoch_s_col(k)] if r else 0.0
        wall = float(trial["wall_s"]) if pd.notna(trial.get("wall_s")) else math.nan
        if not epochs_seen and math.isfinite(wall):
            row[epoch_s_col(1)] = wall  # failed before its first report: its time counts as one epoch
            spent = wall
        row["setup_s"] = max(0.0, wall - spent) if math.isfinite(wall) else math.nan
        row["test_top1"] = trial.get("test_top1", math.nan)
        row["gmacs"], row["params_m"] = trial.get("gmacs", math.nan), trial.get("params_m", math.nan)
        row["latency_ms"] = trial.get("latency_ms", math.nan)
        row["latency_measured_ms"] = measure(spec)["latency_ms"]
        row["latency_model_ms"] = _model_latency(latency_model, spec)
        rows.append(row)
    frame = pd.DataFrame(rows).sort_values("candidate", kind="stable").reset_index(drop=True)
    space = SearchSpace.for_job(job, tuple(record.get("reducers", ["tsm"])))
    teacher = job.model.teacher()
    meta = {
        "preset": job.name, "epochs": epochs, "num_classes": int(job.model.kwargs.get("num_classes", 1000)),
        "space": dataclasses.asdict(space), "warm_starts": warm_starts(job, space), "concurrent": record.get("concurrent"),
        "teacher": {k: (v if math.isfinite(v) else None) for k, v in (  # JSON has no NaN
            ("latency_ms", _teacher_latency(record)), ("latency_measured_ms", measure(teacher)["latency_ms"]),
            ("latency_model_ms", _model_latency(latency_model, teacher)))},
        "command": command, "sweep": str(out), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "versions": _versions(),
    }
    return CandidateTable(frame, meta)


def _reports(sweep_dir: Path) -> dict:
    """trial id -> epoch -> its last report (a resumed trial may have reported an epoch twice)."""
    out: dict[str, dict[int, dict]] = {}
    for result in sweep_dir.glob("*/result.json"):
        for line in result.read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if "epoch" in r and "trial_id" in r:
                out.setdefault(r["trial_id"], {})[int(r["epoch"])] = r
    return out


def _points(record: dict) -> dict:
    """trial id -> its point, from the sweep's MLflow child runs (a trial that failed before its
    first report has no Tune result, but has its run)."""
    from sweeps import tracking

    client = tracking.MlflowClient(record["tracking_uri"])
    exp = client.get_experiment_by_name(record.get("experiment", "sit-pareto"))
    parent = tracking.find_parent_run(record["tracking_uri"], exp.experiment_id, record["name"])
    runs = tracking.trial_table(record["tracking_uri"], exp.experiment_id, parent)
    return {tid: json.loads(point) for tid, point in zip(runs["tags.sit.trial_id"], runs["tags.sit.point"])}


def _model_latency(fn: Optional[Callable], spec) -> float:
    if fn is None:
        return math.nan
    value = fn(spec)
    return float(value["latency_ms"] if isinstance(value, dict) else value)


def _teacher_latency(record: dict) -> float:
    from sweeps import tracking

    client = tracking.MlflowClient(record["tracking_uri"])
    exp = client.get_experiment_by_name(record.get("experiment", "sit-pareto"))
    runs = client.search_runs([exp.experiment_id], f"tags.`sit.sweep_id` = '{record['name']}'")
    return float(runs[0].data.metrics.get("teacher_latency_ms", math.nan)) if runs else math.nan


def _versions() -> dict:
    import optuna
    import ray
    import timm
    import torch
    return {"torch": torch.__version__, "timm": timm.__version__, "ray": ray.__version__, "optuna": optuna.__version__,
            "python": platform.python_version()}


if __name__ == "__main__":
    sys.exit(main())
