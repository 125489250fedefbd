"""Replay benchmark: sweeps simulated on a recorded candidate table, on a simulated clock, no training.

    python sweeps/replay.py --table benchmarks/fmnist-cpu-candidates.csv       # 4 samplers x {none, moasha} x 10 seeds
    python sweeps/replay.py --synthetic --samplers random,tpe --seeds 3      # a made-up table, to try it out

Each simulated sweep drives the SAME code as a real one: `sweeps.optuna_search.ParetoOptunaSearch`
(the sampler, warm starts, PRUNED/COMPLETE/FAIL) and `sweeps.moasha.ParetoRungs` (the early
stopping rule). A trial gets what the table's oracle answers for the point the sampler asks for
(`--oracle surrogate`: GP regressions fitted on the recorded candidates, so every parameter of the
proposal counts; `--oracle nearest`: the nearest recorded candidate, replayed as recorded; see
`sweeps.candidates`). It occupies one of `--concurrent` slots for its setup time plus each epoch's
time, reports its validation top-1 after every epoch, and ends when it finishes, is stopped at a
rung, or diverges. The hypervolume of the full-budget front (top-1 up, latency down) is tracked
against the simulated time, at one reference point (chance accuracy, the teacher's latency; moocore).

Reported per method (sampler x scheduler, `--seeds` runs each): hypervolume against time (median,
IQR), final hypervolume, hypervolume after `--at-trials` ended trials, the time each method takes
to reach random search's median final hypervolume, a one-sided Mann-Whitney U test of its final
hypervolumes against random search's (scipy), and empirical attainment surfaces (moocore).
Goals checked: the best method reaches random search's final hypervolume in <= 1/3 of the budget;
after 24 trials, the best Optuna multi-objective sampler's hypervolume is >= 1.2x random's. The
"room" says whether the second can be met at all: the oracle's front over the recorded candidates
and `--room-points` random points, and one utopia model with their best top-1 and lowest latency,
each over random search's hypervolume after `--at-trials` (also in replay_goals.json).
Limits: a surrogate smooths what a few hundred candidates show, the nearest candidate in ~12
parameters is far from the asked point (both are stated with the results); the clock has no
contention between trials (the recorded times already include sharing the cores).
"""
from __future__ import annotations

import dataclasses
import heapq
import json
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import moocore
import numpy as np
import pandas as pd

from sweeps.cli import SAMPLERS
from sweeps.moasha import STOP, ParetoRungs

# sweeps.candidates (the search space: sit_core, timm, torch) and sweeps.optuna_search (Ray's Searcher)
# are imported where used, so that --help and bad input are answered at once.

OBJECTIVES = {"top1": "max", "latency_ms": "min"}
BASELINE = "random/none"


@dataclasses.dataclass
class Run:
    """One simulated sweep: every trial it started, and its hypervolume after each trial ended."""

    sampler: str
    scheduler: str
    seed: int
    trials: pd.DataFrame    # trial_id, candidate, start_s, end_s, epochs, status, top1, latency_ms
    curve: pd.DataFrame     # end_s, n_ended, hypervolume (after each ended trial, in end order)

    @property
    def method(self) -> str:
        return f"{self.sampler}/{self.scheduler}"

    def hv_at(self, t: float) -> float:
        done = self.curve[self.curve["end_s"] <= t]
        return float(done["hypervolume"].iloc[-1]) if len(done) else 0.0

    def hv_after(self, n: int) -> float:
        done = self.curve[self.curve["n_ended"] >= n]
        return float(done["hypervolume"].iloc[0]) if len(done) else math.nan

    def time_to(self, target: float) -> float:
        reached = self.curve[self.curve["hypervolume"] >= target - 1e-9]
        return float(reached["end_s"].iloc[0]) if len(reached) else math.inf


def minimisation(table: CandidateTable, latency_col: str) -> tuple[np.ndarray, np.ndarray]:
    """(signs that turn (top1, latency) into losses, the reference point as losses)."""
    reference = table.reference(latency_col)
    signs = np.array([-1.0 if d == "max" else 1.0 for d in OBJECTIVES.values()])
    return signs, np.array([reference[k] for k in OBJECTIVES]) * signs


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Points and reference in minimisation form; points not better than the reference add nothing."""
    inside = points[(points < reference).all(axis=1)] if len(points) else points
    return float(moocore.hypervolume(inside, ref=reference)) if len(inside) else 0.0


def simulate(table: CandidateTable, sampler: str, seed: int, *, scheduler: Optional[tuple[int, float]] = None,
             budget_s: float, concurrent: int = 2, latency_col: str = "latency_ms", warm_start: bool = True,
             oracle=None) -> Run:
    """One sweep on the simulated clock. `scheduler`: (grace, eta) for MO-ASHA, None to train every
    trial to the end; `oracle`: `table.oracle(...)` (default: nearest). Deterministic for a given
    table, oracle, sampler, seed and settings."""
    from sweeps.optuna_search import ParetoOptunaSearch, make_sampler  # Ray's Searcher base: imported when used

    epochs = table.epochs
    oracle = oracle or table.oracle("nearest")
    signs, ref = minimisation(table, latency_col)

    rungs = (ParetoRungs.geometric(scheduler[0], scheduler[1], epochs, list(OBJECTIVES.values()))
             if scheduler else None)
    searcher = ParetoOptunaSearch(table.space, metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()),
                                  sampler=make_sampler(sampler, seed), study_name=f"replay-{sampler}-{seed}",
                                  points_to_evaluate=table.warm_starts if warm_start else None,
                                  stopped_early=rungs.stopped_early if rungs else None)
    events: list[tuple[float, int, str, int]] = []   # (time, sequence, trial id, epoch ending then)
    trials: dict[str, dict] = {}
    front: list[np.ndarray] = []
    curve = []
    seq = 0

    def start(now: float) -> None:
        nonlocal seq
        trial_id = f"{seed}-{len(trials):04d}"
        outcome = oracle(searcher.suggest(trial_id), latency_col)
        trials[trial_id] = {"trial_id": trial_id, "candidate": outcome.candidate, "outcome": outcome,
                            "start_s": now, "end_s": math.nan, "epochs": 0, "status": "running",
                            "top1": math.nan, "latency_ms": outcome.latency_ms}
        seq += 1
        heapq.heappush(events, (now + outcome.setup_s + outcome.epoch_s[0], seq, trial_id, 1))

    def end(trial: dict, now: float, status: str, result: Optional[dict], error: bool = False) -> None:
        trial.update(end_s=now, status=status)
        searcher.on_trial_complete(trial["trial_id"], result, error=error)
        if status == "ok":
            front.append(np.array([trial["top1"], trial["latency_ms"]]) * signs)
        curve.append((now, len(curve) + 1, hypervolume(np.array(front), ref) if front else 0.0))
        if now < budget_s:
            start(now)

    for _ in range(concurrent):
        start(0.0)
    while events:
        now, _, trial_id, epoch = heapq.heappop(events)
        if now > budget_s:
            break
        trial = trials[trial_id]
        outcome, latency = trial["outcome"], trial["latency_ms"]
        trial["epochs"] = epoch
        if not np.isfinite(outcome.top1[epoch - 1]):  # diverged: the trial fails, as a real one raises
            end(trial, now, "failed", None, error=True)
            continue
        trial["top1"] = float(outcome.top1[epoch - 1])
        result = {"epoch": epoch, "full_epochs": epochs, "top1": trial["top1"], "latency_ms": latency}
        if rungs is not None and epoch < epochs and rungs.on_result(trial_id, epoch, [trial["top1"], latency]) == STOP:
            end(trial, now, "stopped", result)
        elif epoch == epochs:
            end(trial, now, "ok", result)
        else:
            seq += 1
            heapq.heappush(events, (now + outcome.epoch_s[epoch], seq, trial_id, epoch + 1))
    out = pd.DataFrame(list(trials.values())).drop(columns="outcome")
    return Run(sampler, f"moasha" if scheduler else "none", seed, out,
               pd.DataFrame(curve, columns=["end_s", "n_ended", "hypervolume"]))


def default_budget(table: CandidateTable, trials: int, concurrent: int) -> float:
    """Simulated seconds for `trials` full-budget trials of the median recorded length, `concurrent` at a time."""
    from sweeps.candidates import epoch_s_col

    ok = table.frame[table.frame["status"] == "ok"]
    full = ok[[epoch_s_col(k) for k in range(1, table.epochs + 1)]].sum(axis=1) + ok["setup_s"].fillna(0)
    return float(full.median()) * trials / concurrent


def room_left(table: CandidateTable, oracle, *, latency_col: str = "latency_ms", points: int = 4000,
              seed: int = 0) -> dict:
    """How much hypervolume this table leaves to win, from what `oracle` answers for the recorded
    candidates and `points` random points of the space: `front_hv`, the hypervolume of their front (a
    good sampler gets near it); `utopia_hv`, that of one imaginary model with the best top-1 AND the
    lowest latency seen among them (no front within those ranges can exceed it)."""
    from sweeps.candidates import PARAMS, sample_points

    recorded = table.frame[list(PARAMS)].to_dict("records")  # absent stages are NaN: never read
    top1, latency = oracle.final(recorded + sample_points(table.space, points, seed), latency_col)
    signs, ref = minimisation(table, latency_col)
    found = np.c_[top1, latency] * signs
    found = found[np.isfinite(found).all(axis=1)]
    return {"front_hv": hypervolume(found, ref), "utopia_hv": hypervolume(found.min(axis=0, keepdims=True), ref),
            "best_top1": float(-found[:, 0].min()), "lowest_latency_ms": float(found[:, 1].min())}


def _simulate_one(args) -> Run:
    table, sampler, seed, kwargs = args
    import optuna
    import torch
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(1)  # GPSampler's torch: one thread per process
    return simulate(table, sampler, seed, **kwargs)


def run_benchmark(table: CandidateTable, *, samplers: Sequence[str], schedulers: Sequence[str], seeds: int,
                  budget_s: float, concurrent: int = 2, grace: int = 1, eta: float = 2.0,
                  latency_col: str = "latency_ms", oracle=None, jobs: int = 1, log=print) -> list[Run]:
    """Every sampler x scheduler x seed; `oracle`: `table.oracle(...)`, fitted once and shared by every
    run (default: the surrogate)."""
    oracle = oracle or table.oracle("surrogate")
    tasks = [(table, sampler, seed, dict(scheduler=(grace, eta) if scheduler == "moasha" else None, budget_s=budget_s,
                                         concurrent=concurrent, latency_col=latency_col, oracle=oracle))
             for sampler in samplers for scheduler in schedulers for seed in range(seeds)]
    if jobs <= 1:
        runs = []
        for task in tasks:
            runs.append(_simulate_one(task))
            log(f"  {runs[-1].method} seed {runs[-1].seed}: {len(runs[-1].trials)} trials, "
                f"hypervolume {runs[-1].hv_at(budget_s):.2f}")
        return runs
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_simulate_one, tasks))


def summarise(runs: Sequence[Run], budget_s: float, at_trials: int = 24,
              room: Optional[dict] = None) -> tuple[pd.DataFrame, dict]:
    """The table (one row per method) and the two goals; `room` (from `room_left`) tells whether the
    ratio goal can be met on this table at all."""
    from scipy.stats import mannwhitneyu

    by_method: dict[str, list[Run]] = {}
    for run in runs:
        by_method.setdefault(run.method, []).append(run)
    if BASELINE not in by_method:
        raise ValueError(f"the benchmark needs {BASELINE} (random search without early stopping) as its baseline")
    base_final = np.array([r.hv_at(budget_s) for r in by_method[BASELINE]])
    target = float(np.median(base_final))
    rows = []
    for method, group in by_method.items():
        final = np.array([r.hv_at(budget_s) for r in group])
        at_n = np.array([r.hv_after(at_trials) for r in group])
        reach = np.array([r.time_to(target) for r in group])
        p = (mannwhitneyu(final, base_final, alternative="greater").pvalue if method != BASELINE else math.nan)
        q1, q3 = np.percentile(final, [25, 75])
        rows.append({"method": method, "runs": len(group),
                     "trials": float(np.median([len(r.trials) for r in group])),
                     "stopped": float(np.median([(r.trials["status"] == "stopped").sum() for r in group])),
                     "hv_median": float(np.median(final)), "hv_q1": float(q1), "hv_q3": float(q3),
                     f"hv_at_{at_trials}": float(np.nanmedian(at_n)) if np.isfinite(at_n).any() else math.nan,
                     "time_to_random_s": float(np.median(reach)),
                     "time_to_random_frac": float(np.median(reach)) / budget_s,
                     "p_vs_random": float(p)})
    summary = pd.DataFrame(rows).sort_values("hv_median", ascending=False, kind="stable").reset_index(drop=True)
    best = summary.loc[summary["time_to_random_s"].idxmin()]
    base_at = summary.loc[summary["method"] == BASELINE, f"hv_at_{at_trials}"].iloc[0]
    mo = summary[summary["method"].str.split("/").str[0].isin(("tpe", "nsga2", "gp"))]
    ratios = (mo.set_index("method")[f"hv_at_{at_trials}"] / base_at) if base_at > 0 else pd.Series(dtype=float)
    goals = {
        "random_final_hv": target,
        "best_method": best["method"], "best_time_frac": float(best["time_to_random_frac"]),
        "goal_time": bool(best["time_to_random_frac"] <= 1 / 3),
        "best_mo_at_trials": ratios.idxmax() if len(ratios.dropna()) else None,
        "best_mo_ratio": float(ratios.max()) if len(ratios.dropna()) else math.nan,
        "goal_ratio": bool(len(ratios.dropna()) and ratios.max() >= 1.2),
        "at_trials": at_trials,
        "random_hv_at_trials": float(base_at),
    }
    if room:
        goals.update(room, front_ratio=room["front_hv"] / base_at if base_at > 0 else math.nan,
                     utopia_ratio=room["utopia_hv"] / base_at if base_at > 0 else math.nan)
    return summary, goals


def plot_hypervolume(runs: Sequence[Run], budget_s: float, path: str | Path) -> Path:
    """Hypervolume against simulated time: median and interquartile band per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = np.linspace(0, budget_s, 200)
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = dict(zip(SAMPLERS, ("tab:blue", "tab:green", "0.3", "tab:purple")))
    for method, group in _by_method(runs).items():
        sampler, scheduler = method.split("/")
        curves = np.array([[r.hv_at(t) for t in grid] for r in group])
        q1, med, q3 = np.percentile(curves, [25, 50, 75], axis=0)
        style = "-" if scheduler == "moasha" else "--"
        ax.plot(grid / 60, med, style, c=colours.get(sampler), label=f"{method} (n={len(group)})")
        ax.fill_between(grid / 60, q1, q3, color=colours.get(sampler), alpha=0.12)
    ax.set_xlabel("simulated time (min)")
    ax.set_ylabel("hypervolume (top-1 up, latency down)")
    ax.set_title("Replay: hypervolume vs simulated time (median, IQR)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)


def plot_attainment(runs: Sequence[Run], path: str | Path, percentile: float = 50) -> Path:
    """Empirical attainment surfaces (moocore.eaf) of each method's final full-budget fronts: the
    boundary reached by `percentile`% of its runs, one panel per scheduler."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_method = _by_method(runs)
    schedulers = sorted({m.split("/")[1] for m in by_method}, key=lambda s: (s != "none", s))
    fig = Figure(figsize=(6 * len(schedulers), 4.8), dpi=120)
    FigureCanvasAgg(fig)
    colours = dict(zip(SAMPLERS, ("tab:blue", "tab:green", "0.3", "tab:purple")))
    for i, scheduler in enumerate(schedulers):
        ax = fig.add_subplot(1, len(schedulers), i + 1)
        for method, group in by_method.items():
            if method.split("/")[1] != scheduler:
                continue
            surface = attainment_surface(group, percentile)
            if len(surface):
                ax.step(surface[:, 1], -surface[:, 0], where="post", c=colours.get(method.split("/")[0]), label=method)
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("validation top-1 (%)")
        ax.set_title(f"{percentile:g}% attainment surface, scheduler {scheduler}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def attainment_surface(runs: Sequence[Run], percentile: float) -> np.ndarray:
    """(-top1, latency) points of the `percentile`% attainment surface of the runs' final fronts, by latency."""
    points, sets = [], []
    for k, run in enumerate(runs):
        ok = run.trials[run.trials["status"] == "ok"]
        for top1, latency in zip(ok["top1"], ok["latency_ms"]):
            points.append((-top1, latency))
            sets.append(k + 1)
    if not points:
        return np.empty((0, 2))
    surface = moocore.eaf(np.array(points), sets=np.array(sets), percentiles=[percentile])[:, :2]
    return surface[np.argsort(surface[:, 1], kind="stable")]


def _by_method(runs):
    out: dict[str, list[Run]] = {}
    for run in runs:
        out.setdefault(run.method, []).append(run)
    return out


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def build_parser():
    from sweeps.cli import doc_parser, finite_float, positive_int
    from sweeps.pareto import DEFAULT_ETA, DEFAULT_GRACE  # the real sweep's rungs, unless told otherwise

    p = doc_parser(__doc__)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--table", help="a candidate table (CSV with its .json beside it), e.g. from "
                        "sweeps/record_candidates.py")
    source.add_argument("--synthetic", action="store_true", help="a made-up table with a known structure "
                        "(TPE should win on it): to try the benchmark, never for claims")
    p.add_argument("--samplers", default="random,tpe,nsga2,gp", help="comma list of %s (default: %%(default)s)" % ", ".join(SAMPLERS))
    p.add_argument("--schedulers", default="none,moasha", help="comma list of none, moasha (default: %(default)s)")
    p.add_argument("--seeds", type=positive_int, default=10, help="runs per method (default: %(default)s)")
    p.add_argument("--budget-trials", type=positive_int, default=48,
                   help="simulated budget: this many median full-budget trials' time (default: %(default)s)")
    p.add_argument("--budget-s", type=finite_float, help="simulated budget in seconds (overrides --budget-trials)")
    p.add_argument("--concurrent", type=positive_int, default=2, help="trials at once (default: %(default)s)")
    p.add_argument("--grace", type=positive_int, default=DEFAULT_GRACE, help="MO-ASHA: epochs before the first rung (default: %(default)s)")
    p.add_argument("--eta", type=finite_float, default=DEFAULT_ETA, help="MO-ASHA: reduction factor (default: %(default)s)")
    p.add_argument("--latency-col", default="latency_ms", choices=("latency_ms", "latency_measured_ms", "latency_model_ms"),
                   help="the table's latency column to optimise (default: %(default)s)")
    p.add_argument("--oracle", default="surrogate", choices=("surrogate", "nearest"),
                   help="what a trial replays: GP regressions on the table (surrogate) or the nearest recorded "
                        "candidate (nearest) (default: %(default)s)")
    p.add_argument("--room-points", type=positive_int, default=4000,
                   help="random points of the space whose oracle answers estimate the most hypervolume any sampler "
                        "can reach (default: %(default)s)")
    p.add_argument("--at-trials", type=positive_int, default=24, help="compare hypervolume after this many trials (default: 24)")
    p.add_argument("--jobs", type=positive_int, default=1, help="simulations in parallel processes (default: 1)")
    p.add_argument("--out", default="runs/replay", help="tables and plots (default: %(default)s)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    schedulers = [s.strip() for s in args.schedulers.split(",") if s.strip()]
    try:
        if not samplers or any(s not in SAMPLERS for s in samplers):
            raise ValueError(f"--samplers {args.samplers!r}: choose from {', '.join(SAMPLERS)}")
        if not schedulers or any(s not in ("none", "moasha") for s in schedulers):
            raise ValueError(f"--schedulers {args.schedulers!r}: choose from none, moasha")
        if "random" not in samplers or "none" not in schedulers:
            raise ValueError("the baseline is random search without early stopping: keep random in --samplers "
                             "and none in --schedulers")
        if not args.eta > 1:
            raise ValueError(f"--eta {args.eta:g} must be > 1")
        from sweeps.candidates import CandidateTable, synthetic_table
        table = synthetic_table() if args.synthetic else CandidateTable.read(args.table)
        if args.latency_col not in table.frame or table.frame[args.latency_col].isna().all():
            raise ValueError(f"--latency-col {args.latency_col}: the table has no such values")
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    budget = args.budget_s or default_budget(table, args.budget_trials, args.concurrent)
    print(f"replay of {args.table or 'a synthetic table'} ({len(table.frame)} candidates, {table.epochs} epochs): "
          f"{len(samplers)} samplers x {schedulers} x {args.seeds} seeds, {args.concurrent} trials at a time, "
          f"budget {budget:.0f} simulated s, latency column {args.latency_col}, oracle {args.oracle}, "
          f"reference {table.reference(args.latency_col)}")
    oracle = table.oracle(args.oracle)  # fitted once: the runs and the room ask the same one
    runs = run_benchmark(table, samplers=samplers, schedulers=schedulers, seeds=args.seeds, budget_s=budget,
                         concurrent=args.concurrent, grace=args.grace, eta=args.eta, latency_col=args.latency_col,
                         oracle=oracle, jobs=args.jobs)
    print(f"room: the front of {args.room_points} random points of the space and the recorded candidates as the "
          f"{args.oracle} oracle answers them", flush=True)
    room = room_left(table, oracle, latency_col=args.latency_col, points=args.room_points)
    summary, goals = summarise(runs, budget, args.at_trials, room)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out / "replay_summary.csv", index=False)
    pd.concat([r.trials.assign(method=r.method, seed=r.seed) for r in runs]).to_csv(out / "replay_trials.csv", index=False)
    pd.concat([r.curve.assign(method=r.method, seed=r.seed) for r in runs]).to_csv(out / "replay_curves.csv", index=False)
    plot_hypervolume(runs, budget, out / "replay_hypervolume.png")
    plot_attainment(runs, out / "replay_attainment.png")
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"goal 1: best method {goals['best_method']} reaches random search's final hypervolume "
          f"({goals['random_final_hv']:.3g}) at {goals['best_time_frac']:.2f} of the budget (goal <= 0.33): "
          f"{'MET' if goals['goal_time'] else 'NOT MET'}")
    if goals["best_mo_at_trials"] is None:  # no Optuna sampler (or random search) got that many trials
        print(f"goal 2: no comparison after {goals['at_trials']} trials (not every method ended that many within the "
              "budget: raise --budget-trials or lower --at-trials): NOT MET")
    else:
        print(f"goal 2: after {goals['at_trials']} trials, best Optuna multi-objective sampler "
              f"{goals['best_mo_at_trials']} has {goals['best_mo_ratio']:.2f}x random search's hypervolume "
              f"(goal >= 1.2): {'MET' if goals['goal_ratio'] else 'NOT MET'}")
    print(f"room: the front the {args.oracle} oracle gives has hypervolume {goals['front_hv']:.4g}; one model with its "
          f"best top-1 ({goals['best_top1']:.2f}) and lowest latency ({goals['lowest_latency_ms']:.1f} ms) would have "
          f"{goals['utopia_hv']:.4g}" + (
              f"; random search after {goals['at_trials']} trials: {goals['random_hv_at_trials']:.4g}, so at most "
              f"{goals['utopia_ratio']:.3f}x (the front: {goals['front_ratio']:.3f}x)"
              + ("" if goals["utopia_ratio"] >= 1.2 else ": below 1.2, goal 2 cannot be met on this table at this "
                                                          "reference point within the ranges seen")
              if math.isfinite(goals["random_hv_at_trials"]) else ""))
    (out / "replay_goals.json").write_text(json.dumps(goals, indent=2, default=str) + "\n")
    print(f"protocol: {args.seeds} seeds per method, medians; Mann-Whitney U one-sided vs {BASELINE} on final "
          f"hypervolume (scipy); oracle {args.oracle}; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
