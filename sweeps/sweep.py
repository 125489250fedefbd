"""The sweep itself (called by `pareto.py` once its plan is validated): Tuner + Optuna, then the
Pareto table, hypervolume, plot, MLflow summary and cards."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import optuna
import pandas as pd
import ray
from ray import tune

import search_spaces
from sit_core.schedule import SlimSchedule

from . import pareto_front, tracking
from .export import export_cards, finished_trials, pick_rows
from .optuna_search import ParetoOptunaSearch, make_sampler
from .runner import DEFAULT_CACHE, Workers, ensure_teacher, init_ray, load_teacher_state
from .speed_probe import probe
from .trial import SweepContext, run_trial

TRIAL_CPU = 0.1
EXPERIMENT = "sit-pareto"


def run_sweep(plan) -> int:
    t0 = time.time()
    job = plan.job
    print(init_ray(plan.address))
    concurrent, workers = _fit_to_cluster(plan)
    os.makedirs(plan.out, exist_ok=True)  # only now: a plan the cluster cannot run writes nothing
    print(f"sweep {plan.name}: {plan.trials} trials, {concurrent} at a time, {workers.num_workers} worker(s) each "
          f"({'GPU' if workers.use_gpu else f'{workers.cpus_per_worker:g} CPU'}), sampler {plan.sampler}, "
          f"objectives {plan.objectives}")

    exp_id = tracking.ensure_experiment(plan.tracking_uri, EXPERIMENT)
    sweep_params = {"preset": job.name, "trials": plan.trials, "sampler": plan.sampler, "seed": plan.seed,
                    "objectives": plan.objectives, "reducers": list(plan.reducers),
                    "max_latency_ms": plan.max_latency_ms, "min_top1": plan.min_top1, "base_job": job.to_dict()}
    parent = tracking.start_parent_run(plan.tracking_uri, exp_id, plan.name, params=sweep_params,
                                       tags={"sit.preset": job.name})
    Path(plan.out, "sweep.json").write_text(json.dumps({"name": plan.name, "tracking_uri": plan.tracking_uri}))

    storage = os.path.join(plan.out, "ray")
    teacher = ensure_teacher(job, cache_dir=plan.cache_dir or DEFAULT_CACHE, workers=workers, storage_path=storage)
    teacher_ref = ray.put(load_teacher_state(job, teacher.path))
    speed_cache = os.path.join(plan.out, "speed_cache")
    teacher_speed = probe(job.model.with_schedule(SlimSchedule(reducer="none")), job.speed, cache_dir=speed_cache)
    print(f"teacher: val top-1 {teacher.metrics.get('val_top1', float('nan')):.2f}%, "
          f"{teacher_speed['latency_ms']:.2f} ms/batch, {teacher_speed['gmacs']:.4f} GMACs")

    ctx = SweepContext(base_job=job.to_dict(), workers=workers, storage_path=storage, speed_cache=speed_cache,
                       tracking_uri=plan.tracking_uri, experiment_id=exp_id, parent_run_id=parent,
                       max_latency_ms=plan.max_latency_ms, min_top1=plan.min_top1, objectives=plan.objectives)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx, teacher=[teacher_ref]),
                                    {"CPU": TRIAL_CPU})
    # Epoch reports stream to Tune for progress; only the final one carries the objectives.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    tuner = _tuner(plan, job, trainable, storage, concurrent)
    results = tuner.fit()

    table = _trial_table(results)
    summary = summarise(plan, table, teacher, teacher_speed, parent)
    rows = finished_trials(plan.tracking_uri, EXPERIMENT, plan.name)
    picked = pick_rows(rows, plan.export, {"top1": "max", "latency_ms": "min"}) if summary["n_pareto"] else rows[:0]
    cards = export_cards(rows, picked, os.path.join(plan.out, "cards"))
    tracking.end_parent_run(plan.tracking_uri, parent)
    print(f"\ncards ({len(cards)}) written to {os.path.join(plan.out, 'cards')}")
    print(f"compare the runs in MLflow: {tracking.mlflow_ui_command(plan.tracking_uri)}")
    print(f"sweep finished in {time.time() - t0:.0f}s")
    return 0


def _fit_to_cluster(plan) -> tuple[int, Workers]:
    """Concurrency and per-worker CPUs such that every started trial can get its workers (no deadlock)."""
    res = ray.cluster_resources()
    if plan.gpu:
        concurrent = plan.concurrent or max(1, int(res.get("GPU", 0)) // plan.workers)
        return concurrent, Workers(plan.workers, True, plan.cpus_per_worker or 1.0)
    cpus = res.get("CPU", 1)
    concurrent = plan.concurrent or max(1, min(4, int(cpus)))
    per_worker = plan.cpus_per_worker or round((cpus / concurrent - TRIAL_CPU) / plan.workers * 0.95, 3)
    if concurrent * (TRIAL_CPU + plan.workers * per_worker) > cpus + 1e-9:
        raise ValueError(f"{concurrent} trials x ({TRIAL_CPU} + {plan.workers} x {per_worker} CPU) exceed the "
                         f"cluster's {cpus:g} CPUs: lower --concurrent, --workers or --cpus-per-worker")
    return concurrent, Workers(plan.workers, False, per_worker)


def _tuner(plan, job, trainable, storage: str, concurrent: int) -> tune.Tuner:
    path = os.path.join(storage, plan.name)
    if plan.resume:
        print(f"resuming {path}: finished trials are kept, unfinished ones continue from their checkpoints")
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    family = search_spaces.for_job(job)
    searcher = ParetoOptunaSearch(
        space=family.space(job, plan.reducers),
        metric=list(plan.objectives), mode=list(plan.objectives.values()),  # ONLY here: see STACK.md
        points_to_evaluate=family.warm_starts(job, plan.reducers) if plan.warm_start else None,
        sampler=make_sampler(plan.sampler, plan.seed),
        study_name=plan.name, storage=optuna.storages.RDBStorage(_optuna_url(plan)),
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=plan.trials, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name=plan.name, storage_path=storage, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
    )


def _optuna_url(plan) -> str:
    return f"sqlite:///{os.path.join(plan.out, 'optuna.db')}"


def _trial_table(results) -> pd.DataFrame:
    rows = []
    for r in results:
        m = r.metrics or {}
        # Tune names trial directories run_trial_<id>_<n>_...: n counts trials in creation order
        trial_id, number = Path(r.path).name.removeprefix("run_trial_").split("_")[:2]
        row = {"trial_id": m.get("trial_id", trial_id), "trial_number": int(number),
               "status": "failed" if r.error or m.get("status") != "ok" else "ok",
               "failure": str(r.error).strip().splitlines()[-1] if r.error else None}
        for k in ("top1", "test_top1", "latency_ms", "latency_ms_std", "gmacs", "params_m", "img_s", "schedule",
                  "speedup", "flops_speedup", "worker_nodes",
                  "mlflow_run_id", "wall_s", "work_s", "overhead_s", "overhead_share", "speed_cached"):
            row[k] = m.get(k)
        row["feasible"] = bool(m.get("feasible", False)) and row["status"] == "ok"
        cfg = r.config or {}
        row.update({k: cfg.get(k) for k in ("lambda_token", "lambda_logits", "tau", "lr")})
        rows.append(row)
    table = pd.DataFrame(rows).sort_values("trial_number").reset_index(drop=True)
    for c in ("top1", "latency_ms", "gmacs"):
        table[c] = pd.to_numeric(table[c], errors="coerce")
    return table


def summarise(plan, table: pd.DataFrame, teacher, teacher_speed: dict, parent: str) -> dict:
    """Pareto set, hypervolume (checked against Optuna's own front), plot, MLflow parent summary."""
    objectives = plan.objectives
    table["pareto"] = pareto_front.pareto_mask(table, objectives)
    num_classes = plan.job.model.kwargs.get("num_classes", 1000)
    reference = {"top1": 100.0 / num_classes, "latency_ms": teacher_speed["latency_ms"],
                 "gmacs": teacher_speed["gmacs"]}
    reference = {k: v for k, v in reference.items() if k in objectives}
    hv = pareto_front.hypervolume(table, objectives, reference)
    history = pareto_front.hypervolume_history(table, objectives, reference)
    agree = _optuna_agrees(plan, table)

    out = Path(plan.out)
    csv, png, hv_csv = out / "pareto.csv", out / "pareto.png", out / "hypervolume_history.csv"
    table.to_csv(csv, index=False)
    history.to_csv(hv_csv, index=False)
    pareto_front.plot_pareto(table, objectives, png, reference_point={
        "top1": teacher.metrics.get("val_top1", float("nan")), "latency_ms": teacher_speed["latency_ms"],
        "label": "teacher"})
    children = [r for r in table["mlflow_run_id"].dropna().tolist()]
    pareto_ids = set(table.loc[table["pareto"], "mlflow_run_id"].dropna())
    if children:
        tracking.tag_pareto(plan.tracking_uri, parent, children, pareto_ids)
    n_failed = int((table["status"] != "ok").sum())
    tracking.log_parent_summary(plan.tracking_uri, parent, csv, png, history, metrics={
        "hypervolume": hv, "n_pareto": int(table["pareto"].sum()), "n_trials": len(table), "n_failed": n_failed,
        "teacher_top1": teacher.metrics.get("val_top1", float("nan")), "teacher_latency_ms": teacher_speed["latency_ms"],
        "mean_overhead_share": float(pd.to_numeric(table["overhead_share"], errors="coerce").mean())})

    cols = ["trial_number", "schedule", "top1", "test_top1", "latency_ms", "latency_ms_std", "speedup",
            "flops_speedup", "gmacs", "feasible", "pareto", "status"]
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print("\nTrials (Pareto-optimal marked):")
        print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"\nPareto front: {int(table['pareto'].sum())} of {len(table)} trials ({n_failed} failed); "
          f"hypervolume {hv:.4f} (reference {reference}); Optuna's best_trials agree: {agree}")
    print(f"table {csv}\nplot {png}\nhypervolume history {hv_csv}")
    return {"hypervolume": hv, "n_pareto": int(table["pareto"].sum()), "optuna_agrees": agree}


def _optuna_agrees(plan, table: pd.DataFrame) -> bool:
    """Our pandas Pareto set equals Optuna's best_trials (feasible, completed) on the same study."""
    try:
        study = optuna.load_study(study_name=plan.name, storage=_optuna_url(plan))
    except KeyError:
        return False
    theirs = {t.user_attrs.get("tune_trial_id") for t in study.best_trials}
    ours = set(table.loc[table["pareto"], "trial_id"])
    return theirs == ours
