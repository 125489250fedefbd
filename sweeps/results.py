"""The sweep's trial table: built once from Tune's results, its feasibility and Pareto columns
computed once. The MLflow tags, the plots, the cards and the printout all read this table; the
standalone export rebuilds the same table from MLflow (`from_mlflow`).

One row per started trial: its point, last reported metrics, status (ok | stopped | failed),
whether it trained its full budget, `feasible` (constraints met, full budget, finite objectives),
`pareto` (on the front of the feasible rows) and, after confirmation (`confirmed`), the latency
measured end to end with its spread, the speed-up over the teacher measured beside it, and the
front recomputed on those measurements (`pareto_predicted` keeps the front the search saw).
"""
from __future__ import annotations

import json
from typing import Mapping, Optional

import numpy as np
import pandas as pd

from . import pareto_front
from .pareto_front import Constraints

SHOWN = ["trial_number", "label", "top1", "test_top1", "latency_ms", "latency_measured_ms", "latency_iqr_ms",
         "speedup_measured", "gmacs", "epoch", "status", "work_s", "wall_s", "feasible", "pareto_predicted", "pareto"]
MEASURED = "latency_measured_ms"
# what a card's `speed` section keeps of a confirmation's SpeedRecord (the numbers are metrics)
SPEED_FIELDS = ("device", "device_name", "dtype", "batch_size", "threads", "warmup", "rounds", "samples",
                "torch_version", "timm_version", "protocol")


def label(config: Mapping, number: Optional[int] = None) -> str:
    """What a trial is, for people: `tsm 3,6,9@0.7 #12`."""
    n = int(config.get("n_stages", 0))
    positions = ",".join(str(int(config[f"pos_{i + 1}"])) for i in range(n))
    keeps = [f"{float(config[f'keep_{i + 1}']):g}" for i in range(n)]
    keep = keeps[0] if len(set(keeps)) == 1 else ",".join(keeps)
    return f"{config.get('reducer', 'tsm')} {positions}@{keep}" + (f" #{number}" if number is not None else "")


REPORTED = ("epoch", "full_epochs", "top1", "latency_ms", "gmacs", "test_top1")


def build(tune_frame: pd.DataFrame, trials: Mapping[str, dict], *, objectives: Mapping[str, str],
          constraints: Constraints) -> pd.DataFrame:
    """`tune_frame`: `ResultGrid.get_dataframe()` (last result of each trial that reported).
    `trials`: what the driver saw of every started trial, by trial id: `number`, `config`, `error`,
    `stopped` (by the scheduler), `wall_s` (and `started_s`, `ended_s`: epoch seconds), `run_id`,
    `checkpoint` (path of the last one)."""
    seen = pd.DataFrame([{"trial_id": tid, **info} for tid, info in trials.items()])
    if seen.empty:
        seen = pd.DataFrame(columns=["trial_id", "number", "config", "error", "stopped", "wall_s", "started_s",
                                     "ended_s", "run_id", "checkpoint"])
    frame = tune_frame.drop(columns=[c for c in tune_frame.columns if c.startswith("config/")], errors="ignore")
    if "trial_id" not in frame:  # no trial reported anything (every one failed before its first epoch)
        frame = pd.DataFrame({"trial_id": pd.Series(dtype=object)})
    table = seen.merge(frame, on="trial_id", how="left").rename(columns={"number": "trial_number"})
    for col in REPORTED:  # a column no trial reported (every one failed early) reads as missing values
        if col not in table:
            table[col] = np.nan
    if "logged" in table:  # a trial Tune's saved state never saw: its values as MLflow logged them
        for col in (*REPORTED, "work_s", "trial_wall_s", "params_m"):
            logged = table["logged"].map(lambda m, c=col: m.get(c) if isinstance(m, dict) else None)
            table[col] = pd.to_numeric(table[col] if col in table else logged, errors="coerce").fillna(
                pd.to_numeric(logged, errors="coerce"))
        table = table.drop(columns=["logged"])
    table["label"] = [label(c, n) for c, n in zip(table["config"], table["trial_number"])]
    epoch = pd.to_numeric(table.get("epoch"), errors="coerce")
    full = pd.to_numeric(table.get("full_epochs"), errors="coerce")
    table["full_budget"] = (epoch >= full).fillna(False).astype(bool)
    table["status"] = np.select([table["error"].notna(), table["stopped"].fillna(False).astype(bool)],
                                ["failed", "stopped"], "ok")
    for col in ("top1", "latency_ms", "gmacs", "test_top1"):
        table[col] = pd.to_numeric(table.get(col), errors="coerce")
    table["overhead_share"] = overhead_shares(table)
    return mark(table, objectives, constraints).sort_values("trial_number", kind="stable").reset_index(drop=True)


def mark(table: pd.DataFrame, objectives: Mapping[str, str], constraints: Constraints,
         latency_col: str = "latency_ms") -> pd.DataFrame:
    """(Re)compute `feasible` and `pareto`: only full-budget, successful trials meeting the
    constraints can be on the front. Called once on predicted latency, once after confirmation
    (`latency_col=MEASURED`): then a row is judged on its measured latency where it has one, a
    measured speed-up over the teacher <= 1 makes it infeasible (never exported as a faster model),
    and only measured rows can be on the front."""
    table = table.copy()
    judged = pd.to_numeric(table[latency_col], errors="coerce")
    if latency_col != "latency_ms":
        judged = judged.fillna(pd.to_numeric(table["latency_ms"], errors="coerce"))
    feasible = (constraints.column(table.assign(_judged=judged), latency_col="_judged") & table["full_budget"]
                & table["status"].eq("ok"))
    if "speedup_measured" in table:
        feasible &= ~(pd.to_numeric(table["speedup_measured"], errors="coerce") <= 1.0)
    table["feasible"] = feasible
    objective_cols = {(latency_col if c == "latency_ms" else c): d for c, d in objectives.items()}
    table["pareto"] = pareto_front.pareto_mask(table, objective_cols)
    return table


def to_confirm(table: pd.DataFrame, objectives: Mapping[str, str], tolerance: float = 0.05) -> pd.Series:
    """Rows whose latency the end of the sweep measures: the front and the rows whose predicted latency
    is within `tolerance` of putting them on it (their accuracy is measured, not predicted)."""
    return table["pareto"] | pareto_front.near_front(table, objectives, tolerance, uncertain=("latency_ms",))


def confirmed(table: pd.DataFrame, records: Mapping, teacher, objectives: Mapping[str, str],
              constraints: Constraints) -> pd.DataFrame:
    """The table with the end-to-end measurements of `records` (row label -> `SpeedRecord`, all timed
    interleaved with `teacher`'s record), and the front recomputed on them."""
    table = table.copy()
    table["pareto_predicted"] = table["pareto"]
    for col in (MEASURED, "latency_iqr_ms", "latency_p25_ms", "latency_p75_ms", "speedup_measured",
                "teacher_latency_measured_ms"):
        table[col] = np.nan
    for col in SPEED_FIELDS:
        table[f"speed.{col}"] = None
    for i, r in records.items():
        table.loc[i, [MEASURED, "latency_iqr_ms", "latency_p25_ms", "latency_p75_ms", "speedup_measured",
                      "teacher_latency_measured_ms"]] = [r.p50_ms, r.iqr_ms, r.p25_ms, r.p75_ms,
                                                         teacher.p50_ms / r.p50_ms, teacher.p50_ms]
        speed = {**r.to_dict(), "protocol": r.protocol()}
        for col in SPEED_FIELDS:
            table.at[i, f"speed.{col}"] = speed[col]
    return mark(table, objectives, constraints, latency_col=MEASURED)
def overhead_shares(table: pd.DataFrame) -> pd.Series:
    """Each trial's orchestration share: the part of its wall time (`wall_s`, the driver's view: its
    MLflow run opens when Tune starts the trial and closes when Tune ends it, so actor start-up,
    data loading, model building, reporting, checkpoints and the driver's bookkeeping all count)
    spent outside measuring latency, training and evaluating (`work_s`, summed by the trial). NaN
    for a trial resumed after a kill (its wall time spans the downtime) or without both times."""
    wall, work = _numbers(table, "wall_s"), _numbers(table, "work_s")
    resumed = _numbers(table, "resumed_from_epoch").fillna(0) > 0
    share = (1.0 - work / wall).clip(lower=0.0)
    return share.where((wall > 0) & ~resumed)


def _numbers(table: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(table[col], errors="coerce") if col in table else pd.Series(float("nan"), index=table.index)


def overhead_total(table: pd.DataFrame) -> float:
    """The sweep's orchestration share: summed over the trials with a share (see overhead_shares)."""
    usable = table[table["overhead_share"].notna()]
    wall, work = usable["wall_s"].astype(float).sum(), usable["work_s"].astype(float).sum()
    return 1.0 - work / wall if wall > 0 else float("nan")


def overhead_summary(table: pd.DataFrame) -> str:
    """One line for the end of a sweep: the orchestration share over all trials, and per trial."""
    usable = table[table["overhead_share"].notna()]
    if usable.empty:
        return "orchestration share: no trial with both its wall time and its work time"
    wall, work = usable["wall_s"].astype(float).sum(), usable["work_s"].astype(float).sum()
    per = usable["overhead_share"]
    return (f"orchestration share: {overhead_total(table):.1%} of trial wall time ({wall - work:.0f} s of {wall:.0f} s "
            f"outside latency/train/eval, {len(usable)} trials; per trial median {per.median():.1%}, "
            f"max {per.max():.1%})")


def slot_use_summary(table: pd.DataFrame, concurrent: int) -> str:
    """One line on the gaps between trials, which no trial's wall time holds (the searcher asking
    the sampler, Tune starting the next trial): the share of the trial phase's slot time (first
    trial start to last trial end, times `concurrent`) spent on trials' work."""
    started, ended = _numbers(table, "started_s"), _numbers(table, "ended_s")
    work = _numbers(table, "work_s").fillna(0.0).sum()
    span = ended.max() - started.min()
    if not span > 0:
        return "trial slots: no finished trial"
    return (f"trial slots: {work / (concurrent * span):.1%} of {concurrent} x {span:.0f} s (first trial start to "
            f"last trial end) spent on latency/train/eval")


def reference_point(objectives: Mapping[str, str], teacher: Mapping[str, float], num_classes: int) -> dict:
    """Chance accuracy and the teacher's cost: a candidate counts only if better than guessing and
    cheaper than the model it replaces."""
    ref = {"top1": 100.0 / num_classes, "latency_ms": teacher["latency_ms"], "gmacs": teacher["gmacs"]}
    return {k: ref[k] for k in objectives}


def printable(table: pd.DataFrame) -> str:
    cols = [c for c in SHOWN if c in table.columns]
    with pd.option_context("display.width", 220, "display.max_columns", 30):
        return table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}")


def from_mlflow(runs: pd.DataFrame, objectives: Mapping[str, str], constraints: Constraints) -> pd.DataFrame:
    """The same table from a finished sweep's MLflow child runs (`tracking.trial_table`), for the
    standalone export: the last logged value of each metric, the point from the params."""
    table = pd.DataFrame({"trial_id": runs["tags.sit.trial_id"], "run_id": runs["run_id"]})
    for col in runs.columns:
        if col.startswith("metrics."):
            table[col.removeprefix("metrics.")] = pd.to_numeric(runs[col], errors="coerce")
    table["config"] = [json.loads(p) if isinstance(p, str) else {} for p in runs.get("tags.sit.point", [None] * len(runs))]
    table["trial_number"] = pd.to_numeric(runs.get("tags.sit.trial_number"), errors="coerce")
    table["checkpoint"] = runs.get("tags.sit.checkpoint")
    table["label"] = [label(c, n) for c, n in zip(table["config"], table["trial_number"])]
    status = runs["status"].map({"FINISHED": "ok", "KILLED": "stopped"}).fillna("failed")
    table["status"] = status
    table["full_budget"] = (table.get("epoch") >= table.get("full_epochs")).fillna(False).astype(bool)
    if "tags.sit.speed" in runs:  # what a confirmation recorded of its protocol (a JSON tag)
        speed = [json.loads(t) if isinstance(t, str) else {} for t in runs["tags.sit.speed"]]
        for col in SPEED_FIELDS:
            table[f"speed.{col}"] = [d.get(col) for d in speed]
    latency_col = MEASURED if MEASURED in table and table[MEASURED].notna().any() else "latency_ms"
    return mark(table, objectives, constraints, latency_col=latency_col)
