"""What the user opens during and after a sweep, set up so that it shows the sweep without clicks:

- MLflow: two run-list views stored on the experiment (`tracking.share_run_view`), opened by the
  links the sweep prints: the Pareto-optimal trials (filter `tags.sit.pareto = 'true'`), and all
  trials grouped into Pareto-optimal and dominated; objectives as columns, most accurate first.
  The parent run carries the interactive plot (`pareto.html`), the PNG and the tables.
- Optuna's dashboard on the sweep's study (`optuna-dashboard sqlite:///OUT/optuna.db`): objectives
  named (its Pareto-front page labels the axes), the hypervolume history against the sweep's
  reference point saved as a dashboard plot, and a note with the reference point and the MLflow link.
"""
from __future__ import annotations

import shlex
import warnings
from collections.abc import Mapping

import optuna

from . import tracking

DASHBOARD_URL = "http://127.0.0.1:8080"  # where `dashboard_command` serves
HYPERVOLUME_PLOT_ID = "hypervolume-history"
PLOT = "pareto.html"  # the interactive plot the sweep attaches to its parent run


def mlflow_views(tracking_uri: str, experiment_id: str, parent_run_id: str, sweep: str, objectives: Mapping[str, str],
                 columns: tuple[str, ...] = ("metrics.test_top1", "metrics.gmacs", "metrics.speedup")) -> dict[str, str]:
    """Store the sweep's run-list views; returns {"pareto", "trials", "parent", "plot"} links."""
    own = f"tags.`{tracking.PARENT_TAG}` = '{parent_run_id}'"
    shown = [f"metrics.{o}" for o in objectives] + [c for c in columns if c.removeprefix("metrics.") not in objectives]
    return {
        "pareto": tracking.share_run_view(
            tracking_uri, experiment_id, f"pareto-{sweep}", search_filter=f"{own} and tags.`{tracking.PARETO_TAG}` = 'true'",
            columns=shown, order_by="metrics.top1", group_by_tag=tracking.ROLE_TAG),
        "trials": tracking.share_run_view(
            tracking_uri, experiment_id, f"trials-{sweep}", search_filter=own, columns=shown,
            order_by="metrics.top1", group_by_tag=tracking.PARETO_TAG),
        "parent": tracking.run_url(tracking_uri, experiment_id, parent_run_id),
        "plot": tracking.run_url(tracking_uri, experiment_id, parent_run_id, artifact=PLOT),
    }


def name_objectives(storage: str, study_name: str, objectives: Mapping[str, str]) -> None:
    """Objective names on the study, so Optuna's dashboard labels its axes top1 / latency_ms."""
    with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and still there in 5.0
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.load_study(study_name=study_name, storage=storage).set_metric_names(list(objectives))


def optuna_views(storage: str, study_name: str, objectives: Mapping[str, str], reference: Mapping[str, float],
                 note: str = "") -> None:
    """The hypervolume history (Optuna's own plot, feasible trials only) and a note, on the dashboard."""
    from optuna_dashboard import save_note, save_plotly_graph_object

    study = optuna.load_study(study_name=study_name, storage=storage)
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        with warnings.catch_warnings():  # "experimental" since Optuna 3.3
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            figure = optuna.visualization.plot_hypervolume_history(study, [reference[o] for o in objectives])
        figure.update_layout(title=f"Hypervolume history (reference point {dict(reference)})")
        save_plotly_graph_object(study, figure, graph_object_id=HYPERVOLUME_PLOT_ID)
    save_note(study, note)


def dashboard_command(storage: str) -> str:
    return f"optuna-dashboard {shlex.quote(storage)} --host 127.0.0.1 --port 8080"


def dashboard_url(storage: str, study_name: str) -> str:
    study_id = optuna.storages.RDBStorage(storage).get_study_id_from_name(study_name)
    return f"{DASHBOARD_URL}/dashboard/studies/{study_id}"
