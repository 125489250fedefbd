"""MLflow tracking for sweeps: one parent run per sweep, one nested child run per trial.

The only module that talks to MLflow (no Ray here either): the sweep driver and its trials call
these functions with an explicit tracking URI, so no process-global MLflow state
(``mlflow.set_tracking_uri``, active runs) leaks between trials or into Ray's own integrations.

Layout in the store:
- experiment: created once by the driver (``ensure_experiment``) with an explicit artifact
  location, so artifacts never land in ``./mlartifacts`` of whatever directory a trial runs in, and
  tagged as model training (``mlflow.experimentKind``), not GenAI.
- parent run (``sit.role=sweep``, ``sit.sweep_id=<id>``): sweep settings, Pareto CSV, plot,
  hypervolume history. A resumed sweep finds and reopens it instead of making a second one.
- child runs (``sit.role=trial``, ``sit.trial_id=<id>``, ``mlflow.parentRunId=<parent>`` so the UI
  nests them), named by what they are (``tsm 3,6,9@0.7 #12``): created when the trial starts,
  per-epoch metrics as they arrive (``step=epoch``, real timestamps), the status (FINISHED, FAILED,
  KILLED when stopped early) and the failure reason. ``sit.pareto=true|false`` once the front is known.

Experiments, runs and metric series are idempotent on their keys (name, sweep id, trial id,
step), so a resumed sweep can log everything again without duplicating runs or history points.
The Ray side (a Tune callback that calls these functions as results arrive) is in trial_logger.py;
logged and registered models are in mlflow_models.py.

The UI: MLflow 3.17 opens an experiment in its GenAI view unless the URL says
``workflowType=machine_learning`` (its view switcher ignores the experiment's kind tag, which older
3.x UIs read); ``share_run_view`` stores a run-list view (filter, columns, order, grouping) the way
the UI's own *Share* button does, as an experiment tag, and returns the link that opens it.

Limits: MLflow 3 refuses the file store (``./mlruns``); use ``sqlite:////abs/path/mlflow.db``
(one machine, or a shared filesystem that supports SQLite locking) or a tracking server
(``http://host:5000``, the choice for multi-node clusters). Create the experiment in the driver
before trials start: two processes initialising a brand-new SQLite file at once can race on
MLflow's schema migrations.
"""

from __future__ import annotations

import contextlib
import json
import logging
import numbers
import os
import re
import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, urlencode, urlparse

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

log = logging.getLogger(__name__)

DB_FILENAME = "mlflow.db"
ARTIFACTS_DIRNAME = "mlartifacts"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own key: the UI nests a run under this one
ROLE_TAG, SWEEP_TAG, TRIAL_TAG = "sit.role", "sit.sweep_id", "sit.trial_id"
FAILURE_TAG, PARETO_TAG = "sit.failure", "sit.pareto"
# What the UI reads to open the experiment as model training rather than GenAI (values: MLflow's).
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."  # the UI's *Share* button stores views under this tag
DEFAULT_UI = "http://127.0.0.1:5000"            # where `mlflow_ui_command` serves a database store
# Database backends pass through as given; sqlite is handled apart (its path is made absolute).
DB_SCHEMES = ("postgresql", "mysql", "mssql")
TERMINAL = {"FINISHED", "FAILED", "KILLED"}
_TRUNCATED = "...[truncated]"


# ---------------------------------------------------------------- tracking URI

def default_tracking_uri(out_dir: str | os.PathLike) -> str:
    """``sqlite:////ABS/out_dir/mlflow.db``: absolute, so every process opens the same file."""
    return "sqlite:///" + str(Path(out_dir).expanduser().resolve() / DB_FILENAME)


def resolve_tracking_uri(cli_value: str | None, out_dir: str | os.PathLike) -> str:
    """The tracking URI to use: ``cli_value``, else ``$MLFLOW_TRACKING_URI``, else the default.

    Accepted: ``http(s)://`` servers, ``sqlite:///path`` (a relative path is made absolute against
    the current directory *now*: Ray runs trials in their own working directories, where a relative
    path would open a different, empty database), and ``postgresql/mysql/mssql`` URIs.
    A plain directory or ``file:`` URI (MLflow's file store) raises ``ValueError``, because MLflow 3
    refuses it at first use, deep inside a trial. The one exception mirrors MLflow's own opt-out:
    with ``MLFLOW_ALLOW_FILE_STORE=true`` the directory is accepted (as an absolute ``file://`` URI).
    """
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(out_dir)
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("http", "https"):
        return uri.rstrip("/")
    if scheme == "sqlite":
        return _absolute_sqlite_uri(uri)
    if scheme.split("+")[0] in DB_SCHEMES:  # e.g. postgresql+psycopg2://
        return uri
    if scheme in ("", "file") or re.fullmatch(r"[a-z]", scheme):  # a path (or a Windows drive)
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("true", "1"):
            path = urlparse(uri).path if scheme == "file" else uri
            return Path(path).expanduser().resolve().as_uri()
        raise ValueError(
            f"tracking URI {uri!r} is a directory (MLflow's file store), which MLflow 3 refuses. "
            f"Use a SQLite file such as {default_tracking_uri(out_dir)!r} (the default), or a "
            "tracking server such as 'http://127.0.0.1:5000'. Set MLFLOW_ALLOW_FILE_STORE=true "
            "to use the deprecated file store anyway.")
    raise ValueError(f"unsupported tracking URI {uri!r}: use sqlite:////abs/path/{DB_FILENAME}, "
                     "http(s)://host:port, or a postgresql/mysql/mssql database URI")


def _absolute_sqlite_uri(uri: str) -> str:
    rest = uri[len("sqlite:///"):] if uri.lower().startswith("sqlite:///") else ""
    path, sep, query = rest.partition("?")
    if not path or path == ":memory:":
        raise ValueError(f"{uri!r}: give a SQLite file (sqlite:////abs/path/{DB_FILENAME}); an "
                         "in-memory database is not shared between the sweep's processes")
    return "sqlite:///" + str(Path(path).expanduser().resolve()) + sep + query


def _sqlite_path(tracking_uri: str) -> Path | None:
    if not tracking_uri.lower().startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):].partition("?")[0])


def mlflow_ui_command(tracking_uri: str) -> str:
    """What to print at the end of a sweep so the user can open its runs.

    For a database store: the ``mlflow ui`` command line (one worker and no job runner: starts in
    seconds at ~0.5 GB instead of ~2.5 GB). For a tracking server the UI is the server: its URL.
    """
    if urlparse(tracking_uri).scheme.lower() in ("http", "https"):
        return tracking_uri
    return ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri "
            f"{shlex.quote(tracking_uri)} --host 127.0.0.1 --port 5000 --workers 1")


def ui_url(tracking_uri: str) -> str:
    """The MLflow UI's address: the tracking server itself, or where `mlflow_ui_command` serves."""
    return tracking_uri if urlparse(tracking_uri).scheme.lower() in ("http", "https") else DEFAULT_UI


def run_url(tracking_uri: str, experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """A run's page (its ``artifact`` open in the artifact viewer if given), in the model-training view."""
    page = f"/artifacts/{quote(artifact)}" if artifact else ""
    return f"{ui_url(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}{page}?workflowType=machine_learning"


def share_run_view(tracking_uri: str, experiment_id: str, key: str, *, search_filter: str, columns: list[str],
                   order_by: str | None = None, ascending: bool = False, group_by_tag: str | None = None) -> str:
    """Store a run-list view and return the link that opens it (model-training view, no clicks).

    ``columns`` are ``metrics.<key>``, ``params.<key>`` or ``tags.<key>``; ``order_by`` one of them.
    ``group_by_tag`` groups the list by a tag's value: runs nested under a parent run then show as
    rows of their group instead of hiding under the parent's collapsed row. Storing the view again
    under the same key replaces it. The format is the MLflow UI's own (3.x), not a public API:
    the plain filter link (``run_list_url``) is the fallback.
    """
    if not re.fullmatch(r"[A-Za-z0-9._-]+", key):
        raise ValueError(f"view key {key!r}: letters, digits, '.', '_' and '-' only")
    shown = [_ui_column(c) for c in columns]
    state = {"searchFilter": search_filter, "selectedColumns": shown, "columnOrder": shown}  # in this order
    if order_by:
        state |= {"orderByKey": _ui_column(order_by), "orderByAsc": ascending}
    if group_by_tag:
        state["groupBy"] = {"aggregateFunction": "average", "groupByKeys": [{"mode": "tag", "groupByData": group_by_tag}]}
    MlflowClient(tracking_uri).set_experiment_tag(experiment_id, SHARED_VIEW_PREFIX + key, json.dumps(state))
    return f"{ui_url(tracking_uri)}/#/experiments/{experiment_id}/runs?viewStateShareKey={key}&workflowType=machine_learning"


def run_list_url(tracking_uri: str, experiment_id: str, search_filter: str) -> str:
    """The run list filtered by ``search_filter`` (nested runs show under their parent's row)."""
    return (f"{ui_url(tracking_uri)}/#/experiments/{experiment_id}/runs?"
            + urlencode({"searchFilter": search_filter, "workflowType": "machine_learning"}, quote_via=quote))


def _ui_column(column: str) -> str:
    kind, _, key = column.partition(".")
    if kind not in ("metrics", "params", "tags") or not key:
        raise ValueError(f"column {column!r}: expected metrics.<key>, params.<key> or tags.<key>")
    return f"{kind}.`{key}`"  # the UI's canonical column key


# ---------------------------------------------------------------- experiment and parent run

def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created if missing; safe when several processes race.

    Without ``artifact_location``: next to a SQLite file (``<db dir>/mlartifacts/<name>``, a
    ``file://`` URI), the server's choice for a tracking server; other databases need one given.
    An existing experiment keeps the artifact location it was created with (MLflow cannot change it).
    """
    client = MlflowClient(tracking_uri)
    experiment_id = _create_experiment(client, tracking_uri, name, artifact_location)
    if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:  # a user's own choice stays
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment_id


def _create_experiment(client: MlflowClient, tracking_uri: str, name: str, artifact_location: str | None) -> str:
    if (found := _live_experiment(client, name)) is not None:
        return found
    if artifact_location is None and (db := _sqlite_path(tracking_uri)) is not None:
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
        artifact_location = (db.parent / ARTIFACTS_DIRNAME / safe).as_uri()
    elif artifact_location is None and urlparse(tracking_uri).scheme.split("+")[0] in DB_SCHEMES:
        raise ValueError(f"experiment {name!r}: give artifact_location for {tracking_uri!r} "
                         "(otherwise MLflow writes artifacts to ./mlartifacts of each process)")
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        found = _live_experiment(client, name)  # another process created it between our calls
        if found is None:
            raise
        return found


def _live_experiment(client: MlflowClient, name: str) -> str | None:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return None
    if experiment.lifecycle_stage != "active":
        # A deleted experiment still owns its name; reviving it silently could mix two sweeps.
        raise ValueError(
            f"experiment {name!r} (id {experiment.experiment_id}) is deleted: restore it with "
            f"`mlflow experiments restore --experiment-id {experiment.experiment_id}` "
            "or choose another name")
    return experiment.experiment_id


def find_parent_run(tracking_uri: str, experiment_id: str, sweep_id: str) -> str | None:
    """The run id of sweep ``sweep_id``'s parent run (the oldest, should there be two), or None."""
    runs = MlflowClient(tracking_uri).search_runs(
        [experiment_id],
        f"tags.`{SWEEP_TAG}` = '{_quotable(sweep_id)}' and tags.`{ROLE_TAG}` = 'sweep'",
        ViewType.ACTIVE_ONLY, max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0].info.run_id if runs else None


def start_parent_run(tracking_uri: str, experiment_id: str, sweep_id: str,
                     params: Mapping | None = None, tags: Mapping | None = None) -> str:
    """The parent run of sweep ``sweep_id``: created, or reopened if the sweep ran before.

    ``params`` are flattened as in ``log_trial``. On a resumed sweep, new keys are added; a key
    whose value changed keeps its first value (MLflow params are immutable) with a warning.
    """
    client = MlflowClient(tracking_uri)
    run_id = find_parent_run(tracking_uri, experiment_id, sweep_id)
    if run_id is not None:
        return _reopen(client, run_id, params, tags)
    run_tags = {**_str_values(tags or {}), SWEEP_TAG: sweep_id, ROLE_TAG: "sweep"}
    run = client.create_run(experiment_id, tags=run_tags, run_name=sweep_id)
    _log_params(client, run.info.run_id, flatten_params(params or {}), existing={})
    return run.info.run_id


def resume_parent_run(tracking_uri: str, experiment_id: str, sweep_id: str,
                      params: Mapping | None = None, tags: Mapping | None = None) -> str:
    """Reopen sweep ``sweep_id``'s parent run (status back to RUNNING); ``LookupError`` if none."""
    run_id = find_parent_run(tracking_uri, experiment_id, sweep_id)
    if run_id is None:
        raise LookupError(f"no parent run tagged {SWEEP_TAG}={sweep_id!r} in experiment "
                          f"{experiment_id}: nothing to resume (start the sweep without resume)")
    return _reopen(MlflowClient(tracking_uri), run_id, params, tags)


def _reopen(client: MlflowClient, run_id: str, params: Mapping | None, tags: Mapping | None) -> str:
    run = client.get_run(run_id)
    _log_params(client, run_id, flatten_params(params or {}), existing=run.data.params)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _str_values(tags or {}).items()])
    client.update_run(run_id, status="RUNNING")
    return run_id


def end_parent_run(tracking_uri: str, parent_run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri).set_terminated(parent_run_id, _terminal(status))


@contextlib.contextmanager
def ends_on_error(tracking_uri: str, run_id: str):
    """Inside: an exception ends the run FAILED, an interrupt (Ctrl-C) KILLED, then propagates."""
    try:
        yield
    except BaseException as e:
        end_parent_run(tracking_uri, run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise


# ---------------------------------------------------------------- trials (live child runs)

def start_trial_run(tracking_uri: str, experiment_id: str, parent_run_id: str, trial_id: str, name: str,
                    params: Mapping, tags: Mapping | None = None) -> str:
    """The child run of ``trial_id``: created now (status RUNNING, the UI shows it while it trains),
    or reopened if the trial ran before (a resumed sweep, a retried trial). Returns its run id."""
    client = MlflowClient(tracking_uri)
    run = _find_child(client, experiment_id, parent_run_id, trial_id)
    if run is None:
        run_tags = {**_str_values(tags or {}), PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, ROLE_TAG: "trial"}
        run = client.create_run(experiment_id, tags=run_tags, run_name=name)
        existing: Mapping = {}
    else:
        existing = run.data.params
        client.log_batch(run.info.run_id, tags=[RunTag(k, v) for k, v in _str_values(tags or {}).items()])
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
    _log_params(client, run.info.run_id, flatten_params(params), existing=existing)
    return run.info.run_id


def log_epoch(tracking_uri: str, run_id: str, metrics: Mapping, step: int, timestamp_ms: int | None = None,
              logged_through: int | None = None) -> None:
    """One epoch's numeric metrics at ``step``, stamped with when they arrived. Idempotent: a step
    already logged for a key (a retried epoch, a replayed result) is not logged again. A caller that
    knows the last step it logged to this run gives it as ``logged_through``: the run's history is
    then not read (one query per metric key)."""
    client = MlflowClient(tracking_uri)
    values = _numeric(metrics)
    if logged_through is not None:
        done = set(values) if step <= logged_through else set()
    else:
        done = {k for k in values if (_last_step(client, run_id, k) or -1) >= step}
    stamp = timestamp_ms or _now_ms()
    client.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v in values.items() if k not in done])


def end_trial_run(tracking_uri: str, run_id: str, status: str, tags: Mapping | None = None,
                  failure: str | None = None, end_time_ms: int | None = None) -> None:
    """Final status (FINISHED, FAILED, or KILLED for a trial stopped early), final tags, and the end
    time (default: now; give the time the trial ended when closing its run happens later)."""
    client = MlflowClient(tracking_uri)
    run_tags = _str_values(tags or {})
    if failure:
        run_tags[FAILURE_TAG] = _truncate(failure, MAX_TAG_VAL_LENGTH, keep_tail=True)
    if run_tags:
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in run_tags.items()])
    if not failure and FAILURE_TAG in client.get_run(run_id).data.tags:  # a retry that succeeded
        client.delete_tag(run_id, FAILURE_TAG)
    client.set_terminated(run_id, _terminal(status), end_time=end_time_ms)


def _find_child(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str):
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{PARENT_TAG}` = '{_quotable(parent_run_id)}' "
        f"and tags.`{TRIAL_TAG}` = '{_quotable(trial_id)}'",
        ViewType.ACTIVE_ONLY, max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def tag_pareto(tracking_uri: str, parent_run_id: str, child_run_ids: list[str],
               pareto_ids: set[str]) -> None:
    """Tag children ``sit.pareto=true`` (run id in ``pareto_ids``) or ``false`` (the others).

    Filter the compare view with ``tags.sit.pareto = 'true'``. Ids are run ids of children of
    ``parent_run_id``; anything else raises ``ValueError`` (say, trial ids passed by mistake).
    """
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    children = set(_children(client, experiment_id, parent_run_id)["run_id"])
    if strangers := set(child_run_ids) - children:
        raise ValueError(f"{sorted(strangers)} are not child runs of {parent_run_id}")
    if strangers := set(pareto_ids) - set(child_run_ids):
        raise ValueError(f"Pareto ids {sorted(strangers)} are not in child_run_ids "
                         "(run ids expected, not trial ids)")
    for run_id in child_run_ids:  # MLflow has no batch write across runs
        client.set_tag(run_id, PARETO_TAG, "true" if run_id in pareto_ids else "false")


def log_parent_summary(tracking_uri: str, parent_run_id: str, artifacts: list, hv_history: pd.DataFrame,
                       metrics: Mapping | None = None) -> None:
    """Attach the sweep's results to its parent run: the files in ``artifacts`` (table, plots,
    ``hypervolume_history.csv``; re-logging overwrites) and the hypervolume as its history only:
    one point per finished trial, step = that trial's count and timestamp = when it finished (the
    ``finished_ms`` column), so the UI draws hypervolume against trials and against time. ``metrics``
    are single summary values (no hypervolume among them), logged once at the final step."""
    client = MlflowClient(tracking_uri)
    for path in artifacts:
        client.log_artifact(parent_run_id, str(path))
    last = _last_step(client, parent_run_id, "hypervolume") or 0
    points = []
    for step, row in enumerate(hv_history.itertuples(index=False), start=1):
        if step > last:
            stamp = int(getattr(row, "finished_ms", 0) or 0) or _now_ms()
            points += [Metric("hypervolume", float(row.hypervolume), stamp, step),
                       Metric("n_pareto", float(row.n_pareto), stamp, step)]
    final_step = len(hv_history)
    points += [Metric(k, v, _now_ms(), final_step) for k, v in _numeric(metrics or {}).items()]
    client.log_batch(parent_run_id, metrics=points)


# ---------------------------------------------------------------- reading back

def read_json_artifact(tracking_uri: str, run_id: str, path: str) -> dict:
    """A JSON file logged as an artifact of ``run_id`` (works against a remote tracking server too)."""
    import mlflow.artifacts

    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=tracking_uri)
    return json.loads(Path(local).read_text())


def trial_table(tracking_uri: str, experiment_id: str, parent_run_id: str) -> pd.DataFrame:
    """One row per child run of ``parent_run_id``: the same columns as ``mlflow.search_runs``.

    ``run_id``, ``status``, ``start_time``, ``end_time``, then ``params.*`` (strings: non-strings
    were JSON-encoded, ``json.loads`` brings them back), ``metrics.*`` (latest value) and ``tags.*``.
    Built from ``MlflowClient.search_runs`` because ``mlflow.search_runs`` reads the process-global
    tracking URI, which a library call must not set behind the caller's back.
    """
    return _children(MlflowClient(tracking_uri), experiment_id, parent_run_id)


def _children(client: MlflowClient, experiment_id: str, parent_run_id: str) -> pd.DataFrame:
    rows, token = [], None
    while True:  # paginate: one page is at most 1000 runs
        page = client.search_runs(
            [experiment_id], f"tags.`{PARENT_TAG}` = '{_quotable(parent_run_id)}'",
            ViewType.ACTIVE_ONLY, max_results=1000, order_by=["attributes.start_time ASC"],
            page_token=token)
        for run in page:
            rows.append({
                "run_id": run.info.run_id, "status": run.info.status,
                "start_time": pd.to_datetime(run.info.start_time, unit="ms", utc=True),
                "end_time": pd.to_datetime(run.info.end_time, unit="ms", utc=True),
                **{f"params.{k}": v for k, v in run.data.params.items()},
                **{f"metrics.{k}": v for k, v in run.data.metrics.items()},
                **{f"tags.{k}": v for k, v in run.data.tags.items()},
            })
        token = page.token
        if not token:
            break
    fixed = ["run_id", "status", "start_time", "end_time"]
    table = pd.DataFrame(rows, columns=None if rows else fixed)
    rest = sorted(c for c in table.columns if c not in fixed)
    return table[fixed + rest]


# ---------------------------------------------------------------- helpers

def flatten_params(params: Mapping, prefix: str = "") -> dict:
    """``{"model": {"schedule": {"keep": 0.7}}}`` -> ``{"model.schedule.keep": 0.7}``.

    Values are kept as they are (``log_trial`` stringifies them); tuples and lists stay whole.
    """
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _param_value(value) -> str:
    # Strings as they are; everything else as JSON so the export can json.loads it back
    # (tuples become lists; objects such as torch.dtype fall back to str).
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return _truncate(text, MAX_PARAM_VAL_LENGTH)


def _log_params(client: MlflowClient, run_id: str, flat: Mapping, existing: Mapping) -> None:
    new, changed = {}, []
    for key, value in flat.items():
        text = _param_value(value)
        if key not in existing:
            new[key] = text
        elif existing[key] != text:
            changed.append(key)
    if changed:
        log.warning("run %s: params %s changed since first logged; MLflow params are immutable, "
                    "keeping the first values", run_id, changed)
    client.log_batch(run_id, params=[Param(k, v) for k, v in new.items()])  # chunks by itself


def _numeric(row: Mapping) -> dict[str, float]:
    # numbers.Real also admits numpy scalars; bools are flags, not metrics.
    return {k: float(v) for k, v in row.items()
            if isinstance(v, numbers.Real) and not isinstance(v, bool)}


def _last_step(client: MlflowClient, run_id: str, key: str) -> int | None:
    history = client.get_metric_history(run_id, key)
    return max((m.step for m in history), default=None)


def _str_values(tags: Mapping) -> dict[str, str]:
    return {str(k): _truncate(str(v), MAX_TAG_VAL_LENGTH) for k, v in tags.items()}


def _truncate(text: str, limit: int, keep_tail: bool = False) -> str:
    if len(text) <= limit:
        return text
    n = limit - len(_TRUNCATED)
    # A traceback's last lines hold the exception itself, so failures keep their tail.
    return _TRUNCATED + text[-n:] if keep_tail else text[:n] + _TRUNCATED


def _quotable(value: str) -> str:
    # MLflow's filter grammar has no escape for quotes inside a string literal.
    if "'" in value or '"' in value:
        raise ValueError(f"{value!r}: ids used in MLflow filters cannot contain quotes")
    return value


def _terminal(status: str) -> str:
    status = status.upper()
    if status not in TERMINAL:
        raise ValueError(f"status must be one of {sorted(TERMINAL)}, got {status!r}")
    return status


def _now_ms() -> int:
    return int(time.time() * 1000)
