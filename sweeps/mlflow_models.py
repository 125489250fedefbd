"""MLflow models of a sweep: every finished trial's student as a logged model (with its card), and
the sweep's picks in the Model Registry under aliases (``knee``, ``fastest``, ``most-accurate``,
``budget-<ms>``).

A logged model is MLflow's own PyTorch flavour (``mlflow.pytorch.log_model``): an input example, the
signature inferred from it, and MLflow 3's default ``pt2`` format (a ``torch.export`` program, so
``mlflow.pytorch.load_model`` needs no SiT code). The card and its weights travel as the model's
extra files, so ``sit_core.load_card("models:/<name>@knee")`` rebuilds the eager model from the
same weights (their sha256 is the card's). One registered model per sweep; each picked trial is one
version (registered once, whatever it is picked for) and each alias points at one version.

Like tracking.py, every function takes the tracking URI explicitly. ``mlflow.pytorch.log_model``
reads MLflow's process-global tracking URI, so it is set only for that call and put back after.
The logged model is created first in the run's own experiment: with only ``run_id``, MLflow 3.17
files it under the Default experiment and writes its artifacts to ``./mlruns`` of the current
directory.
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import mlflow
import torch
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException

from sit_core.card import CARD_DIR_IN_MODEL

MODEL_NAME = "student"                  # the logged model's name inside its run
RUN_TAG = "sit.run_id"                  # on a model version: the trial's run


@contextlib.contextmanager
def _global_tracking_uri(uri: str):
    before = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None: back to "not set" (MLflow's env/default rules)


def logged_model(tracking_uri: str, run_id: str):
    """The READY model a run logged (``LoggedModel``), or None."""
    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'", max_results=10)
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return ready[0] if ready else None


def log_student(tracking_uri: str, run_id: str, model: torch.nn.Module, example: torch.Tensor,
                card_files: Callable[[str], list[Path]]) -> str:
    """Log ``model`` as the run's MLflow model and return its ``models:/m-...`` URI.

    ``card_files(model_uri)`` writes the card (which names the model it travels in) and returns its
    files (the card and its weights), logged as the model's extra files. ``example`` is the input
    example (give a batch of 2 or more: torch.export keeps a batch dimension of 1 static). Idempotent:
    a run that already logged a READY model keeps it (a resumed sweep, a repeated call).
    """
    if (found := logged_model(tracking_uri, run_id)) is not None:
        return f"models:/{found.model_id}"
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    created = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id)
    try:
        files = card_files(f"models:/{created.model_id}")
        with _global_tracking_uri(tracking_uri), torch.no_grad():
            info = mlflow.pytorch.log_model(
                model.eval(), name=MODEL_NAME, model_id=created.model_id, run_id=run_id,
                input_example=example.numpy(), extra_files=[str(p) for p in files],
                # given, not inferred: inference re-imports the model in a subprocess (seconds per trial)
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])
    except BaseException:
        client.finalize_logged_model(created.model_id, LoggedModelStatus.FAILED)  # never left PENDING
        raise
    return info.model_uri


def card_uri(model_uri: str, card_name: str) -> str:
    """Where a logged model's card lies (``mlflow.artifacts.download_artifacts`` takes it)."""
    return f"{model_uri}/{CARD_DIR_IN_MODEL}/{card_name}.yaml"


def budget_alias(budget_ms: float) -> str:
    """``budget-12_5ms`` for 12.5 ms: aliases admit letters, digits, '_' and '-' only."""
    return "budget-" + f"{float(budget_ms):g}".replace(".", "_") + "ms"


def register_picks(tracking_uri: str, name: str, run_ids: list[str], aliases: Mapping[str, str],
                   description: str = "", tags: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, int]:
    """Register the logged models of ``run_ids`` and of the ``aliases``' runs as versions of ``name``
    (created if missing), then point each ``alias -> run id`` at its run's version. ``tags``
    (run id -> {key: value}) are set on the run's version, new or not: what was learnt after the
    model was logged (the latency measured when the sweep confirmed its front).

    Returns ``{run_id: version}``. Idempotent: a run registered before keeps its version; setting an
    alias again moves it.
    """
    for alias in aliases:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", alias) or re.fullmatch(r"[vV]\d+", alias) or alias.lower() == "latest":
            raise ValueError(f"alias {alias!r}: letters, digits, '_' and '-', not 'latest' nor v<number>")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        client.create_registered_model(name, description=description or None)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    registered = {v.tags.get(RUN_TAG): int(v.version)
                  for v in client.search_model_versions(f"name = '{name}'") if v.tags.get(RUN_TAG)}
    for run_id in dict.fromkeys([*run_ids, *aliases.values()]):  # in order, once each
        if run_id in registered:
            continue
        found = logged_model(tracking_uri, run_id)
        if found is None:
            raise LookupError(f"run {run_id} has no logged model to register under {name!r}")
        # source: the model's artifact location, not models:/m-<id>, which a database registry
        # resolves through MLflow's process-global tracking URI (not this client's)
        version = client.create_model_version(name, source=found.artifact_location, run_id=run_id,
                                              model_id=found.model_id, tags={RUN_TAG: run_id})
        registered[run_id] = int(version.version)
    for run_id, version_tags in (tags or {}).items():
        for key, value in version_tags.items():
            if run_id in registered:
                client.set_model_version_tag(name, str(registered[run_id]), key, str(value))
    for alias, run_id in aliases.items():
        client.set_registered_model_alias(name, alias, str(registered[run_id]))
    return {run_id: registered[run_id] for run_id in dict.fromkeys([*run_ids, *aliases.values()])}
