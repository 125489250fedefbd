"""The sweep itself (called by `pareto.py` once its plan is validated): the serving node and the
latency table, the Tuner with the Optuna searcher, the MO-ASHA scheduler and MLflow logging (each
finished trial's model and card logged to its run), then the one trial table, the front confirmed by
end-to-end measurement, plots, MLflow summary (hypervolume after every trial, at the time it ended),
the orchestration share, registered picks, cards and the links to open."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException

from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from search_spaces import SearchSpace, apply_point, warm_starts
from sit_core import latency
from sit_core.files import atomic_write_text

from . import cockpit, mlflow_models, out_guard, pareto_front, results, storage, tracking
from .export import export_cards, pick_rows, register
from .faults import kill_point
from .moasha import ParetoRungs
from .optuna_search import ParetoOptunaSearch, make_sampler
from .out_guard import OutGuard
from .reconcile import reconcile
from .runner import Session
from .scheduler import ParetoASHA
from .serving import ServingTarget
from .speed_probe import LatencyModel, Prober
from .train_loop import MODEL_FILE
from .trial import TRIAL_CPU, SweepContext, run_trial
from .trial_logger import PACKAGE_ERROR_TAG, TrialRunLogger
from .trial_model import TrialPackager

EXPERIMENT = "sit-pareto"
NEAR_FRONT = 0.05  # trials within 5% of the front are confirmed too: a prediction that far off could reorder them
# shown when hovering a trial in pareto.html (those the table has)
HOVER_COLS = ("trial_number", "schedule", "top1", "test_top1", "latency_ms", "latency_measured_ms", "latency_iqr_ms",
              "speedup_measured", "gmacs", "speedup", "status", "feasible", "run_id")
# What the driver writes locally (storage.staging_dir) and publishes to --out.
SCHEDULER_STATE = "pareto_asha.json"  # MO-ASHA's decisions, beside the Optuna study they go with
PUBLISHED = ("sweep.json", "pareto.csv", "pareto.png", "pareto.html", "hypervolume_history.csv", "cards", "optuna.db",
             "mlflow.db", SCHEDULER_STATE)


def run_sweep(plan) -> int:
    t0 = time.time()
    job = plan.job
    in_process = plan.workers == 1
    out = storage.local_path(plan.out)
    if out:  # before Ray starts: a sweep that cannot write its results does not train a teacher
        unusable = out_guard.problem(storage.existing_ancestor(out), out_guard.headroom_bytes())
        if unusable:
            raise out_guard.OutUnusable(unusable)
    found = []

    def before_teacher(cap) -> None:
        storage.check_shared_out(plan.out, cap, confirmed=plan.shared_out)
        # where latency is timed: found (and refused, if ambiguous) before a teacher trains or a file is written
        nodes = sum(n for _, n in cap.counts()) if cap.autoscaling else cap.alive
        found.append(ServingTarget.locate(job.speed, plan.latency_resource, trains_on_gpu=plan.gpu,
                                          cluster_nodes=nodes))

    session = Session.start(job, storage=plan.storage, workers=plan.workers, gpu=plan.gpu,
                            cpus_per_worker=plan.cpus_per_worker, concurrent=plan.concurrent,
                            trial_cpu=0.0 if in_process else TRIAL_CPU, trials=plan.trials, address=plan.address,
                            cluster_config=plan.cluster_config, before_teacher=before_teacher)
    try:
        return _run(plan, session, found[0], t0)
    finally:
        session.release()  # the autoscaler may give the nodes back


def _run(plan, session: Session, serving: ServingTarget, t0: float) -> int:
    job = plan.job
    in_process = plan.workers == 1
    os.makedirs(plan.local_dir, exist_ok=True)  # only now: a plan the cluster cannot run writes nothing
    if plan.resume:
        restored = storage.restore_missing(plan.out, plan.local_dir, (*storage.SQLITE_FILES, SCHEDULER_STATE))
        if restored:
            print(f"restored {', '.join(restored)} from {plan.out} into {plan.local_dir}")
    concurrent, workers = session.shape.concurrent, session.workers
    trial_resources = ({"CPU": workers.cpus_per_worker, **({"GPU": 1} if workers.use_gpu else {})} if in_process
                       else {"CPU": TRIAL_CPU})
    print(f"sweep {plan.name}: {plan.trials} trials, {concurrent} at a time, "
          f"{'in the trial process' if in_process else f'{workers.num_workers} Ray Train workers each'} "
          f"({'GPU' if workers.use_gpu else f'{workers.cpus_per_worker:g} CPU'}), sampler {plan.sampler}, "
          f"objectives {plan.objectives}")
    if plan.local_dir != plan.out:
        print(f"local files in {plan.local_dir}, published to {plan.out}")

    print(f"latency ({plan.latency}) on {serving.describe()}")
    if plan.latency == "model":
        table = serving.ensure_table(job.model, plan.reducers, directory=plan.latency_table_dir,
                                     protocol=latency.QUICK if plan.smoke else latency.Protocol())
        print(f"{table.describe()}; {table.path}")
        oracle = LatencyModel(table)
    else:
        oracle = Prober(serving, cache_dir=os.path.join(plan.local_dir, "speed_cache"))
    teacher_speed = oracle(job.model.teacher())
    print(f"teacher: {teacher_speed['latency_ms']:.2f} ms/batch ({'predicted' if plan.latency == 'model' else 'measured'}), "
          f"{teacher_speed['gmacs']:.4f} GMACs")

    exp_id = tracking.ensure_experiment(plan.tracking_uri, EXPERIMENT)
    record = plan.record()  # what a later export needs: written beside the runs and into MLflow
    parent = tracking.start_parent_run(plan.tracking_uri, exp_id, plan.name, params={
        k: v for k, v in record.items() if k != "base_job"}, tags={"sit.preset": job.name})
    with tracking.ends_on_error(plan.tracking_uri, parent):  # a crash or Ctrl-C never leaves it RUNNING
        sweep_json = Path(plan.local_dir, "sweep.json")
        # `concurrent` as run (the option may be unset: then what the cluster holds)
        atomic_write_text(sweep_json, json.dumps({**record, "experiment": EXPERIMENT, "concurrent": concurrent},
                                                 indent=1))
        tracking.MlflowClient(plan.tracking_uri).log_artifact(parent, str(sweep_json))
        storage.publish(plan.local_dir, plan.out, ["sweep.json"])  # what export and resume read first

        ctx = SweepContext(base_job=job, workers=workers, storage=plan.storage, constraints=plan.constraints,
                           latency=oracle, teacher=[session.teacher_ref], probe_lock=oracle.mode == "measure")
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), trial_resources)
        mlflow_info = {"tracking_uri": plan.tracking_uri, "experiment": EXPERIMENT, "parent_run_id": parent}
        package = TrialPackager(job, plan.tracking_uri, mlflow_info)
        scheduler = make_scheduler(plan)
        print("early stopping: " + (f"MO-ASHA, rungs after epochs {scheduler.rungs.rungs} of {job.train.epochs}, "
                                    f"the top 1/{plan.eta:g} of each rung goes on" if scheduler
                                    else "none (every trial trains to the end)"))
        logger = TrialRunLogger(plan.tracking_uri, exp_id, parent, name_of=results.label, on_finished=package,
                                stopped_early=scheduler.stopped_early if scheduler else _never_stopped)
        if plan.resume:  # before Tune restores: trials it never saved are run again, not duplicated
            print(reconcile(os.path.join(plan.storage, plan.name), plan.name, plan.optuna_storage, plan.tracking_uri,
                            exp_id, parent).summary())
        tuner = _tuner(plan, trainable, concurrent, logger, session.shape.retries,
                       searcher=make_searcher(plan, scheduler), scheduler=scheduler)
        cockpit.name_objectives(plan.optuna_storage, plan.name, plan.objectives)
        views = cockpit.mlflow_views(plan.tracking_uri, exp_id, parent, plan.name, plan.objectives)
        print(f"watch the trials live: {tracking.mlflow_ui_command(plan.tracking_uri)}\n  then open {views['trials']}")
        grid = tuner.fit()
        out_guard.check(_written_dirs(plan))  # the table, the confirmation's records and the cards need room too
        trials = _trials(grid, tracking.trial_table(plan.tracking_uri, exp_id, parent), plan.storage)
        table = results.build(grid.get_dataframe(), trials, objectives=plan.objectives, constraints=plan.constraints)
        _package_missing(table, package, plan.tracking_uri)
        _close_ended(table, plan.tracking_uri)
        try:
            table, teacher_speed = confirm_front(plan, table, serving, teacher_speed)
        except Exception as e:  # noqa: BLE001  (a lost serving node, ...): keep what the trials found
            summarise(plan, table, teacher_speed, session, parent, concurrent)
            tracking.end_parent_run(plan.tracking_uri, parent, "FAILED")
            storage.publish(plan.local_dir, plan.out, PUBLISHED)  # --resume starts from these
            last = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            print(f"\nconfirming the front failed ({type(e).__name__}: {last}): the trial table above holds the "
                  "search's latency only and no card was exported; run the same command with --resume to confirm "
                  "again (finished trials are not rerun)", file=sys.stderr)
            return 1
        log_confirmation(plan.tracking_uri, parent, table, serving)
        summary = summarise(plan, table, teacher_speed, session, parent, concurrent)
        picked = pick_rows(table, plan.export, plan.objectives) if summary["n_pareto"] else table.iloc[:0]
        registry = _register(plan, table, picked)
        cards = export_cards(picked, os.path.join(plan.local_dir, "cards"), job, mlflow_info, registry=registry)
        cockpit.optuna_views(plan.optuna_storage, plan.name, plan.objectives, summary["search_reference"],
                             note=_note(plan, summary, views))
        tracking.end_parent_run(plan.tracking_uri, parent)
        published = storage.publish(plan.local_dir, plan.out, PUBLISHED)
        if published:
            print(f"published {', '.join(published)} to {plan.out}")
        print(f"\ncards ({len(cards)}) written to {storage.join(plan.out, 'cards')}")
        if registry:
            aliases = sorted(a for info in registry.values() for a in info["aliases"])
            print(f"registered in MLflow as {plan.name!r} ({len(registry)} versions), aliases {', '.join(aliases)}: "
                  f"sit_core.load_card('models:/{plan.name}@knee')")
        print(f"compare the runs in MLflow: {tracking.mlflow_ui_command(plan.tracking_uri)}\n"
              f"  Pareto-optimal trials: {views['pareto']}\n  all trials: {views['trials']}\n"
              f"  interactive Pareto plot: {views['plot']}\n  the sweep (plots, tables): {views['parent']}")
        print(f"Optuna's dashboard: {cockpit.dashboard_command(plan.optuna_storage)}\n"
              f"  the sweep's study: {cockpit.dashboard_url(plan.optuna_storage, plan.name)}")
        print(f"sweep finished in {time.time() - t0:.0f}s")
        return 0


def _register(plan, table: pd.DataFrame, picked: pd.DataFrame) -> dict:
    """The picks in MLflow's Model Registry; a registry that refuses them costs the aliases, not the cards."""
    if not len(picked):
        return {}
    try:
        return register(table, picked, plan.export, plan.objectives, tracking_uri=plan.tracking_uri, name=plan.name)
    except (MlflowException, LookupError) as e:
        print(f"warning: the picks were not registered in MLflow ({e}); the cards are written all the same")
        return {}


def _package_missing(table: pd.DataFrame, package: TrialPackager, tracking_uri: str) -> None:
    """Log the model and card of finished trials that have none (their driver was killed between
    training and packaging, or packaging failed): a resumed sweep loses nothing."""
    client = tracking.MlflowClient(tracking_uri)
    for _, row in table[table["status"].eq("ok") & table["run_id"].notna() & table["checkpoint"].notna()].iterrows():
        if mlflow_models.logged_model(tracking_uri, row["run_id"]) is not None:
            continue
        with tempfile.TemporaryDirectory() as tmp:  # a checkpoint in object storage comes here first
            storage.fetch(storage.join(row["checkpoint"], MODEL_FILE), os.path.join(tmp, MODEL_FILE))
            local = storage.local_path(row["checkpoint"]) or tmp
            tags = package(row["run_id"], row["config"], int(row["trial_number"]), row.to_dict(), local)
        for key, value in tags.items():
            client.set_tag(row["run_id"], key, value)
        if PACKAGE_ERROR_TAG in client.get_run(row["run_id"]).data.tags:  # packaged now
            client.delete_tag(row["run_id"], PACKAGE_ERROR_TAG)


def _close_ended(table: pd.DataFrame, tracking_uri: str) -> None:
    """End the MLflow runs of trials that ended while their run stayed open (the driver was killed
    between a trial's end and its run's closing, and the resumed Tune knew the trial as ended)."""
    if "run_status" not in table:
        return
    for _, row in table[table["run_status"].eq("RUNNING") & table["run_id"].notna()].iterrows():
        status = {"ok": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}[row["status"]]
        reported = pd.to_numeric(row.get("reported_at"), errors="coerce")
        tracking.end_trial_run(tracking_uri, row["run_id"], status,
                               end_time_ms=int(reported * 1000) if pd.notna(reported) else None)


def _note(plan, summary: dict, views: Mapping) -> str:
    return (f"## SiT Pareto sweep `{plan.name}`\n\n"
            f"Objectives {plan.objectives}; {summary['n_pareto']} Pareto-optimal of {summary['n_trials']} trials; "
            f"hypervolume {summary['hypervolume']:.4g} against the reference point {summary['reference']} "
            "(chance accuracy, the teacher's cost). Infeasible trials never count.\n\n"
            f"MLflow (with `mlflow ui` running): [Pareto-optimal trials]({views['pareto']}), "
            f"[all trials]({views['trials']}), [the sweep]({views['parent']}).\n")


def _trials(grid, children: pd.DataFrame, storage_path: str) -> dict:
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
            "ended_s": run["end_time"].timestamp() if ended else None, "error": None,
            # what MLflow holds stands for a trial Tune's saved state never saw (ended between its saves)
            "checkpoint": run.get("tags.sit.checkpoint") if isinstance(run.get("tags.sit.checkpoint"), str) else None,
            "logged": {k.split(".", 1)[1]: v for k, v in run.items() if k.startswith("metrics.") and pd.notna(v)},
            "stopped": run.get("tags.sit.stopped_early") == "true", "run_status": run["status"]}
    by_config = {json.dumps(t["config"], sort_keys=True): tid for tid, t in trials.items()}
    for r in grid:
        # a trial that failed before its first report has no metrics (no trial id): match its point
        tid = (r.metrics or {}).get("trial_id") or by_config.get(json.dumps(r.config, sort_keys=True))
        if tid in trials:
            # a multi-worker trial's checkpoints are its Train run's: Tune's result names the last one
            checkpoint = (storage.checkpoint_location(r.checkpoint)
                          or storage.on_storage(storage_path, (r.metrics or {}).get(CHECKPOINT_PATH_KEY))
                          or trials[tid]["checkpoint"])
            trials[tid].update(error=str(r.error) if r.error else None, checkpoint=checkpoint)
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
            stopped_early=scheduler.stopped_early if scheduler else None, max_trials=plan.trials)
    return build


def make_scheduler(plan) -> ParetoASHA | None:
    """MO-ASHA over the sweep's objectives at the validation top-1 reached after each rung's epochs
    (latency is known before training); its decisions are written through beside the Optuna study
    (the driver's local dir, published to --out with it)."""
    if plan.scheduler == "none":
        return None
    rungs = ParetoRungs.geometric(plan.grace, plan.eta, plan.job.train.epochs, list(plan.objectives.values()))
    return ParetoASHA(rungs, metrics=list(plan.objectives), time_attr="epoch",
                      state_path=os.path.join(plan.local_dir, SCHEDULER_STATE))


def _tuner(plan, trainable, concurrent: int, logger: TrialRunLogger, retries: int = 0, *, searcher,
           scheduler: ParetoASHA | None) -> tune.Tuner:
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
        run_config=tune.RunConfig(name=plan.name, storage_path=plan.storage, verbose=1,
                                  callbacks=[logger, OutGuard(_written_dirs(plan))],
                                  # preempted (drained) nodes are never counted: `retries` covers spot
                                  # nodes reclaimed without notice (cluster.SPOT_TRIAL_RETRIES)
                                  failure_config=tune.FailureConfig(max_failures=retries, fail_fast=False),
                                  # the newest two: resume needs one, a kill while writing it leaves the other
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )


def _written_dirs(plan) -> list[str]:
    """The local directories the sweep writes to: its own files, and --out where that is a path."""
    out = storage.local_path(plan.out)
    return [plan.local_dir] + ([out] if out and os.path.isdir(out) else [])


def confirm_front(plan, table: pd.DataFrame, serving: ServingTarget, teacher_speed: dict) -> tuple[pd.DataFrame, dict]:
    """Time the front and the trials within NEAR_FRONT of it end to end on the serving node, interleaved
    with the teacher (identical architectures once), and recompute the front on those measurements.
    Returns the table and the sweep's one teacher latency: the teacher measured beside the front."""
    rows = table[results.to_confirm(table, plan.objectives, NEAR_FRONT)]
    if rows.empty:
        print("\nno feasible trial to confirm")
        return table, teacher_speed
    specs, key_of = {"teacher": plan.job.model.teacher()}, {}
    for i, row in rows.iterrows():
        spec = apply_point(plan.job, row["config"]).model
        key_of[i] = spec.architecture_key()
        specs.setdefault(key_of[i], spec)
    rounds = plan.job.speed.iters
    print(f"\nconfirming {len(rows)} trial(s) on or within {NEAR_FRONT:.0%} of the front ({len(specs) - 1} "
          f"architectures) end to end, interleaved with the teacher: {rounds} rounds on {serving.describe()}")
    t0 = time.time()
    records = serving.measure(specs, rounds=rounds)
    kill_point("front-measured")
    teacher = records["teacher"]
    table = results.confirmed(table, {i: records[k] for i, k in key_of.items()}, teacher, plan.objectives,
                              plan.constraints)
    measured = table[table[results.MEASURED].notna()]
    error = (measured["latency_ms"] / measured[results.MEASURED] - 1).abs()
    print(f"confirmed in {time.time() - t0:.0f} s ({teacher.protocol()}): teacher {teacher.p50_ms:.2f} ms "
          f"(IQR {teacher.iqr_ms:.2f}); trials' latency_ms vs measured: mean |error| {error.mean():.1%}, "
          f"max {error.max():.1%}")
    slower = measured[measured["speedup_measured"] <= 1.0]
    if len(slower):
        print(f"not exported: {', '.join(slower['label'])} measured no faster than the teacher")
    return table, {**teacher_speed, "latency_ms": teacher.p50_ms, "latency_iqr_ms": teacher.iqr_ms,
                   "latency_predicted_ms": teacher_speed["latency_ms"]}


def log_confirmation(uri: str, parent: str, table: pd.DataFrame, serving: ServingTarget) -> None:
    """The measured latency, its spread and the measured speed-up on each confirmed trial's MLflow run,
    the protocol as its `sit.speed` tag; where latency was timed on the parent run."""
    client = tracking.MlflowClient(uri)
    client.set_tag(parent, "sit.latency_node", serving.node_id)
    client.set_tag(parent, "sit.latency_device", serving.describe())
    if results.MEASURED not in table:
        return
    now = int(time.time() * 1000)
    cols = (results.MEASURED, "latency_iqr_ms", "latency_p25_ms", "latency_p75_ms", "speedup_measured",
            "teacher_latency_measured_ms")
    for _, row in table[table[results.MEASURED].notna() & table["run_id"].notna()].iterrows():
        step = int(row["epoch"]) if pd.notna(row.get("epoch")) else 0
        client.log_batch(row["run_id"], metrics=[Metric(c, float(row[c]), now, step) for c in cols], tags=[
            RunTag("sit.speed", json.dumps({f: _plain(row[f"speed.{f}"]) for f in results.SPEED_FIELDS}))])


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def summarise(plan, table, teacher_speed: dict, session: Session, parent: str, concurrent: int) -> dict:
    """Write the table, plots and hypervolume history; tag and attach them in MLflow; print the front.
    Latency is the measured one where the front was confirmed (and the teacher's is the one measured
    beside it); the returned `search_reference` is in the search's own terms (Optuna's study)."""
    confirmed = results.MEASURED in table and table[results.MEASURED].notna().any()
    latency_col = results.MEASURED if confirmed else "latency_ms"
    objectives = {(latency_col if c == "latency_ms" else c): d for c, d in plan.objectives.items()}
    num_classes = plan.job.model.kwargs.get("num_classes", 1000)
    search_reference = results.reference_point(plan.objectives, {
        **teacher_speed, "latency_ms": teacher_speed.get("latency_predicted_ms", teacher_speed["latency_ms"])}, num_classes)
    reference = results.reference_point(plan.objectives, teacher_speed, num_classes)
    reference = {(latency_col if c == "latency_ms" else c): v for c, v in reference.items()}
    hv = pareto_front.hypervolume(table, objectives, reference)
    # hypervolume against time: trials in the order they finished (each row's last report)
    finished = table["reported_at"] if "reported_at" in table else table.get("timestamp")  # ms, else Tune's seconds
    table["finished_ms"] = (pd.to_numeric(finished, errors="coerce") * 1000).fillna(0).astype("int64")
    history = pareto_front.hypervolume_history(table, objectives, reference, order_col="finished_ms")
    out = Path(plan.local_dir)
    csv, png, html, hv_csv = (out / f for f in ("pareto.csv", "pareto.png", cockpit.PLOT, "hypervolume_history.csv"))
    table.drop(columns=["config"]).to_csv(csv, index=False)
    history.to_csv(hv_csv, index=False)
    teacher = {"top1": session.teacher.metrics.get("val_top1", float("nan")), latency_col: teacher_speed["latency_ms"],
               "label": "teacher"}
    search = "predicted" if plan.latency == "model" else "probed"
    pareto_front.plot_pareto(
        table, objectives, png, x=latency_col, label_col="label", number_col="trial_number", reference_point=teacher,
        x_spread=("latency_p25_ms", "latency_p75_ms") if confirmed else None,
        x_predicted="latency_ms" if confirmed else None,
        title=(f"top1 vs latency measured end to end (bars: IQR; hollow: the search's {search} latency): "
               f"{int(table['pareto'].sum())} Pareto-optimal of {len(table)}") if confirmed else None)
    pareto_front.plot_pareto_html(
        table, objectives, html, x=latency_col, label_col="label", reference_point=teacher, hover_cols=HOVER_COLS,
        title=f"{plan.name}: top1 vs {latency_col}" + (f" (the {int(table[latency_col].notna().sum())} trials "
                                                        "confirmed end to end)" if confirmed else ""))
    runs = table["run_id"].dropna().tolist()
    if runs:
        tracking.tag_pareto(plan.tracking_uri, parent, runs, set(table.loc[table["pareto"], "run_id"].dropna()))
    n_failed, n_stopped = int(table["status"].eq("failed").sum()), int(table["status"].eq("stopped").sum())
    # n_pareto is part of the hypervolume history (one point per trial): not repeated as a summary
    tracking.log_parent_summary(plan.tracking_uri, parent, [csv, png, html, hv_csv], history, metrics={
        "n_trials": len(table), "n_failed": n_failed, "n_stopped": n_stopped,
        "overhead_share": results.overhead_total(table), "teacher_top1": teacher["top1"],
        "teacher_latency_ms": teacher_speed["latency_ms"],
        "teacher_latency_predicted_ms": teacher_speed.get("latency_predicted_ms", teacher_speed["latency_ms"]),
        "n_confirmed": int(table[latency_col].notna().sum()) if confirmed else 0})
    print("\nTrials (Pareto-optimal marked):")
    print(results.printable(table))
    print(f"\nPareto front{' (measured latency)' if confirmed else ''}: {int(table['pareto'].sum())} of {len(table)} "
          f"trials ({n_stopped} stopped early, {n_failed} failed); hypervolume {hv:.4f} (reference {reference})")
    print(results.overhead_summary(table))
    print(results.slot_use_summary(table, concurrent))
    print(f"table {csv}\nplots {png} {html}\nhypervolume history {hv_csv}")
    return {"hypervolume": hv, "n_pareto": int(table["pareto"].sum()), "n_trials": len(table), "reference": reference,
            "search_reference": search_reference}
