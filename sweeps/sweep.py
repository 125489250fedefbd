"""The sweep itself (called by `pareto.py` once its plan is validated): the Tuner with the Optuna
searcher, the MO-ASHA scheduler and MLflow logging, then the one trial table, its front, plots,
MLflow summary (hypervolume after every trial, at the time it ended), the orchestration share and
the cards."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd

from ray import tune

from search_spaces import SearchSpace, warm_starts
from sit_core.files import atomic_write_text

from . import pareto_front, results, tracking
from .export import export_cards, pick_rows
from .moasha import ParetoRungs
from .optuna_search import ParetoOptunaSearch, make_sampler
from .runner import Session
from .scheduler import ParetoASHA
from .speed_probe import Prober
from .trial import TRIAL_CPU, SweepContext, run_trial
from .trial_logger import TrialRunLogger

EXPERIMENT = "sit-pareto"


def run_sweep(plan) -> int:
    t0 = time.time()
    job = plan.job
    in_process = plan.workers == 1
    session = Session.start(job, storage=plan.storage, workers=plan.workers, gpu=plan.gpu,
                            cpus_per_worker=plan.cpus_per_worker, concurrent=plan.concurrent,
                            trial_cpu=0.0 if in_process else TRIAL_CPU, address=plan.address)
    os.makedirs(plan.out, exist_ok=True)  # only now: a plan the cluster cannot run writes nothing
    concurrent, workers = plan.concurrent, session.workers
    trial_resources = ({"CPU": workers.cpus_per_worker, **({"GPU": 1} if workers.use_gpu else {})} if in_process
                       else {"CPU": TRIAL_CPU})
    print(f"sweep {plan.name}: {plan.trials} trials, {concurrent} at a time, "
          f"{'in the trial process' if in_process else f'{workers.num_workers} Ray Train workers each'} "
          f"({'GPU' if workers.use_gpu else f'{workers.cpus_per_worker:g} CPU'}), sampler {plan.sampler}, "
          f"objectives {plan.objectives}")

    latency = Prober(job.speed, cache_dir=os.path.join(plan.out, "speed_cache"))
    teacher_speed = latency(job.model.teacher())  # one teacher latency per sweep, used everywhere
    print(f"teacher: {teacher_speed['latency_ms']:.2f} ms/batch, {teacher_speed['gmacs']:.4f} GMACs")

    exp_id = tracking.ensure_experiment(plan.tracking_uri, EXPERIMENT)
    record = plan.record()  # what a later export needs: written beside the runs and into MLflow
    parent = tracking.start_parent_run(plan.tracking_uri, exp_id, plan.name, params={
        k: v for k, v in record.items() if k != "base_job"}, tags={"sit.preset": job.name})
    sweep_json = Path(plan.out, "sweep.json")
    atomic_write_text(sweep_json, json.dumps({**record, "experiment": EXPERIMENT}, indent=1))
    tracking.MlflowClient(plan.tracking_uri).log_artifact(parent, str(sweep_json))

    ctx = SweepContext(base_job=job, workers=workers, storage=plan.storage, constraints=plan.constraints,
                       latency=latency, teacher=[session.teacher_ref])
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), trial_resources)
    scheduler = make_scheduler(plan)
    print("early stopping: " + (f"MO-ASHA, rungs after epochs {scheduler.rungs.rungs} of {job.train.epochs}, the top "
                                f"1/{plan.eta:g} of each rung goes on" if scheduler else "none (every trial trains to the end)"))
    logger = TrialRunLogger(plan.tracking_uri, exp_id, parent, name_of=results.label,
                            stopped_early=scheduler.stopped_early if scheduler else _never_stopped)
    grid = _tuner(plan, trainable, concurrent, searcher=make_searcher(plan, scheduler), scheduler=scheduler,
                  logger=logger).fit()
    trials = _trials(grid, tracking.trial_table(plan.tracking_uri, exp_id, parent))
    table = results.build(grid.get_dataframe(), trials, objectives=plan.objectives, constraints=plan.constraints)
    summary = summarise(plan, table, teacher_speed, session, parent)
    picked = pick_rows(table, plan.export, plan.objectives) if summary["n_pareto"] else table.iloc[:0]
    cards = export_cards(picked, os.path.join(plan.out, "cards"), job, mlflow_info={
        "tracking_uri": plan.tracking_uri, "experiment": EXPERIMENT, "parent_run_id": parent})
    tracking.end_parent_run(plan.tracking_uri, parent)
    print(f"\ncards ({len(cards)}) written to {os.path.join(plan.out, 'cards')}")
    print(f"compare the runs in MLflow: {tracking.mlflow_ui_command(plan.tracking_uri)}")
    print(f"sweep finished in {time.time() - t0:.0f}s")
    return 0


def _trials(grid, children: pd.DataFrame) -> dict:
    """Every trial of the sweep, from the two durable records: MLflow's child runs (number, run id,
    point, wall time) and Tune's results (error, last checkpoint). A trial finished before a resume
    is in both; this process's callback may never have seen it."""
    trials = {}
    for _, run in children.iterrows():
        ended = run["status"] != "RUNNING"
        wall = (run["end_time"] - run["start_time"]).total_seconds() if ended else None
        trials[run["tags.sit.trial_id"]] = {
            "number": int(run["tags.sit.trial_number"]), "config": json.loads(run["tags.sit.point"]),
            "run_id": run["run_id"], "wall_s": wall, "started_s": run["start_time"].timestamp(),
            "ended_s": run["end_time"].timestamp() if ended else None, "error": None, "checkpoint": None,
            "stopped": run.get("tags.sit.stopped_early") == "true"}
    by_config = {json.dumps(t["config"], sort_keys=True): tid for tid, t in trials.items()}
    for r in grid:
        # a trial that failed before its first report has no metrics (no trial id): match its point
        tid = (r.metrics or {}).get("trial_id") or by_config.get(json.dumps(r.config, sort_keys=True))
        if tid in trials:
            trials[tid].update(error=str(r.error) if r.error else None,
                               checkpoint=r.checkpoint.path if r.checkpoint else None)
    return trials


def _never_stopped(trial_id: str) -> bool:
    return False


def make_searcher(plan, scheduler: ParetoASHA | None = None):
    """Optuna through its ask/tell API; metric and mode ONLY on the searcher (on TuneConfig too they
    would make Tune's search single-objective). A callable: the study (and the warm starts it
    enqueues) is made only when a new sweep starts, never on --resume."""
    def build() -> ParetoOptunaSearch:
        space = SearchSpace.for_job(plan.job, plan.reducers)
        return ParetoOptunaSearch(
            space, metric=list(plan.objectives), mode=list(plan.objectives.values()),
            points_to_evaluate=warm_starts(plan.job, space) if plan.warm_start else None,
            sampler=make_sampler(plan.sampler, plan.seed), study_name=plan.name, storage=plan.optuna_storage,
            stopped_early=scheduler.stopped_early if scheduler else None)
    return build


def make_scheduler(plan) -> ParetoASHA | None:
    """MO-ASHA over the sweep's objectives at the validation top-1 reached after each rung's epochs
    (latency is known before training); its decisions are written through to the experiment dir."""
    if plan.scheduler == "none":
        return None
    rungs = ParetoRungs.geometric(plan.grace, plan.eta, plan.job.train.epochs, list(plan.objectives.values()))
    return ParetoASHA(rungs, metrics=list(plan.objectives), time_attr="epoch",
                      state_path=os.path.join(plan.storage, plan.name, "pareto_asha.json"))


def _tuner(plan, trainable, concurrent: int, *, searcher, scheduler, logger: TrialRunLogger) -> tune.Tuner:
    path = os.path.join(plan.storage, plan.name)
    if plan.resume:
        # Tune restores its own searcher, scheduler and callbacks (pickled when the sweep started);
        # the scheduler merges the decisions it wrote through since, the searcher reads the study.
        print(f"resuming {path}: finished trials are kept, unfinished ones continue from their checkpoints")
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher(), scheduler=scheduler, num_samples=plan.trials,
                                    max_concurrent_trials=concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name=plan.name, storage_path=plan.storage, verbose=1, callbacks=[logger],
                                  failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                                  # the newest two: resume needs one, a kill while writing it leaves the other
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )


def summarise(plan, table, teacher_speed: dict, session: Session, parent: str) -> dict:
    """Write the table, plot and hypervolume history; tag MLflow; print the front."""
    objectives = plan.objectives
    reference = results.reference_point(objectives, teacher_speed, plan.job.model.kwargs.get("num_classes", 1000))
    hv = pareto_front.hypervolume(table, objectives, reference)
    # hypervolume against time: trials in the order they finished (each row's last report)
    table["finished_ms"] = (pd.to_numeric(table.get("timestamp"), errors="coerce") * 1000).fillna(0).astype("int64")
    history = pareto_front.hypervolume_history(table, objectives, reference, order_col="finished_ms")
    out = Path(plan.out)
    csv, png, hv_csv = out / "pareto.csv", out / "pareto.png", out / "hypervolume_history.csv"
    table.drop(columns=["config"]).to_csv(csv, index=False)
    history.to_csv(hv_csv, index=False)
    pareto_front.plot_pareto(table, objectives, png, label_col="label", reference_point={
        "top1": session.teacher.metrics.get("val_top1", float("nan")), "latency_ms": teacher_speed["latency_ms"],
        "label": "teacher"})
    runs = table["run_id"].dropna().tolist()
    if runs:
        tracking.tag_pareto(plan.tracking_uri, parent, runs, set(table.loc[table["pareto"], "run_id"].dropna()))
    n_failed, n_stopped = int(table["status"].eq("failed").sum()), int(table["status"].eq("stopped").sum())
    tracking.log_parent_summary(plan.tracking_uri, parent, [csv, png, hv_csv], history, metrics={
        "n_pareto": int(table["pareto"].sum()), "n_trials": len(table), "n_failed": n_failed,
        "n_stopped": n_stopped, "overhead_share": results.overhead_total(table),
        "teacher_top1": session.teacher.metrics.get("val_top1", float("nan")),
        "teacher_latency_ms": teacher_speed["latency_ms"]})
    print("\nTrials (Pareto-optimal marked):")
    print(results.printable(table))
    print(f"\nPareto front: {int(table['pareto'].sum())} of {len(table)} trials ({n_stopped} stopped early, "
          f"{n_failed} failed); hypervolume {hv:.4f} (reference {reference})")
    print(results.overhead_summary(table))
    print(results.slot_use_summary(table, plan.concurrent))
    print(f"table {csv}\nplot {png}\nhypervolume history {hv_csv}")
    return {"hypervolume": hv, "n_pareto": int(table["pareto"].sum())}
