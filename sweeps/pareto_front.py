"""Pareto math on a trial table: the front, its hypervolume, and picks from it.

One row per trial, one column per metric (e.g. ``top1``, ``latency_ms``, ``gmacs``), as built
from Ray Tune results, an Optuna study or MLflow's ``search_runs``. No Ray here: pandas, numpy and
Optuna's hypervolume only, so the sweep driver, a notebook and the tests share the same numbers.

Conventions (the same as Optuna's ``Study.best_trials``):
- ``objectives`` maps a column to ``"max"`` or ``"min"`` (``"maximize"``/``"minimize"`` accepted).
- Only candidates can be on the front: rows whose objective values are all finite and, where the
  table has a ``feasible`` column, whose ``feasible`` is ``True`` (missing counts as ``False``).
- ``a`` dominates ``b`` when ``a`` is no worse in every objective and strictly better in one.
  Rows with identical objective vectors do not dominate each other, so all copies of a
  non-dominated vector are on the front (Optuna 5 keeps every duplicate trial in ``best_trials``).
- Functions return index labels of ``df`` (not positions), so picks join back to the table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

# Optuna's own exact hypervolume (WFG; dedicated 2-D/3-D paths): the same code behind
# optuna.visualization.plot_hypervolume_history, so our numbers match what Optuna reports.
from optuna._hypervolume import compute_hypervolume

FEASIBLE_COL = "feasible"
_SIGN = {"max": -1.0, "maximize": -1.0, "min": 1.0, "minimize": 1.0}  # to loss (minimise) space
_CHUNK_ROWS = 512  # dominance is checked chunk x n at a time: bounded memory for big tables


def _signs(objectives: Mapping[str, str]) -> np.ndarray:
    if not objectives:
        raise ValueError("objectives is empty: give at least one {column: 'max'|'min'}")
    bad = {c: d for c, d in objectives.items() if str(d).lower() not in _SIGN}
    if bad:
        raise ValueError(f"objective directions must be 'max' or 'min', got {bad}")
    return np.array([_SIGN[str(d).lower()] for d in objectives.values()])


def _require_columns(df: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise KeyError(f"columns {missing} not in the trial table (has {list(df.columns)})")


def _losses(df: pd.DataFrame, objectives: Mapping[str, str]) -> np.ndarray:
    """(n_rows, n_objectives) float array in minimisation form (max objectives negated)."""
    signs = _signs(objectives)
    _require_columns(df, list(objectives))
    values = df[list(objectives)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    return values * signs


def _feasible_flag(df: pd.DataFrame) -> np.ndarray:
    if FEASIBLE_COL not in df.columns:
        return np.ones(len(df), dtype=bool)
    # eq(True) rather than astype(bool): NaN/None/"False" must not count as feasible.
    return df[FEASIBLE_COL].eq(True).fillna(False).to_numpy(dtype=bool)


def _candidates(df: pd.DataFrame, losses: np.ndarray) -> np.ndarray:
    return _feasible_flag(df) & np.isfinite(losses).all(axis=1)


def _nondominated(losses: np.ndarray) -> np.ndarray:
    """Boolean mask of rows not dominated by any other row (all rows finite, minimisation)."""
    n = len(losses)
    keep = np.ones(n, dtype=bool)
    for start in range(0, n, _CHUNK_ROWS):
        block = losses[start : start + _CHUNK_ROWS]  # (c, k)
        no_worse = (losses[None, :, :] <= block[:, None, :]).all(axis=2)  # (c, n): j <= i
        better = (losses[None, :, :] < block[:, None, :]).any(axis=2)  # (c, n): j < i somewhere
        keep[start : start + len(block)] = ~(no_worse & better).any(axis=1)
    return keep


def pareto_mask(df: pd.DataFrame, objectives: Mapping[str, str]) -> pd.Series:
    """``True`` for rows on the Pareto front of the feasible, finite rows (ties all kept)."""
    losses = _losses(df, objectives)
    candidates = _candidates(df, losses)
    mask = np.zeros(len(df), dtype=bool)
    mask[np.flatnonzero(candidates)] = _nondominated(losses[candidates])
    return pd.Series(mask, index=df.index, name="pareto")


def _reference_loss(objectives: Mapping[str, str], reference: Mapping[str, float]) -> np.ndarray:
    missing = [c for c in objectives if c not in reference]
    if missing:
        raise ValueError(f"reference has no value for objectives {missing}")
    return np.array([float(reference[c]) for c in objectives]) * _signs(objectives)


def _front_hypervolume(front_losses: np.ndarray, ref_loss: np.ndarray) -> float:
    # Optuna raises on points worse than the reference; they add no volume, so drop them.
    inside = front_losses[(front_losses <= ref_loss).all(axis=1)]
    if len(inside) == 0:
        return 0.0
    return float(compute_hypervolume(inside, ref_loss))  # dedups, so duplicate ties are harmless


def hypervolume(
    df: pd.DataFrame, objectives: Mapping[str, str], reference: Mapping[str, float]
) -> float:
    """Hypervolume dominated by the feasible Pareto set, bounded by ``reference``.

    ``reference`` holds one value per objective in the table's own units, e.g.
    ``{"top1": 0.0, "latency_ms": 50.0}``: the worst accuracy and slowest latency that still
    count. Front points not better than the reference in every objective add nothing.
    """
    ref_loss = _reference_loss(objectives, reference)
    losses = _losses(df, objectives)
    return _front_hypervolume(losses[pareto_mask(df, objectives).to_numpy()], ref_loss)


def hypervolume_history(
    df: pd.DataFrame,
    objectives: Mapping[str, str],
    reference: Mapping[str, float],
    order_col: str = "trial_number",
) -> pd.DataFrame:
    """Hypervolume of the front after each trial, in ``order_col`` order.

    Pass completed trials: a row that is infeasible or has a missing/non-finite metric (a failed
    or still-running trial) repeats the previous value. The curve is non-decreasing by
    construction. Columns: ``order_col``, ``hypervolume``, ``n_pareto`` (front size so far).
    """
    _require_columns(df, [order_col])
    ordered = df.sort_values(order_col, kind="stable")
    ref_loss = _reference_loss(objectives, reference)
    losses = _losses(ordered, objectives)
    candidates = _candidates(ordered, losses)

    front = np.empty((0, len(objectives)))  # current front, duplicates kept (as pareto_mask)
    hv = 0.0
    rows = []
    for point, is_candidate in zip(losses, candidates):
        if is_candidate:
            dominated = ((front <= point).all(axis=1) & (front < point).any(axis=1)).any()
            if not dominated:
                beaten = (point <= front).all(axis=1) & (point < front).any(axis=1)
                front = np.vstack([front[~beaten], point])
                hv = _front_hypervolume(front, ref_loss)
        rows.append((hv, len(front)))
    history = pd.DataFrame(rows, columns=["hypervolume", "n_pareto"])
    history.insert(0, order_col, ordered[order_col].to_numpy())
    return history


def feasibility(
    df: pd.DataFrame,
    max_latency_ms: float | None = None,
    min_top1: float | None = None,
    *,
    latency_col: str = "latency_ms",
    acc_col: str = "top1",
    finite_cols: Sequence[str] | None = None,
) -> pd.Series:
    """``True`` where a trial meets the constraints and its metrics are finite.

    ``finite_cols`` (default: ``acc_col`` and ``latency_col``) must be finite for a row to be
    feasible, so a diverged run (NaN accuracy) or a failed benchmark (inf latency) never wins.
    Computed from the metrics only: an existing ``feasible`` column is ignored, so calling this
    again with other limits gives a fresh answer. Assign the result to ``df["feasible"]``.
    """
    finite_cols = list(finite_cols) if finite_cols is not None else [acc_col, latency_col]
    _require_columns(df, [*finite_cols, latency_col, acc_col])

    def numeric(col: str) -> np.ndarray:
        return pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float)

    ok = np.all([np.isfinite(numeric(c)) for c in finite_cols], axis=0)
    if max_latency_ms is not None:
        ok &= numeric(latency_col) <= max_latency_ms
    if min_top1 is not None:
        ok &= numeric(acc_col) >= min_top1
    return pd.Series(ok, index=df.index, name=FEASIBLE_COL)


def knee_point(df: pd.DataFrame, objectives: Mapping[str, str]):
    """Index label of the Pareto row nearest the utopia point after min-max normalisation.

    Each objective is scaled to [0, 1] over the front (0 = best value on the front), so the
    utopia point is the origin and units (ms vs %) do not weigh in. Ties: the first row wins.
    """
    mask = pareto_mask(df, objectives).to_numpy()
    if not mask.any():
        raise ValueError(
            f"knee_point: no feasible trial with finite {list(objectives)}; nothing to pick"
        )
    front = _losses(df, objectives)[mask]
    low, span = front.min(axis=0), np.ptp(front, axis=0)
    scaled = (front - low) / np.where(span > 0, span, 1.0)  # flat objective -> all 0
    return df.index[np.flatnonzero(mask)[np.argmin(np.linalg.norm(scaled, axis=1))]]


def budget_pick(df: pd.DataFrame, latency_col: str, budget: float, acc_col: str = "top1"):
    """Index label of the most accurate feasible trial with ``latency_col <= budget``.

    Ties on accuracy go to the faster trial, then to the first row.
    """
    _require_columns(df, [latency_col, acc_col])
    latency = pd.to_numeric(df[latency_col], errors="coerce").to_numpy(dtype=float)
    acc = pd.to_numeric(df[acc_col], errors="coerce").to_numpy(dtype=float)
    usable = _feasible_flag(df) & np.isfinite(latency) & np.isfinite(acc)
    within = np.flatnonzero(usable & (latency <= budget))
    if len(within) == 0:
        fastest = f"{latency[usable].min():g}" if usable.any() else "none (no usable trial)"
        raise ValueError(
            f"budget_pick: no feasible trial with {latency_col} <= {budget:g}; "
            f"fastest feasible {latency_col}: {fastest}"
        )
    # lexsort: last key is primary -> highest accuracy, then lowest latency, then position.
    best = np.lexsort((within, latency[within], -acc[within]))[0]
    return df.index[within[best]]


def _axis_columns(objectives: Mapping[str, str]) -> tuple[str, str]:
    directions = {c: _SIGN[str(d).lower()] for c, d in objectives.items()}
    acc = next((c for c, s in directions.items() if s < 0), None)
    lat = next((c for c, s in directions.items() if s > 0), None)
    if acc is None or lat is None:
        raise ValueError("plot_pareto needs one 'max' (accuracy) and one 'min' (latency) objective")
    return acc, lat


def plot_pareto(
    df: pd.DataFrame,
    objectives: Mapping[str, str],
    path: str | Path,
    reference_point: Mapping[str, float | str] | None = None,
) -> Path:
    """Accuracy (first 'max' objective) vs latency (first 'min' objective) scatter, saved as PNG.

    Coloured dots: Pareto-optimal over all ``objectives``; grey: dominated; x: infeasible.
    The step line joins the accuracy/latency front (with three objectives a point can be
    Pareto-optimal through e.g. GMACs while off this line). ``reference_point`` (e.g. the
    teacher, ``{"top1": 81.2, "latency_ms": 9.5, "label": "teacher"}``) is drawn as a star.
    """
    # Figure + Agg canvas instead of pyplot: no global backend switch, safe in workers/threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    acc, lat = _axis_columns(objectives)
    losses = _losses(df, objectives)
    finite = np.isfinite(losses).all(axis=1)
    feasible = _feasible_flag(df) & finite
    on_front = pareto_mask(df, objectives).to_numpy()
    x = pd.to_numeric(df[lat], errors="coerce").to_numpy(dtype=float)
    y = pd.to_numeric(df[acc], errors="coerce").to_numpy(dtype=float)

    fig = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    dominated = feasible & ~on_front
    ax.scatter(x[dominated], y[dominated], c="0.7", s=18, label="dominated")
    infeasible = ~feasible & np.isfinite(x) & np.isfinite(y)
    ax.scatter(x[infeasible], y[infeasible], marker="x", c="tab:red", s=24, label="infeasible")
    ax.scatter(x[on_front], y[on_front], c="tab:blue", s=28, zorder=3, label="Pareto-optimal")

    front_2d = pareto_mask(df, {acc: "max", lat: "min"}).to_numpy()
    order = np.argsort(x[front_2d], kind="stable")
    ax.step(x[front_2d][order], y[front_2d][order], where="post", c="tab:blue", lw=1.2)

    if reference_point is not None:
        ax.scatter([float(reference_point[lat])], [float(reference_point[acc])], marker="*",
                   s=160, c="tab:orange", edgecolors="k", zorder=4,
                   label=str(reference_point.get("label", "reference")))
    ax.set_xlabel(lat)
    ax.set_ylabel(acc)
    ax.set_title(f"{acc} vs {lat}: {int(on_front.sum())} Pareto-optimal of {len(df)} trials")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path
