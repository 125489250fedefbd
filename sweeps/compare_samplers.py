"""Benchmark: the Optuna multi-objective sampler vs random search, same budget, same seeds.

    python sweeps/compare_samplers.py                    # 2 sweeps of 8 trials on the fmnist-cpu preset
    python sweeps/compare_samplers.py --trials 16 --samplers tpe,nsga2,random

Runs `sweeps/pareto.py` once per sampler (same preset, trials, seed, warm start), then computes
every front's hypervolume against ONE shared reference point (chance accuracy, the slowest
teacher latency any sweep measured), and reports each sweep's orchestration overhead: the share of
a trial's wall time spent outside training, evaluation and speed measurement. A benchmark, not a test.
"""
from __future__ import annotations

import os
import subprocess
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sweeps.cli import doc_parser
import pandas as pd

from sweeps import pareto_front

OBJECTIVES = {"top1": "max", "latency_ms": "min"}


def main(argv=None) -> int:
    p = doc_parser(__doc__)
    p.add_argument("--samplers", default="tpe,random", help="comma list of tpe, nsga2, random, gp (default: %(default)s)")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/compare_samplers")
    p.add_argument("--skip-run", action="store_true", help="only re-read the finished sweeps under --out")
    args, extra = p.parse_known_args(argv)
    tables = {}
    for sampler in args.samplers.split(","):
        out = os.path.join(os.path.abspath(args.out), sampler)
        if not args.skip_run:
            subprocess.run([sys.executable, "sweeps/pareto.py", "--sampler", sampler, "--trials", str(args.trials),
                            "--seed", str(args.seed), "--out", out, *extra], check=True)
        tables[sampler] = pd.read_csv(os.path.join(out, "pareto.csv"))
    teacher_latency = max(_teacher_latency(os.path.join(os.path.abspath(args.out), s)) for s in tables)
    reference = {"top1": 10.0, "latency_ms": teacher_latency}
    rows = []
    for sampler, t in tables.items():
        t = t.copy()
        t["pareto"] = pareto_front.pareto_mask(t, OBJECTIVES)
        rows.append({"sampler": sampler, "trials": len(t), "failed": int((t["status"] == "failed").sum()),
                     "stopped": int((t["status"] == "stopped").sum()),
                     "pareto_points": int(t["pareto"].sum()), "hypervolume": pareto_front.hypervolume(t, OBJECTIVES, reference),
                     "best_top1": t["top1"].max(), "fastest_ms": t["latency_ms"].min(),
                     "overhead_share_mean": t["overhead_share"].mean(), "overhead_share_max": t["overhead_share"].max(),
                     "trial_wall_s_mean": t["wall_s"].mean()})
    print(f"shared reference point: {reference}")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def _teacher_latency(out: str) -> float:
    """The teacher's latency the sweep measured (logged on its MLflow parent run)."""
    from sweeps import tracking
    import json
    meta = json.loads(open(os.path.join(out, "sweep.json")).read())
    client = tracking.MlflowClient(meta["tracking_uri"])
    exp = client.get_experiment_by_name("sit-pareto")
    runs = client.search_runs([exp.experiment_id], f"tags.`sit.sweep_id` = '{meta['name']}'")
    return float(runs[0].data.metrics["teacher_latency_ms"])


if __name__ == "__main__":
    sys.exit(main())
