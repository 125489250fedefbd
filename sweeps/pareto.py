"""Search the speed/accuracy Pareto front of SiT candidates: Ray Tune + Optuna, MLflow, cards.

    python sweeps/pareto.py                         # local: Fashion-MNIST preset, <= 10 min on 2 cores
    python sweeps/pareto.py --smoke-test            # a couple of minutes
    python sweeps/pareto.py --resume                # continue a killed sweep (same --out / --name)
    python sweeps/pareto.py --model deit3_small_patch16_224 --num-classes 37 --data pets \
        --teacher-checkpoint my_deit3.pth --finetune-teacher 3 --out runs/pets    # your own ViT and images
    ray job submit --working-dir . -- python sweeps/pareto.py --preset deit-small-imagenet \\
        --data /mnt/shared/imagenet --teacher-checkpoint /mnt/shared/deit_small.pth \\
        --workers 4 --gpu --out /mnt/shared/runs/deit-s --tracking-uri http://HEAD:5000   # on a cluster

Every trial distils one sampled candidate (schedule, keep ratios, loss weights, lr) from the
teacher and reports validation top-1 every epoch with the candidate's latency: predicted by a
latency table of the backbone measured once on the serving hardware (--latency model, the
default), or timed end to end per trial (--latency measure). At the end the front and the trials
within 5% of it are timed end to end, interleaved with the teacher, and the front is recomputed on
those measurements; a candidate measured no faster than the teacher is never exported. Latency is
timed where the model will serve: this node's CPU, a GPU (--speed-device cuda), or the node that
advertises --latency-resource (e.g. inference_cpu, cluster.yaml's serving node). Objectives default
to maximising validation top-1 and minimising latency; trials over --max-latency-ms or under
--min-top1 are infeasible and never on the front. Early stopping (MO-ASHA, on by default): after
--grace epochs and then every --eta times as many, a trial goes on only if it is in the top 1/eta
of the trials that reached that point, by Pareto rank (feasible before infeasible); a stopped
trial is PRUNED in Optuna, KILLED in MLflow and never on the front (only full-budget trials are).
Each trial is a nested MLflow run under the sweep's parent run, live while it trains; the front is
exported as cards (sit_core.load_card rebuilds the model). On a cluster, trials are sized from what its autoscaler can add (and asked of
it at once); --out must be storage every node sees (a shared mount or an s3://, gs:// URI: a local
directory is refused unless verified or confirmed with --shared-out), and SQLite stores stay on the
driver's local disk.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Optional

if __package__ in (None, ""):  # `python sweeps/pareto.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from search_spaces import SearchSpace
from sit_core.config import DistillJob
from sweeps.cli import (SAMPLERS, add_job_arguments, doc_parser, finite_float, job_from_args, job_yaml, parse_or_exit,
                        positive_int, validate_job)
from sweeps import storage
from sweeps.pareto_front import Constraints

# The embedded default, <= 10 min on 2 cores: with MO-ASHA a trial trains ~0.52 of its 4 epochs on
# average (16 trials: ~33 epochs, 4 of them to the end), so 16 start where 6 trained to the end.
DEFAULT_TRIALS, DEFAULT_TRIALS_FULL_BUDGET = 16, 6  # --scheduler moasha / none
SMOKE_TRIALS = 3
DEFAULT_GRACE, DEFAULT_ETA = 1, 3.0  # fmnist-cpu: 4 epochs, rungs after epochs 1 and 3
OBJECTIVE_CHOICES = {"top1": "max", "latency_ms": "min", "gmacs": "min"}
REDUCERS = ("tsm", "drop", "merge")


def parse_objectives(text: str) -> dict:
    objectives = {}
    for part in text.split(","):
        name, _, mode = part.strip().partition(":")
        if name not in OBJECTIVE_CHOICES:
            raise ValueError(f"objective {name!r} is not one of {', '.join(OBJECTIVE_CHOICES)}")
        mode = mode or OBJECTIVE_CHOICES[name]
        if mode not in ("max", "min"):
            raise ValueError(f"objective {name}:{mode} must be max or min")
        objectives[name] = mode
    if "top1" not in objectives or "latency_ms" not in objectives:
        raise ValueError("objectives must include top1 and latency_ms (gmacs may be a third)")
    return objectives


def build_parser():
    p = doc_parser(__doc__)
    add_job_arguments(p)
    p.add_argument("--out", default="runs/pareto", metavar="DIR|URI", help="tables, plots, cards, MLflow and Ray "
                   "results: a directory (shared by every node on a cluster) or an s3://, gs:// URI "
                   "(default: %(default)s)")
    p.add_argument("--shared-out", action="store_true", help="confirm that every node of the cluster mounts the "
                   "local --out directory (needed when the autoscaler can add nodes and --out is not a network mount)")
    p.add_argument("--optuna-storage", metavar="URL", help="Optuna study database (default: SQLite on the driver's "
                   "local disk: in --out when it is local, else in the cache; never on NFS/EFS)")
    p.add_argument("--cluster-config", metavar="YAML", help="the autoscaler's cluster config, to size trials from "
                   "what the cluster can hold (default: ~/ray_bootstrap_config.yaml when `ray up` left it here)")
    p.add_argument("--trials", type=positive_int, help=f"trials to start (default: {DEFAULT_TRIALS}, "
                   f"{DEFAULT_TRIALS_FULL_BUDGET} with --scheduler none, smoke: {SMOKE_TRIALS})")
    p.add_argument("--concurrent", type=positive_int, help="trials at once (default: what the cluster can hold, "
                   "its autoscaler's node types included)")
    p.add_argument("--sampler", default="tpe", choices=SAMPLERS,
                   help="Optuna multi-objective sampler; gp is Optuna's GPSampler (default: %(default)s)")
    p.add_argument("--scheduler", default="moasha", choices=("moasha", "none"),
                   help="early stopping: moasha stops a trial at a rung unless it is in the top 1/eta of the "
                        "trials that reached that rung by Pareto rank; none trains every trial to the end "
                        "(default: %(default)s)")
    p.add_argument("--grace", type=positive_int, default=DEFAULT_GRACE,
                   help="epochs before the first rung (default: %(default)s)")
    p.add_argument("--eta", type=finite_float, default=DEFAULT_ETA,
                   help="reduction factor: rungs at grace * eta^k epochs, 1/eta of a rung goes on (default: %(default)s)")
    p.add_argument("--objectives", default="top1:max,latency_ms:min",
                   help="comma list of top1, latency_ms, gmacs with :max/:min (default: %(default)s)")
    p.add_argument("--reducers", default="tsm", help="token reducers competing on the front: any of tsm,drop,merge")
    p.add_argument("--max-latency-ms", type=finite_float, help="latency budget: slower trials are infeasible")
    p.add_argument("--min-top1", type=finite_float, help="accuracy floor (%%): less accurate trials are infeasible")
    p.add_argument("--no-warm-start", action="store_true", help="skip the paper's configurations as first trials")
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite in --out)")
    p.add_argument("--name", default=None, help="sweep name (default: pareto-<preset>); reuse with --resume")
    p.add_argument("--resume", action="store_true", help="continue the sweep of this --out/--name")
    p.add_argument("--export", default="front", help="cards to write: front | knee | budget:<ms> (default: front)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    p.add_argument("--latency", default="model", choices=("model", "measure"),
                   help="trials' latency: predicted from a per-device latency table built once per sweep (model), "
                        "or timed end to end per trial while no trial on that node trains (measure); the front is "
                        "confirmed by measurement either way (default: %(default)s)")
    p.add_argument("--latency-resource", metavar="NAME", help="time latency on the node advertising this Ray "
                   "resource (e.g. inference_cpu, cluster.yaml's serving node; node:<ip> for one node); default: "
                   "this node's CPU, or a GPU with --speed-device cuda")
    p.add_argument("--latency-table-dir", metavar="DIR", help="where latency tables are kept (default: the serving "
                   "node's cache, ~/.cache/sit-pareto/latency; shared storage lets every sweep reuse them)")
    return p


@dataclasses.dataclass
class Plan:
    """Everything the sweep needs, validated before anything is written or Ray starts."""

    job: DistillJob
    name: str
    out: str
    tracking_uri: str
    trials: int
    concurrent: Optional[int]      # None: what the cluster can hold (decided once Ray runs)
    sampler: str
    objectives: dict
    reducers: tuple
    constraints: Constraints
    warm_start: bool
    resume: bool
    export: str
    seed: int
    workers: int
    gpu: bool
    cpus_per_worker: Optional[float]
    address: Optional[str]
    latency: str = "model"         # model | measure (see --latency)
    latency_resource: Optional[str] = None
    latency_table_dir: Optional[str] = None
    smoke: bool = False            # a short latency-table protocol: mechanics, not numbers
    scheduler: str = "moasha"
    grace: int = DEFAULT_GRACE
    eta: float = DEFAULT_ETA
    local_dir: str = ""            # the driver's local files (SQLite, tables, cards), published to `out`
    optuna_url: Optional[str] = None
    shared_out: bool = False
    cluster_config: Optional[str] = None

    @property
    def storage(self) -> str:
        return storage.join(self.out, "ray")

    @property
    def optuna_storage(self) -> str:
        return self.optuna_url or f"sqlite:///{os.path.join(self.local_dir, 'optuna.db')}"

    @property
    def max_latency_ms(self):
        return self.constraints.max_latency_ms

    @property
    def min_top1(self):
        return self.constraints.min_top1

    def record(self) -> dict:
        """The sweep's settings as plain JSON: what an export or a resume reads back."""
        return {"name": self.name, "tracking_uri": self.tracking_uri, "objectives": self.objectives,
                "reducers": list(self.reducers), "max_latency_ms": self.max_latency_ms, "min_top1": self.min_top1,
                "trials": self.trials, "sampler": self.sampler, "seed": self.seed, "preset": self.job.name,
                "latency": self.latency, "latency_resource": self.latency_resource,
                "scheduler": self.scheduler, "grace": self.grace, "eta": self.eta, "concurrent": self.concurrent,
                "base_job": self.job.to_dict()}


def make_plan(args) -> Plan:
    from sweeps import tracking

    job = job_from_args(args)
    if args.print_config:
        return Plan(job, "", "", "", 0, 1, "", {}, (), Constraints(), False, False, "", 0, 1, False, None, None)
    validate_job(job)
    SearchSpace.for_job(job, reducers=_reducers(args.reducers))  # every reducer must serve the model
    trials = args.trials or (SMOKE_TRIALS if args.smoke_test else
                             DEFAULT_TRIALS if args.scheduler == "moasha" else DEFAULT_TRIALS_FULL_BUDGET)
    if args.cpus_per_worker is not None and not args.cpus_per_worker > 0:
        raise ValueError(f"--cpus-per-worker {args.cpus_per_worker} must be > 0")
    if args.max_latency_ms is not None and not args.max_latency_ms > 0:
        raise ValueError(f"--max-latency-ms {args.max_latency_ms} must be > 0")
    if args.min_top1 is not None and not 0 <= args.min_top1 <= 100:
        raise ValueError(f"--min-top1 {args.min_top1} must be a percentage in 0..100")
    if args.latency_resource is not None and not args.latency_resource.strip():
        raise ValueError("--latency-resource needs the name of a Ray resource, e.g. inference_cpu")
    table_dir = storage.local_path(args.latency_table_dir) if args.latency_table_dir else None
    if args.latency_table_dir and table_dir is None:
        raise ValueError(f"--latency-table-dir {args.latency_table_dir}: a directory every node mounts (e.g. "
                         "/mnt/shared/latency-tables), not a URI: the serving node reads and writes it as files")
    local = args.address is None and not os.environ.get("RAY_ADDRESS")
    if job.speed.device == "cuda" and args.latency_resource is None and local:
        import torch
        if not torch.cuda.is_available():
            raise ValueError("--speed-device cuda: this machine has no CUDA device (on a cluster, pass --address "
                             "or --latency-resource of a GPU node)")
    if not args.eta > 1:
        raise ValueError(f"--eta {args.eta:g} must be > 1")
    if args.scheduler == "moasha":
        from sweeps.moasha import rung_steps
        if not rung_steps(args.grace, args.eta, job.train.epochs):
            raise ValueError(f"--grace {args.grace} leaves no rung below the {job.train.epochs} training epochs: "
                             "lower it, raise --epochs, or pass --scheduler none")
    reducers = _reducers(args.reducers)
    if args.export not in ("front", "knee") and not args.export.startswith("budget:"):
        raise ValueError(f"--export {args.export!r} must be front, knee or budget:<ms>")
    if args.export.startswith("budget:"):
        try:
            budget = finite_float(args.export.split(":", 1)[1])
        except Exception:  # noqa: BLE001  (argparse's type error: same message below)
            budget = float("nan")
        if not budget > 0:
            raise ValueError(f"--export {args.export!r}: the budget must be a latency in ms > 0, e.g. budget:12.5")
    out = storage.normalise(args.out)
    name = args.name or f"pareto-{job.name}{'-smoke' if args.smoke_test else ''}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        # it names a directory, a Tune experiment and an MLflow tag matched in filters (no quotes)
        raise ValueError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    found = storage.exists(storage.join(out, "ray", name))
    resume = args.resume
    if resume and not found:
        if not storage.exists(storage.join(out, "ray")):
            raise ValueError(f"nothing to resume: no sweep {name!r} in {out}")
        # killed before the sweep's first save (e.g. while its teacher trained): start it; the
        # teacher's training resumes from its own checkpoints there
        print(f"resume: sweep {name!r} saved nothing in {out} yet: starting it")
        resume = False
    if not resume and found:
        raise ValueError(f"sweep {name!r} already exists in {out}: pass --resume to continue it, "
                         "or choose another --name/--out")
    optuna_url = storage.check_sqlite_url(args.optuna_storage) if args.optuna_storage else None
    if args.cluster_config and not os.path.isfile(os.path.expanduser(args.cluster_config)):
        raise ValueError(f"--cluster-config {args.cluster_config} does not exist")
    local_dir = storage.staging_dir(out, name)
    return Plan(job=job, name=name, out=out, tracking_uri=tracking.resolve_tracking_uri(args.tracking_uri, local_dir),
                trials=trials, concurrent=args.concurrent, sampler=args.sampler,
                objectives=parse_objectives(args.objectives), reducers=reducers,
                constraints=Constraints(args.max_latency_ms, args.min_top1), warm_start=not args.no_warm_start,
                resume=resume, export=args.export, seed=args.seed, workers=args.workers, gpu=args.gpu,
                cpus_per_worker=args.cpus_per_worker, address=args.address, latency=args.latency,
                latency_resource=args.latency_resource, smoke=args.smoke_test,
                latency_table_dir=os.path.abspath(os.path.expanduser(table_dir)) if table_dir else None,
                scheduler=args.scheduler, grace=args.grace, eta=args.eta, local_dir=local_dir, optuna_url=optuna_url,
                shared_out=args.shared_out, cluster_config=args.cluster_config)


def _reducers(text: str) -> tuple:
    reducers = tuple(r.strip() for r in text.split(",") if r.strip())
    if not reducers or any(r not in REDUCERS for r in reducers):
        raise ValueError(f"--reducers {text!r}: choose from {', '.join(REDUCERS)}")
    return reducers


def main(argv=None) -> int:
    p = build_parser()
    args, plan = parse_or_exit(p, make_plan, argv)
    if args.print_config:
        print(job_yaml(plan.job), end="")
        return 0
    from sweeps import out_guard
    from sweeps.sweep import run_sweep
    try:
        return run_sweep(plan)
    except out_guard.OutUnusable as e:
        print(out_guard.advice(str(e)), file=sys.stderr)
        return out_guard.EXIT_CODE
    except ValueError as e:  # what only the running cluster can tell (e.g. trials that cannot fit)
        p.exit(2, f"{p.prog}: error: {e}\n")
    except Exception as e:  # a disk that filled or turned read-only where the guard did not look
        what = out_guard.disk_error(e)
        if what is None:
            raise
        print(out_guard.advice(what), file=sys.stderr)
        return out_guard.EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
