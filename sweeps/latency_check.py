"""Can the latency model be trusted on this machine? Predicted vs measured end to end for held-out
random schedules of the sweep's search space, and how stable end-to-end measurement itself is.

    python sweeps/latency_check.py --preset deit-small-imagenet      # DeiT-S, random weights, batch 64, CPU
    python sweeps/latency_check.py                                    # the default preset (fmnist-cpu)
    python sweeps/latency_check.py --smoke-test                       # seconds: the mechanics only
    python sweeps/latency_check.py --front runs/pareto                # re-confirm a finished sweep's front

Builds (or loads from the cache) the preset's latency table on this machine, draws --schedules
distinct random points of search_spaces.SearchSpace (Optuna's RandomSampler, --seed, the sweep's
reducers), and times every candidate and the teacher end to end, interleaved, --confirmations
independent times (fresh models, a fresh order). Prints each schedule's prediction and measurement;
accuracy over the candidates (MAPE, share within +-10%, Spearman rho of predicted vs measured
median latency; also for the parts alone, without the teacher's offset); stability (each model's
coefficient of variation over the confirmations, Kendall tau between the first two orderings); the
protocols; and the goals of issue 9 with a verdict. --csv writes the per-schedule table.

--front OUT re-confirms a finished sweep's confirmed front (the rows of OUT/pareto.csv with a
measured latency, the front and the trials within 5% of it) --confirmations independent times on
this machine, with the sweep's own serving setting (batch, dtype, threads) unless overridden:
per-point coefficient of variation, Kendall tau between the orderings, and how far each
re-confirmation is from the sweep's own measurement (meaningful on the machine the sweep timed on).

A benchmark, not a test: run it with nothing else on the machine. Random weights (speed does not
depend on them). DeiT-S at batch 64 on a 2-core CPU takes about 45 minutes with the defaults (the
table ~10, then 31 models x 2 confirmations x 12 forwards of ~2.5 s); fmnist-cpu a few minutes.
The run prints its own estimate once the table is built.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Mapping, Optional, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import pandas as pd

from sweeps.cli import doc_parser, positive_int

WITHIN = 0.10             # "within +-10%"
# issue 9's goals: (share within +-10%, Spearman rho) for DeiT-S-sized models and for the default preset
GOALS = {"deit": (0.95, 0.95), "default": (None, 0.90)}
STABILITY_GOAL = (0.03, 0.90)  # per-model coefficient of variation <= 3%, Kendall tau >= 0.9
ROUNDS = 10               # end-to-end rounds per confirmation, one timed forward per model each
SMOKE = dict(schedules=6, rounds=2, iters=1, warmup=1)


def build_parser():
    from sit_core.presets import PRESETS

    p = doc_parser(__doc__)
    p.add_argument("--preset", default="fmnist-cpu", choices=sorted(PRESETS), help="backbone and serving setting "
                   "(default: %(default)s)")
    p.add_argument("--schedules", type=positive_int, help="held-out random schedules (default: 30; smoke: 6)")
    p.add_argument("--reducers", default="tsm,drop,merge", help="reducers the schedules use (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random sampler seed (default: 0)")
    p.add_argument("--speed-batch", type=positive_int, help="batch size (default: the preset's)")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: the preset's, else every core)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="serving device (default: the preset's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="serving dtype (default: the preset's)")
    p.add_argument("--rounds", type=positive_int, help=f"interleaved rounds per confirmation (default: {ROUNDS})")
    p.add_argument("--iters", type=positive_int, help="timed forwards per model per round (default: 1)")
    p.add_argument("--warmup", type=int, help="discarded forwards per model before the rounds (default: 2)")
    p.add_argument("--confirmations", type=positive_int, default=2,
                   help="independent end-to-end measurements of the same models (default: %(default)s; >= 2 for "
                        "the stability figures)")
    p.add_argument("--table-dir", help="where latency tables are kept (default: the project cache)")
    p.add_argument("--csv", help="write the per-schedule table here")
    p.add_argument("--smoke-test", action="store_true", help="a tiny model, a short protocol: numbers meaningless")
    p.add_argument("--front", metavar="OUT", help="a finished sweep's --out: re-confirm its confirmed front instead "
                   "(stability only; --preset, --schedules, --reducers and --seed do not apply)")
    return p


def draw_schedules(job, reducers: Sequence[str], n: int, seed: int) -> list:
    """`n` distinct schedules drawn at random from the sweep's search space for this job."""
    import optuna

    from search_spaces import SearchSpace, apply_point

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = SearchSpace.for_job(job, tuple(reducers))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    found: dict = {}
    for _ in range(50 * n):
        trial = study.ask()
        space(trial)
        schedule = apply_point(job, trial.params).model.schedule
        found.setdefault(str(schedule), schedule)
        if len(found) == n:
            return list(found.values())
    raise ValueError(f"the search space gave only {len(found)} distinct schedules in {50 * n} draws; ask for fewer")


def accuracy(predicted: Sequence[float], measured: Sequence[float]) -> dict:
    """MAPE (%), share within +-WITHIN, Spearman rho of predicted vs measured."""
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    error = np.abs(p - m) / m
    rho = pd.Series(p).corr(pd.Series(m), method="spearman") if len(p) > 1 else float("nan")
    return {"n": len(p), "mape_pct": float(error.mean() * 100), "within": float((error <= WITHIN + 1e-12).mean()),
            "spearman": float(rho)}


def stability(runs: pd.DataFrame) -> dict:
    """`runs`: one column of p50 latencies per confirmation, one row per model. Coefficient of variation
    per model over the confirmations (ddof 1), Kendall tau between the first two columns' orderings."""
    cv = runs.std(axis=1, ddof=1) / runs.mean(axis=1)
    tau = runs.iloc[:, 0].corr(runs.iloc[:, 1], method="kendall") if runs.shape[1] > 1 else float("nan")
    out = {"cv": cv, "cv_median": float(cv.median()), "cv_max": float(cv.max()),
           "cv_within_goal": int((cv <= STABILITY_GOAL[0]).sum()), "kendall": float(tau)}
    if "teacher" in runs.index and len(runs) > 1:
        # each model over the teacher timed beside it: what a card's speed-up is made of, without the
        # machine's own drift between confirmations (which every model shares)
        relative = runs.drop(index="teacher") / runs.loc["teacher"]
        rel_cv = relative.std(axis=1, ddof=1) / relative.mean(axis=1)
        teacher = runs.loc["teacher"]
        out.update(relative_cv=rel_cv, relative_cv_median=float(rel_cv.median()), relative_cv_max=float(rel_cv.max()),
                   relative_within_goal=int((rel_cv <= STABILITY_GOAL[0]).sum()),
                   teacher_change=float(teacher.max() / teacher.min() - 1))
    return out


def confirm(specs: dict, speed, *, confirmations: int, rounds: int, iters: int, warmup: int,
            seed: int) -> tuple[pd.DataFrame, dict]:
    """Every model of `specs` timed end to end, interleaved, `confirmations` independent times (fresh
    models, a fresh order each: who runs next to whom changes too). Returns (one column of p50s per
    confirmation, one row per model; the last confirmation's SpeedRecords)."""
    from sit_core import latency

    rng = np.random.default_rng(seed)
    runs, records = {}, {}
    for c in range(confirmations):
        order = list(rng.permutation(list(specs)))
        t1 = time.time()
        records = latency.measure_models({name: specs[name] for name in order}, speed, rounds=rounds,
                                         iters=iters, warmup=warmup)
        runs[f"confirmation_{c + 1}"] = pd.Series({name: r.p50_ms for name, r in records.items()})
        print(f"confirmation {c + 1}/{confirmations}: {time.time() - t1:.0f} s", flush=True)
    return pd.DataFrame(runs).loc[list(specs)], records


def _speed_changes(args) -> dict:
    changes = {"speed.batch_size": args.speed_batch, "speed.threads": args.threads, "speed.device": args.device,
               "speed.dtype": args.dtype}
    return {k: v for k, v in changes.items() if v is not None}


def _check_cuda(job) -> None:
    if job.speed.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device here")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.front:
        return check_front(p, args)
    from sit_core import latency
    from sit_core.config import override
    from sit_core.presets import get_preset, smoke

    reducers = [r.strip() for r in args.reducers.split(",") if r.strip()]
    try:
        if not reducers or any(r not in ("tsm", "drop", "merge") for r in reducers):
            raise ValueError(f"--reducers {args.reducers!r}: choose from tsm, drop, merge")
        if args.confirmations < 2:
            print("note: one confirmation gives no stability figures", file=sys.stderr)
        job = get_preset(args.preset)
        job = smoke(job) if args.smoke_test else job
        job = override(job, _speed_changes(args))
        _check_cuda(job)
        n = args.schedules or (SMOKE["schedules"] if args.smoke_test else 30)
        schedules = draw_schedules(job, reducers, n, args.seed)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    quick = SMOKE if args.smoke_test else {}
    rounds = args.rounds or quick.get("rounds", ROUNDS)
    iters = args.iters or quick.get("iters", 1)
    warmup = args.warmup if args.warmup is not None else quick.get("warmup", 2)
    t0 = time.time()

    table = latency.ensure_table(job.model, job.speed, reducers, directory=args.table_dir,
                                 protocol=latency.QUICK if args.smoke_test else latency.Protocol())
    specs = {"teacher": job.model.teacher(), **{str(s): job.model.with_schedule(s) for s in schedules}}
    predicted = {name: table.breakdown(spec.schedule) for name, spec in specs.items()}
    per_forward = sum(v["total"] for v in predicted.values()) / 1e3
    print(f"{len(schedules)} held-out schedules ({', '.join(reducers)}, seed {args.seed}) + the teacher, "
          f"{args.confirmations} confirmation(s) x ({warmup} warm-up + {rounds} rounds x {iters}) forwards each: "
          f"about {args.confirmations * (warmup + rounds * iters) * per_forward / 60:.1f} min of timing", flush=True)

    runs, records = confirm(specs, job.speed, confirmations=args.confirmations, rounds=rounds, iters=iters,
                            warmup=warmup, seed=args.seed)

    rows = []
    for name, spec in specs.items():
        rows.append({"schedule": name, "reducer": spec.schedule.reducer, "predicted_ms": predicted[name]["total"],
                     "parts_ms": predicted[name]["total"] - predicted[name]["offset"],
                     "measured_ms": float(runs.loc[name].median()), "iqr_ms": records[name].iqr_ms,
                     **runs.loc[name].to_dict()})
    frame = pd.DataFrame(rows)
    frame["error_pct"] = (frame["predicted_ms"] / frame["measured_ms"] - 1) * 100
    report(frame, runs, table, records, job, args, schedules)
    if args.csv:
        frame.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    print(f"latency check finished in {time.time() - t0:.0f} s")
    return 0


def report(frame: pd.DataFrame, runs: pd.DataFrame, table, records: dict, job, args, schedules) -> None:
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    held_out = frame[frame["schedule"] != "teacher"]
    depth, num_patches, _, _ = table.fingerprint["geometry"]
    grid = set(table.parts["attn"]["n"])
    counts = [n for s in schedules for n in s.block_tokens(depth, num_patches) + s.block_out_tokens(depth, num_patches)]
    off_grid = sum(n not in grid for n in counts) / len(counts)
    goal_key = "deit" if job.model.backbone.startswith("deit") else "default"
    within_goal, rho_goal = GOALS[goal_key]

    print(f"\naccuracy over {len(held_out)} held-out schedules ({off_grid:.0%} of their blocks' token counts lie "
          f"between the table's grid points):")
    overall = accuracy(held_out["predicted_ms"], held_out["measured_ms"])
    lines = [("model (parts + offset)", overall),
             ("parts alone (no offset)", accuracy(held_out["parts_ms"], held_out["measured_ms"]))]
    lines += [(f"  {r} only", accuracy(g["predicted_ms"], g["measured_ms"]))
              for r, g in held_out.groupby("reducer") if len(g) > 1]
    for label, a in lines:
        print(f"  {label:26s} MAPE {a['mape_pct']:5.1f}%   within +-{WITHIN:.0%}: {a['within']:6.1%} "
              f"({round(a['within'] * a['n'])}/{a['n']})   Spearman rho {a['spearman']:.3f}")
    verdict = (within_goal is None or overall["within"] >= within_goal) and overall["spearman"] >= rho_goal
    goal = f"rho >= {rho_goal}" + (f" and >= {within_goal:.0%} within +-10%" if within_goal else "")
    print(f"  goal ({'DeiT-S-sized' if goal_key == 'deit' else 'default preset'}): {goal} -> "
          f"{'met' if verdict else 'NOT met'}")
    report_stability(runs, "models")
    print(f"\nprotocol (table): {table.protocol}")
    print(f"protocol (end to end, per confirmation): {records['teacher'].protocol()}")
    print(f"table: {table.describe()}" + (f"; {table.path}" if table.path else ""))


def report_stability(runs: pd.DataFrame, what: str) -> Optional[dict]:
    if runs.shape[1] < 2:
        return None
    st = stability(runs)
    print(f"\nstability over {runs.shape[1]} independent confirmations of the same {len(runs)} {what}:")
    print(f"  coefficient of variation per model: median {st['cv_median']:.2%}, max {st['cv_max']:.2%}; "
          f"{st['cv_within_goal']}/{len(runs)} models <= {STABILITY_GOAL[0]:.0%}")
    print(f"  Kendall tau between the first two orderings: {st['kendall']:.3f}")
    if "relative_cv" in st:
        n = len(st["relative_cv"])
        print(f"  the teacher's own latency moved {st['teacher_change']:.1%} between confirmations (the machine's "
              "speed, shared by every model)")
        print(f"  each model over the teacher timed beside it (its speed-up): CV median {st['relative_cv_median']:.2%}, "
              f"max {st['relative_cv_max']:.2%}; {st['relative_within_goal']}/{n} models <= {STABILITY_GOAL[0]:.0%}")
    ok = st["cv_max"] <= STABILITY_GOAL[0] and st["kendall"] >= STABILITY_GOAL[1]
    print(f"  goal: every CV <= {STABILITY_GOAL[0]:.0%} and tau >= {STABILITY_GOAL[1]} -> {'met' if ok else 'NOT met'}")
    return st


def front_models(out: str, changes: Mapping) -> tuple:
    """(job, {name: ModelSpec} of the teacher and every distinct architecture the sweep confirmed,
    the confirmed rows) from a finished sweep's --out. ValueError, one line, where it has none."""
    import io
    import json

    from sit_core.config import DistillJob, override
    from sweeps import storage

    out = storage.normalise(out)
    marker, csv = storage.join(out, "sweep.json"), storage.join(out, "pareto.csv")
    if not storage.exists(marker) or not storage.exists(csv):
        raise ValueError(f"{out} holds no finished sweep (sweep.json and pareto.csv): pass a sweep's --out")
    job = override(DistillJob.from_dict(json.loads(storage.read_text(marker))["base_job"]), changes)
    table = pd.read_csv(io.StringIO(storage.read_text(csv)))
    if "latency_measured_ms" not in table or not table["latency_measured_ms"].notna().any():
        raise ValueError(f"the sweep in {out} confirmed no front (no latency_measured_ms): nothing to re-confirm")
    rows = table[table["latency_measured_ms"].notna()].copy()
    specs = {"teacher": job.model.teacher()}
    for schedule in rows["schedule"]:
        specs.setdefault(str(schedule), job.model.with_schedule(str(schedule)))
    return job, specs, rows


def check_front(p, args) -> int:
    """--front: the sweep's confirmed front, re-measured end to end --confirmations times on this machine."""
    try:
        if args.confirmations < 2:
            raise ValueError("--front needs --confirmations >= 2 (stability is the point)")
        job, specs, rows = front_models(args.front, _speed_changes(args))
        _check_cuda(job)
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    t0 = time.time()
    rounds, iters = args.rounds or job.speed.iters, args.iters or 1
    warmup = args.warmup if args.warmup is not None else job.speed.warmup
    print(f"re-confirming the front of {args.front}: {len(rows)} confirmed trial(s), {len(specs) - 1} "
          f"architecture(s) + the teacher, {args.confirmations} independent confirmations x ({warmup} warm-up + "
          f"{rounds} rounds x {iters}) forwards each", flush=True)
    runs, records = confirm(specs, job.speed, confirmations=args.confirmations, rounds=rounds, iters=iters,
                            warmup=warmup, seed=args.seed)
    sweep = rows.groupby(rows["schedule"].astype(str))["latency_measured_ms"].median()
    frame = runs.copy()
    frame.insert(0, "sweep_ms", [float("nan") if n == "teacher" else sweep[n] for n in frame.index])
    teacher = rows["teacher_latency_measured_ms"].dropna()
    frame.loc["teacher", "sweep_ms"] = teacher.iloc[0] if len(teacher) else float("nan")
    frame["cv"] = stability(runs)["cv"]
    frame["speedup"] = runs.median(axis=1).loc["teacher"] / runs.median(axis=1)
    frame.index.name = "schedule"
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(frame.to_string(float_format=lambda v: f"{v:.3f}"))
    report_stability(runs, "models (the sweep's confirmed front and the teacher)")
    vs_sweep = [runs[c].corr(frame["sweep_ms"], method="kendall") for c in runs]
    drift = (runs.median(axis=1) / frame["sweep_ms"] - 1).abs()
    print(f"  against the sweep's own confirmation: Kendall tau {', '.join(f'{t:.3f}' for t in vs_sweep)}; "
          f"median |difference| {drift.median():.1%} (compare only on the hardware the sweep timed on)")
    slower = frame[frame["speedup"] <= 1.0].drop(index="teacher", errors="ignore")
    if len(slower):
        print(f"  measured here no faster than the teacher: {', '.join(slower.index)}")
    print(f"\nprotocol (end to end, per confirmation): {records['teacher'].protocol()}")
    if args.csv:
        frame.to_csv(args.csv)
        print(f"wrote {args.csv}")
    print(f"front check finished in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
