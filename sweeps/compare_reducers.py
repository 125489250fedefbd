"""Benchmark: SiT (TSM + FRD) vs hard drop vs merge vs no distillation, at the same MACs and budget.

    python sweeps/compare_reducers.py                               # fmnist-cpu: 2 budgets x 3 seeds (~1 h on 2 cores)
    python sweeps/compare_reducers.py --budgets 1 --seeds 0         # one budget, one seed (~10 min)
    python sweeps/compare_reducers.py --arms sit,sit+pool --budgets 5   # the TSM warm-start A/B

Every arm starts from the preset's teacher (shipped, cached or checkpoint) and is trained by the
project's own training code (`sit_core.train`, the code a one-worker sweep trial runs) with the
preset's recipe, at two MAC reductions (~1.7x and ~3.5x) and at budgets that are multiples of the
preset's sweep-trial budget (epochs x max_steps_per_epoch steps; x5 means 5x the steps per epoch):
  sit       TSMs after the blocks, FRD (lambda_token = lambda_logits = 2, tau = 1), the paper's random TSM start
  sit+pool  the same, TSMs warm-started as a spatial pooling (sit_core.warm_start; the project's default)
  drop      EViT: top-k by the block's class attention between attention and MLP, dropped tokens fused
  merge     ToMe at the same positions, proportional attention
  ce-only   SiT's TSMs trained with cross-entropy only (no distillation)
The peers get the same FRD loss (RTSMs on their tokens), so only the reducer differs. They reduce
inside a block, so at the same positions they remove more MACs than a TSM after it: their keep
ratio is set so their MACs match SiT's (within ~1%). Seeds change the TSM/RTSM init and the data
order. Prints mean +- std over seeds of test top-1 and its share of the teacher's, and writes every
run to OUT/runs.csv and the summary to OUT/summary.csv. A benchmark, not a test.
"""
from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pandas as pd

from sit_core.config import DistillJob, override
from sit_core.presets import PRESETS, get_preset
from sweeps.cli import doc_parser

# Same positions for every arm; the peers' keep ratio matches SiT's MACs on the fmnist-cpu ViT
# (sit_core.flops.count_macs: 1.69x vs 1.69x, 3.48x vs 3.52x).
SCHEDULES = {"1.7x": {"tsm": "2,4@0.5", "peer": "2,4@0.62"},
             "3.5x": {"tsm": "1,2,3@0.35", "peer": "1,2,3@0.53"}}
ARMS = {  # name -> (reducer, schedule suffix, job changes)
    "sit": ("tsm", "", {"train.tsm_init": "random"}),     # the paper's start
    "sit+pool": ("tsm", "", {"train.tsm_init": "pool"}),
    "drop": ("drop", "+fuse", {}),
    "merge": ("merge", "", {}),
    "ce-only": ("tsm", "", {"loss.lambda_token": 0.0, "loss.lambda_logits": 0.0, "train.tsm_init": "random"}),
}


def arm_job(base: DistillJob, arm: str, schedule: str, budget: int, seed: int) -> DistillJob:
    reducer, suffix, changes = ARMS[arm]
    text = SCHEDULES[schedule]["tsm" if reducer == "tsm" else "peer"] + suffix
    steps = base.train.max_steps_per_epoch
    return override(base, {"name": f"{arm}-{schedule}-x{budget}-s{seed}", "model.schedule": f"{reducer}:{text}",
                           "train.seed": seed, "train.max_steps_per_epoch": steps * budget if steps else None,
                           **changes})


def run_one(job: DistillJob, teacher_state: dict, threads: int) -> dict:
    """Distil `job` in this process with the project's training code; its final metrics."""
    from sit_core.flops import count_macs
    from sit_core.train import local_trainer, run_epochs

    trainer, loader, splits = local_trainer(job, teacher_state, threads=threads)
    final = {}
    run_epochs(trainer, loader, splits.val, splits.test, start_epoch=0,
               report=lambda metrics, last: final.update(metrics))
    model = trainer.task.inference_model
    return {"val_top1": final["val_top1"], "test_top1": final.get("test_top1"), "status": final["status"],
            "mmacs": count_macs(model, job.data.img_size, job.data.in_chans) / 1e6,
            "steps": trainer.step_count}


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    return (runs.groupby(["schedule", "budget", "arm"], sort=False)
            .agg(seeds=("seed", "count"), mmacs=("mmacs", "first"), macs_saved=("macs_saved", "first"),
                 val_mean=("val_top1", "mean"), test_mean=("test_top1", "mean"), test_std=("test_top1", "std"),
                 of_teacher_mean=("of_teacher", "mean"), of_teacher_std=("of_teacher", "std"))
            .reset_index())


def main(argv=None) -> int:
    p = doc_parser(__doc__)
    p.add_argument("--preset", default="fmnist-cpu", choices=sorted(PRESETS))
    p.add_argument("--arms", default=",".join(ARMS), help="comma list of %(default)s")
    p.add_argument("--schedules", default=",".join(SCHEDULES), help="comma list of %(default)s")
    p.add_argument("--budgets", default="1,5", help="multiples of the preset's trial budget (default: %(default)s)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--out", default="runs/compare_reducers", help="where runs.csv and summary.csv go")
    args = p.parse_args(argv)
    try:
        arms, schedules = args.arms.split(","), args.schedules.split(",")
        budgets, seeds = [int(b) for b in args.budgets.split(",")], [int(s) for s in args.seeds.split(",")]
        unknown = [a for a in arms if a not in ARMS] + [s for s in schedules if s not in SCHEDULES]
        if unknown or not all(b >= 1 for b in budgets):
            raise ValueError(f"unknown arms/schedules {unknown} or a budget < 1 in {budgets}")
    except ValueError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")

    from sit_core import teachers
    from sit_core.flops import count_macs
    from sit_core.train import local_trainer

    base = get_preset(args.preset)
    record = teachers.find(base)
    if record is None:
        p.exit(2, f"{p.prog}: error: no shipped or cached teacher for {args.preset}: run "
                  f"`python sweeps/train_teacher.py --preset {args.preset}` first\n")
    state = teachers.load_state(base, record.path)
    # the plain backbone as a "student" with no reducer: every weight copied from the teacher
    teacher_eval, _, splits = local_trainer(override(base, {"model.schedule": "none"}), state, threads=args.threads)
    t_val, t_test = teacher_eval.top1(splits.val), teacher_eval.top1(splits.test)
    t_macs = count_macs(teacher_eval.task.inference_model, base.data.img_size, base.data.in_chans) / 1e6
    print(f"teacher {record.path.name}: val top-1 {t_val:.2f}%, test top-1 {t_test:.2f}%, {t_macs:.2f} MMACs/image")

    os.makedirs(args.out, exist_ok=True)
    rows = []
    total = len(schedules) * len(budgets) * len(arms) * len(seeds)
    for budget in budgets:
        for schedule in schedules:
            for arm in arms:
                for seed in seeds:
                    job = arm_job(base, arm, schedule, budget, seed)
                    t0 = time.time()
                    r = run_one(job, state, args.threads)
                    r.update(arm=arm, schedule=schedule, budget=budget, seed=seed, spec=str(job.model.schedule),
                             train_s=round(time.time() - t0, 1), macs_saved=t_macs / r["mmacs"],
                             of_teacher=100 * r["test_top1"] / t_test)
                    rows.append(r)
                    print(f"[{len(rows)}/{total}] {arm:8s} {schedule} x{budget} seed {seed} ({r['spec']}, "
                          f"{r['macs_saved']:.2f}x fewer MACs): val {r['val_top1']:.2f} test {r['test_top1']:.2f} "
                          f"({r['of_teacher']:.1f}% of teacher) in {r['train_s']:.0f}s", flush=True)
                    pd.DataFrame(rows).to_csv(os.path.join(args.out, "runs.csv"), index=False)
    summary = summarise(pd.DataFrame(rows))
    summary.to_csv(os.path.join(args.out, "summary.csv"), index=False)
    recipe = base.train
    print(f"\nteacher: val {t_val:.2f}% test {t_test:.2f}% ({base.model.backbone} {base.model.kwargs})")
    print(f"recipe: {recipe.epochs} epochs x {recipe.max_steps_per_epoch} steps (x budget) of {recipe.batch_size} "
          f"images, AdamW lr {recipe.lr:g} (RTSMs x{recipe.rtsm_lr_mult:g}), cosine to {recipe.min_lr:g}, "
          f"wd {recipe.weight_decay:g}; FRD lambda_token {base.loss.lambda_token:g}, lambda_logits "
          f"{base.loss.lambda_logits:g}, tau {base.loss.tau:g}; {args.threads} threads; seeds {seeds}")
    with pd.option_context("display.width", 200):
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
