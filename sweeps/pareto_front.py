"""Pareto math on a trial table: constraints, the front, its hypervolume, picks, the plot.

One row per trial, one column per metric (``top1``, ``latency_ms``, ``gmacs``...). Dominance and
hypervolume come from moocore (a maintained multi-objective library); this module only maps a
table's columns and directions onto it, with Optuna's ``best_trials`` conventions:
- ``objectives`` maps a column to ``"max"`` or ``"min"``;
- only candidates can be on the front: finite objective values and ``feasible`` True;
- rows with identical objective vectors are all on the front (Optuna keeps duplicates too);
- functions return index labels of the table, so picks join back to it.
"""
from __future__ import annotations

import html
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import moocore
import numpy as np
import pandas as pd

from sit_core.files import atomic_write_text

FEASIBLE_COL = "feasible"
_SIGN = {"max": -1.0, "maximize": -1.0, "min": 1.0, "minimize": 1.0}  # to minimisation form


@dataclass(frozen=True)
class Constraints:
    """A sweep's feasibility limits. Violations use Optuna's convention: <= 0 means satisfied."""

    max_latency_ms: Optional[float] = None
    min_top1: Optional[float] = None
    names = ("latency_budget", "min_top1")

    def violation(self, top1: float, latency_ms: float) -> tuple[float, float]:
        return ((latency_ms - self.max_latency_ms) if self.max_latency_ms is not None else 0.0,
                (self.min_top1 - top1) if self.min_top1 is not None else 0.0)

    def feasible(self, top1: float, latency_ms: float) -> bool:
        return all(math.isfinite(v) for v in (top1, latency_ms)) and all(v <= 0 for v in self.violation(top1, latency_ms))

    def column(self, df: pd.DataFrame, latency_col: str = "latency_ms", acc_col: str = "top1") -> pd.Series:
        """`feasible` for every row of a table (the same rule as `feasible`)."""
        top1 = pd.to_numeric(df[acc_col], errors="coerce")
        latency = pd.to_numeric(df[latency_col], errors="coerce")
        return pd.Series([self.feasible(a, b) for a, b in zip(top1, latency)], index=df.index, name=FEASIBLE_COL,
                         dtype=bool)


def _signs(objectives: Mapping[str, str]) -> np.ndarray:
    if not objectives:
        raise ValueError("objectives is empty: give at least one {column: 'max'|'min'}")
    bad = {c: d for c, d in objectives.items() if str(d).lower() not in _SIGN}
    if bad:
        raise ValueError(f"objective directions must be 'max' or 'min', got {bad}")
    return np.array([_SIGN[str(d).lower()] for d in objectives.values()])


def losses(df: pd.DataFrame, objectives: Mapping[str, str]) -> np.ndarray:
    """(n_rows, n_objectives) float array in minimisation form (max objectives negated)."""
    signs = _signs(objectives)
    missing = [c for c in objectives if c not in df.columns]
    if missing:
        raise KeyError(f"columns {missing} not in the trial table (has {list(df.columns)})")
    return df[list(objectives)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float) * signs


def _candidates(df: pd.DataFrame, loss: np.ndarray) -> np.ndarray:
    feasible = (df[FEASIBLE_COL].eq(True).fillna(False).to_numpy(dtype=bool) if FEASIBLE_COL in df.columns
                else np.ones(len(df), dtype=bool))  # eq(True): NaN/None/"False" are not feasible
    return feasible & np.isfinite(loss).all(axis=1)


def pareto_mask(df: pd.DataFrame, objectives: Mapping[str, str]) -> pd.Series:
    """True for rows on the Pareto front of the feasible, finite rows (duplicates all kept)."""
    loss = losses(df, objectives)
    candidates = _candidates(df, loss)
    mask = np.zeros(len(df), dtype=bool)
    if candidates.any():
        mask[np.flatnonzero(candidates)] = moocore.is_nondominated(loss[candidates], keep_weakly=True)
    return pd.Series(mask, index=df.index, name="pareto")


def _reference(objectives: Mapping[str, str], reference: Mapping[str, float]) -> np.ndarray:
    missing = [c for c in objectives if c not in reference]
    if missing:
        raise ValueError(f"reference has no value for objectives {missing}")
    return np.array([float(reference[c]) for c in objectives]) * _signs(objectives)


def _hv(points: np.ndarray, ref: np.ndarray) -> float:
    inside = points[(points < ref).all(axis=1)]  # points not better than the reference add nothing
    return float(moocore.hypervolume(inside, ref=ref)) if len(inside) else 0.0


def hypervolume(df: pd.DataFrame, objectives: Mapping[str, str], reference: Mapping[str, float]) -> float:
    """Hypervolume dominated by the feasible front, bounded by ``reference`` (one value per
    objective in the table's units, e.g. ``{"top1": 10.0, "latency_ms": 50.0}``)."""
    loss = losses(df, objectives)
    return _hv(loss[_candidates(df, loss)], _reference(objectives, reference))


def hypervolume_history(df: pd.DataFrame, objectives: Mapping[str, str], reference: Mapping[str, float],
                        order_col: str = "trial_number") -> pd.DataFrame:
    """Hypervolume of the front after each trial in ``order_col`` order (non-decreasing by
    construction: an infeasible or unfinished row repeats the previous value)."""
    ordered = df.sort_values(order_col, kind="stable")
    loss, ref = losses(ordered, objectives), _reference(objectives, reference)
    candidates = _candidates(ordered, loss)
    rows = []
    for i in range(len(ordered)):
        seen = loss[: i + 1][candidates[: i + 1]]
        front = seen[moocore.is_nondominated(seen, keep_weakly=True)] if len(seen) else seen
        rows.append((_hv(seen, ref), len(front)))
    history = pd.DataFrame(rows, columns=["hypervolume", "n_pareto"])
    history.insert(0, order_col, ordered[order_col].to_numpy())
    return history


def near_front(df: pd.DataFrame, objectives: Mapping[str, str], tolerance: float = 0.05,
               uncertain: Optional[Sequence[str]] = None) -> pd.Series:
    """Rows on the front, or within `tolerance` (relative) of being on it: a row counts if improving
    each of its `uncertain` objectives (default: all) by `tolerance` would make it non-dominated."""
    loss = losses(df, objectives)
    candidates = _candidates(df, loss)
    loosened = np.array([uncertain is None or name in uncertain for name in objectives], dtype=float)
    improved = loss - np.abs(loss) * tolerance * loosened
    front = loss[pareto_mask(df, objectives).to_numpy()]
    out = np.zeros(len(df), dtype=bool)
    for i in np.flatnonzero(candidates):
        dominated = ((front <= improved[i]).all(axis=1) & (front < improved[i]).any(axis=1)).any()
        out[i] = not dominated
    return pd.Series(out, index=df.index, name="near_front")


def knee_point(df: pd.DataFrame, objectives: Mapping[str, str]):
    """Index label of the Pareto row nearest the utopia point after min-max normalisation over the
    front (units such as ms vs % do not weigh in). Ties: the first row."""
    mask = pareto_mask(df, objectives).to_numpy()
    if not mask.any():
        raise ValueError(f"knee_point: no feasible trial with finite {list(objectives)}; nothing to pick")
    front = losses(df, objectives)[mask]
    low, span = front.min(axis=0), np.ptp(front, axis=0)
    scaled = (front - low) / np.where(span > 0, span, 1.0)
    return df.index[np.flatnonzero(mask)[np.argmin(np.linalg.norm(scaled, axis=1))]]


def budget_pick(df: pd.DataFrame, latency_col: str, budget: float, acc_col: str = "top1"):
    """Index label of the most accurate feasible trial with ``latency_col <= budget`` (ties: faster, then first)."""
    latency = pd.to_numeric(df[latency_col], errors="coerce").to_numpy(dtype=float)
    acc = pd.to_numeric(df[acc_col], errors="coerce").to_numpy(dtype=float)
    usable = _candidates(df, np.stack([latency, acc], axis=1))
    within = np.flatnonzero(usable & (latency <= budget))
    if len(within) == 0:
        fastest = f"{latency[usable].min():g}" if usable.any() else "none (no usable trial)"
        raise ValueError(f"no feasible trial with {latency_col} <= {budget:g}; fastest feasible: {fastest}")
    best = np.lexsort((within, latency[within], -acc[within]))[0]  # last key primary
    return df.index[within[best]]


def plot_pareto(df: pd.DataFrame, objectives: Mapping[str, str], path: str | Path, *,
                x: str = "latency_ms", y: str = "top1", label_col: Optional[str] = None,
                number_col: Optional[str] = None,
                reference_point: Optional[Mapping[str, float | str]] = None, title: Optional[str] = None,
                x_spread: Optional[tuple[str, str]] = None, x_predicted: Optional[str] = None) -> Path:
    """Accuracy vs latency scatter saved as PNG: Pareto points (over all objectives) in colour and
    labelled with `label_col`, dominated grey, infeasible as x, the reference (teacher) as a star.
    With `number_col`, the other points are labelled `#<number>` (short: they are not the picks).
    `x_spread` (low, high columns, e.g. the IQR of a measured latency) draws horizontal bars;
    `x_predicted` draws each row's predicted latency hollow (joined to its measured point), and rows
    without an `x` value (not measured) at their predicted latency only."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend switch
    from matplotlib.figure import Figure

    on_front = pareto_mask(df, objectives).to_numpy()
    loss = losses(df, objectives)
    feasible = _candidates(df, loss)
    xs = pd.to_numeric(df[x], errors="coerce").to_numpy(dtype=float)
    ys = pd.to_numeric(df[y], errors="coerce").to_numpy(dtype=float)
    fig = Figure(figsize=(7.5, 5.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if x_predicted is not None:
        pred = pd.to_numeric(df[x_predicted], errors="coerce").to_numpy(dtype=float)
        both = np.isfinite(xs) & np.isfinite(pred) & np.isfinite(ys)
        for xp, xm, yi in zip(pred[both], xs[both], ys[both]):
            ax.plot([xp, xm], [yi, yi], c="0.6", lw=0.6, zorder=1)
        shown = np.isfinite(pred) & np.isfinite(ys)
        ax.scatter(pred[shown], ys[shown], facecolors="none", edgecolors="0.55", s=22, zorder=2,
                   label=f"predicted ({x_predicted})")
    if x_spread is not None:
        low, high = (pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float) for c in x_spread)
        bars = np.isfinite(low) & np.isfinite(high) & np.isfinite(xs) & np.isfinite(ys)
        ax.errorbar(xs[bars], ys[bars], xerr=[xs[bars] - low[bars], high[bars] - xs[bars]], fmt="none",
                    ecolor="tab:blue", elinewidth=0.8, capsize=2, zorder=2, label=f"{x_spread[0]}..{x_spread[1]}")
    dominated = feasible & ~on_front
    ax.scatter(xs[dominated], ys[dominated], c="0.7", s=18, label="dominated")
    infeasible = ~feasible & np.isfinite(xs) & np.isfinite(ys)
    ax.scatter(xs[infeasible], ys[infeasible], marker="x", c="tab:red", s=24, label="infeasible")
    ax.scatter(xs[on_front], ys[on_front], c="tab:blue", s=30, zorder=3, label="Pareto-optimal")
    front_2d = pareto_mask(df, {y: "max", x: "min"}).to_numpy()
    order = np.argsort(xs[front_2d], kind="stable")
    ax.step(xs[front_2d][order], ys[front_2d][order], where="post", c="tab:blue", lw=1.2)
    if label_col is not None:
        for xi, yi, text in zip(xs[on_front], ys[on_front], df.loc[on_front, label_col].astype(str)):
            ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if number_col is not None:
        others = ~on_front & np.isfinite(xs) & np.isfinite(ys)
        for xi, yi, n in zip(xs[others], ys[others], df.loc[others, number_col]):
            ax.annotate(f"#{n}", (xi, yi), textcoords="offset points", xytext=(3, -9), fontsize=6, color="0.4")
    if reference_point is not None:
        ax.scatter([float(reference_point[x])], [float(reference_point[y])], marker="*", s=160, c="tab:orange",
                   edgecolors="k", zorder=4, label=str(reference_point.get("label", "reference")))
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title or f"{y} vs {x}: {int(on_front.sum())} Pareto-optimal of {len(df)} trials")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path



def plot_pareto_html(df: pd.DataFrame, objectives: Mapping[str, str], path: str | Path, *,
                     x: str = "latency_ms", y: str = "top1", label_col: str = "label",
                     hover_cols: tuple[str, ...] = (), reference_point: Optional[Mapping[str, float | str]] = None,
                     title: Optional[str] = None) -> Path:
    """The same scatter as an interactive, self-contained HTML page: inline SVG and a few lines of
    JavaScript, no library (a page with plotly.js inlined weighs ~4.6 MB, which MLflow's artifact
    viewer does not run). Hovering a point shows its `label_col` (what the trial is) and the
    `hover_cols` values; clicking a legend entry hides or shows that group; Pareto points are labelled."""
    from matplotlib.ticker import MaxNLocator

    on_front = pareto_mask(df, objectives).to_numpy()
    feasible = _candidates(df, losses(df, objectives))
    xs = pd.to_numeric(df[x], errors="coerce").to_numpy(dtype=float)
    ys = pd.to_numeric(df[y], errors="coerce").to_numpy(dtype=float)
    shown = np.isfinite(xs) & np.isfinite(ys)
    ref = None if reference_point is None else (float(reference_point[x]), float(reference_point[y]))
    all_x = np.append(xs[shown], [ref[0]] if ref and math.isfinite(ref[0]) else [])
    all_y = np.append(ys[shown], [ref[1]] if ref and math.isfinite(ref[1]) else [])
    (x0, x1), (y0, y1) = (_padded(all_x), _padded(all_y))
    width, height, left, right, top, bottom = 960, 560, 70, 230, 50, 60
    sx = lambda v: left + (v - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda v: height - bottom - (v - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    esc = html.escape
    svg = [f'<text x="{left}" y="28" class="title">{esc(title or f"{y} vs {x}: {int(on_front.sum())} Pareto-optimal of {len(df)} trials")}</text>']
    for t in MaxNLocator(nbins=8).tick_values(x0, x1):
        if x0 <= t <= x1:
            svg.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" y2="{height - bottom}" class="grid"/>'
                       f'<text x="{sx(t):.1f}" y="{height - bottom + 18}" class="tick" text-anchor="middle">{t:g}</text>')
    for t in MaxNLocator(nbins=8).tick_values(y0, y1):
        if y0 <= t <= y1:
            svg.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>'
                       f'<text x="{left - 8}" y="{sy(t) + 4:.1f}" class="tick" text-anchor="end">{t:g}</text>')
    svg.append(f'<text x="{(left + width - right) / 2}" y="{height - 15}" class="axis" text-anchor="middle">{esc(x)}</text>'
               f'<text x="18" y="{(top + height - bottom) / 2}" class="axis" text-anchor="middle" '
               f'transform="rotate(-90 18 {(top + height - bottom) / 2})">{esc(y)}</text>')
    front_2d = pareto_mask(df, {y: "max", x: "min"}).to_numpy() & shown
    order = np.argsort(xs[front_2d], kind="stable")
    fx, fy = xs[front_2d][order], ys[front_2d][order]
    if len(fx):
        steps = [f"M{sx(fx[0]):.1f},{sy(fy[0]):.1f}"] + [f"H{sx(a):.1f}V{sy(b):.1f}" for a, b in zip(fx[1:], fy[1:])]
        svg.append(f'<path d="{"".join(steps)}" class="front g-pareto"/>')
    cols = [c for c in dict.fromkeys((y, x, *hover_cols)) if c in df.columns]
    groups = {"pareto": on_front & shown, "dominated": feasible & ~on_front & shown, "infeasible": ~feasible & shown}
    for group, mask in groups.items():
        for i in np.flatnonzero(mask):
            row = df.iloc[i]
            tip = f"<b>{esc(str(row.get(label_col, '')))}</b>" + "".join(
                f"<br>{esc(c)}: {esc(_hover_value(row[c]))}" for c in cols)
            px, py = sx(xs[i]), sy(ys[i])
            mark = (f'<path d="M{px - 5:.1f},{py - 5:.1f}L{px + 5:.1f},{py + 5:.1f}M{px - 5:.1f},{py + 5:.1f}L{px + 5:.1f},{py - 5:.1f}"/>'
                    if group == "infeasible" else f'<circle cx="{px:.1f}" cy="{py:.1f}" r="{7 if group == "pareto" else 5}"/>')
            svg.append(f'<g class="pt g-{group}" data-tip="{esc(tip)}"><title>{esc(str(row.get(label_col, "")))}</title>{mark}</g>')
            if group == "pareto":
                anchor = "end" if px > (left + width - right) / 2 else "start"
                svg.append(f'<text x="{px + (-9 if anchor == "end" else 9):.1f}" y="{py - 9:.1f}" text-anchor="{anchor}" '
                           f'class="label g-pareto">{esc(str(row.get(label_col, "")))}</text>')
    if ref and all(math.isfinite(v) for v in ref):
        name = str(reference_point.get("label", "reference"))
        star = " ".join(f"{sx(ref[0]) + r * math.sin(k * math.pi / 5):.1f},{sy(ref[1]) - r * math.cos(k * math.pi / 5):.1f}"
                        for k, r in zip(range(10), [11, 4.5] * 5))
        svg.append(f'<g class="pt g-ref" data-tip="<b>{esc(name)}</b><br>{esc(y)}: {ref[1]:.4g}<br>{esc(x)}: {ref[0]:.4g}">'
                   f'<title>{esc(name)}</title><polygon points="{star}"/></g>')
    legend = [("pareto", f"Pareto-optimal ({int(groups['pareto'].sum())})"),
              ("dominated", f"dominated ({int(groups['dominated'].sum())})"),
              ("infeasible", f"infeasible ({int(groups['infeasible'].sum())})")] + (
        [("ref", str(reference_point.get("label", "reference")))] if ref else [])
    for k, (group, text) in enumerate(legend):
        ly = top + 10 + 24 * k
        svg.append(f'<g class="legend" data-group="{group}"><rect x="{width - right + 20}" y="{ly - 12}" width="190" height="20" '
                   f'fill="transparent"/><circle cx="{width - right + 30}" cy="{ly - 2}" r="6" class="g-{group} key"/>'
                   f'<text x="{width - right + 44}" y="{ly + 3}">{esc(text)}</text></g>')
    page = _HTML.format(title=esc(title or "Pareto front"), width=width, height=height, svg="\n".join(svg))
    return atomic_write_text(path, page)


def _padded(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
    return lo - pad, hi + pad


def _hover_value(v) -> str:
    if v is None or (isinstance(v, (float, np.floating)) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)


_HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: sans-serif; margin: 12px; }}
.title {{ font-size: 17px; fill: #2a3f5f; }} .tick {{ font-size: 12px; fill: #555; }} .axis {{ font-size: 14px; fill: #2a3f5f; }}
.grid {{ stroke: #e6e6e6; }} .front {{ fill: none; stroke: #1f77b4; stroke-width: 1.3; }}
.label {{ font-size: 11px; fill: #1f3b57; }} .legend {{ cursor: pointer; font-size: 13px; }} .legend.off {{ opacity: .35; }}
.g-pareto circle, .key.g-pareto {{ fill: #1f77b4; }} .g-dominated circle, .key.g-dominated {{ fill: #aaa; }}
.g-infeasible path {{ stroke: #d62728; stroke-width: 2; }} .key.g-infeasible {{ fill: #d62728; }}
.g-ref polygon, .key.g-ref {{ fill: #ff7f0e; stroke: #000; stroke-width: .8; }}
.pt {{ cursor: default; }} .pt:hover circle, .pt:hover polygon {{ stroke: #000; stroke-width: 2; }} .hidden {{ display: none; }}
#tip {{ position: fixed; display: none; pointer-events: none; background: #fff; border: 1px solid #888; border-radius: 4px;
        padding: 6px 8px; font-size: 12px; box-shadow: 0 2px 6px rgba(0,0,0,.2); }}
</style></head><body>
<svg xmlns="http://www.w3.org/2000/svg" width="100%" style="max-width: {width}px" viewBox="0 0 {width} {height}">
{svg}
</svg><div id="tip"></div>
<script>
const tip = document.getElementById("tip");
document.querySelectorAll(".pt").forEach(p => {{
  p.addEventListener("mousemove", e => {{ tip.innerHTML = p.dataset.tip; tip.style.display = "block";
    tip.style.left = (e.clientX + 14) + "px"; tip.style.top = (e.clientY + 14) + "px"; }});
  p.addEventListener("mouseleave", () => {{ tip.style.display = "none"; }});
}});
document.querySelectorAll(".legend").forEach(l => l.addEventListener("click", () => {{
  l.classList.toggle("off");
  document.querySelectorAll("svg > .g-" + l.dataset.group).forEach(el => el.classList.toggle("hidden"));
}}));
</script></body></html>
"""
