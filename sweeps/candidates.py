"""A recorded table of trained candidates: what the replay benchmark replays sweeps against.

One row per candidate (a point of the sweep's search space, trained to its full budget once): its
parameters, validation top-1 after every epoch (`top1_e1..`), the seconds each epoch took
(`epoch_s_e1..`, training + evaluation), the rest of its trial's wall time (`setup_s`: latency,
start-up, reports), its latency (`latency_ms` as the sweep used it, `latency_measured_ms`,
`latency_model_ms`), MACs and status. A JSON file beside the CSV (`<table>.json`) holds the search
space, the warm-start points, the reference point's inputs and the command that made the table.

What a replayed trial gets for the point a sampler proposes (`CandidateTable.oracle`):
- `nearest`: the recorded candidate nearest to it (same reducer and stage count first, then
  Euclidean distance on the parameters scaled to [0, 1], log scale where the space samples in log
  scale), replayed as recorded, divergence included. Purely tabular; in a space of ~12 parameters
  a few hundred candidates are sparse, so the proposed point only loosely decides what is replayed.
- `surrogate`: Gaussian-process regressions fitted on the recorded candidates (scikit-learn, one
  per epoch's top-1, per epoch time and latency; anisotropic RBF kernel, so parameters that do not
  matter get long length scales): a smooth model that answers every parameter of the proposal.
  Predictions are the posterior means (deterministic); failures are not modelled.
`synthetic_table` makes a table with a known structure, to develop and test the replay without a
recording.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Sequence


import numpy as np
import optuna
import pandas as pd

from search_spaces import SearchSpace

PARAMS = ("reducer", "n_stages", "pos_1", "pos_2", "pos_3", "keep_1", "keep_2", "keep_3",
          "lambda_token", "lambda_logits", "tau", "lr")
LATENCY_COLUMNS = ("latency_ms", "latency_measured_ms", "latency_model_ms")


def top1_col(epoch: int) -> str:
    return f"top1_e{epoch}"


def epoch_s_col(epoch: int) -> str:
    return f"epoch_s_e{epoch}"


@dataclasses.dataclass
class CandidateTable:
    frame: pd.DataFrame
    meta: dict

    def __post_init__(self):
        self.meta = json.loads(json.dumps(self.meta, default=str))  # as it reads back from its JSON file

    @classmethod
    def read(cls, path: str | Path) -> "CandidateTable":
        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise ValueError(f"{path}: a candidate table needs the CSV and its {meta_path.name} beside it")
        return cls(pd.read_csv(path), json.loads(meta_path.read_text()))

    def write(self, path: str | Path) -> Path:
        from sit_core.files import atomic_write_text

        path = Path(path)
        atomic_write_text(path, self.frame.to_csv(index=False, float_format="%.6g"))
        atomic_write_text(path.with_suffix(".json"), json.dumps(self.meta, indent=1, default=str, allow_nan=False) + "\n")
        return path

    # ------------------------------------------------------------------ what the replay needs
    @property
    def epochs(self) -> int:
        return int(self.meta["epochs"])

    @property
    def space(self) -> SearchSpace:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in self.meta["space"].items()}
        return SearchSpace(**fields)

    @property
    def warm_starts(self) -> list[dict]:
        return list(self.meta.get("warm_starts", []))

    def reference(self, latency_col: str) -> dict:
        """Chance accuracy and the teacher's latency in the same column's terms (else the slowest
        candidate's): the sweep's own reference point."""
        teacher = (self.meta.get("teacher") or {}).get(latency_col)
        slowest = float(pd.to_numeric(self.frame[latency_col], errors="coerce").max())
        return {"top1": 100.0 / float(self.meta["num_classes"]),
                "latency_ms": float(teacher) if teacher is not None else slowest}

    def oracle(self, kind: str = "nearest"):
        if kind == "nearest":
            return NearestOracle(self)
        if kind == "surrogate":
            return SurrogateOracle(self)
        raise ValueError(f"oracle {kind!r} is not one of nearest, surrogate")

    def lookup(self, point: dict) -> int:
        """Row index of the recorded candidate nearest to `point` (ties: the first row)."""
        if not hasattr(self, "_encoded"):
            self._encoded = np.stack([self._encode(row) for row in self.frame[list(PARAMS)].to_dict("records")])
            self._groups = np.array([self._group(row) for row in self.frame[list(PARAMS)].to_dict("records")])
        query = self._encode(point)
        distance = ((self._encoded - query) ** 2).sum(axis=1) + 1e6 * (self._groups != self._group(point))
        return int(np.argmin(distance))

    @staticmethod
    def _group(point: dict) -> str:
        return f"{point['reducer']}/{int(point['n_stages'])}"

    def features(self, point: dict) -> np.ndarray:
        """The encoding with the stage count as one-hot columns (the surrogate's inputs)."""
        stages = np.zeros(self.space.stages)
        stages[int(point["n_stages"]) - 1] = 1.0
        reducers = np.array([float(point["reducer"] == r) for r in self.space.reducers])
        return np.concatenate([self._encode(point), stages, reducers])

    def _encode(self, point: dict) -> np.ndarray:
        s = self.space
        n = int(point["n_stages"])

        def unit(value, low, high, log=False):
            if log:
                value, low, high = math.log(value), math.log(low), math.log(high)
            return (value - low) / (high - low) if high > low else 0.0

        out = []
        for i in range(1, s.stages + 1):
            present = i <= n
            out.append(unit(float(point[f"pos_{i}"]), 1, s.depth - 1) if present else 0.0)
            out.append(unit(float(point[f"keep_{i}"]), s.min_keep, s.keep[1]) if present else 0.0)
        out += [unit(float(point["lambda_token"]), *s.lambda_token, log=True),
                unit(float(point["lambda_logits"]), *s.lambda_logits, log=True),
                unit(float(point["tau"]), *s.tau), unit(float(point["lr"]), *s.lr, log=True)]
        return np.array(out)


@dataclasses.dataclass
class Outcome:
    """What one replayed trial does: top-1 after each epoch (NaN from a diverged epoch on), the
    seconds of each epoch, the seconds outside epochs, its latency, the recorded candidate used."""

    top1: np.ndarray
    epoch_s: np.ndarray
    setup_s: float
    latency_ms: float
    candidate: int


class NearestOracle:
    def __init__(self, table: CandidateTable):
        self.table, f, k = table, table.frame, table.epochs
        self.top1 = f[[top1_col(e) for e in range(1, k + 1)]].to_numpy(float, copy=True)
        self.top1[f["status"].ne("ok").to_numpy()] = np.nan
        self.epoch_s = f[[epoch_s_col(e) for e in range(1, k + 1)]].to_numpy(float)
        self.setup_s = pd.to_numeric(f["setup_s"], errors="coerce").fillna(0.0).to_numpy(float)

    def final(self, points: Sequence[dict], latency_col: str) -> tuple[np.ndarray, np.ndarray]:
        """(full-budget top-1, latency) of every outcome this oracle can give: the recorded
        candidates (any point maps to one of them; `points` add nothing)."""
        f = self.table.frame
        return self.top1[:, -1], pd.to_numeric(f[latency_col], errors="coerce").to_numpy(float)

    def __call__(self, point: dict, latency_col: str) -> Outcome:
        row = self.table.lookup(point)
        return Outcome(self.top1[row], self.epoch_s[row], float(self.setup_s[row]),
                       float(self.table.frame[latency_col].iloc[row]), int(self.table.frame["candidate"].iloc[row]))


class SurrogateOracle:
    """Posterior means of GP regressions on the successful candidates (inputs: `features`): one
    per epoch's top-1, one for the epoch time, one per latency column asked for; the setup time is
    the recorded median (it does not depend on the candidate)."""

    def __init__(self, table: CandidateTable, seed: int = 0):
        self.table, self.seed = table, seed
        self.ok = table.frame[table.frame["status"].eq("ok")]
        self.x = np.stack([table.features(p) for p in self.ok[list(PARAMS)].to_dict("records")])
        k = table.epochs
        self.models = {top1_col(e): self._fit(self.ok[top1_col(e)]) for e in range(1, k + 1)}
        self.models["epoch_s"] = self._fit(self.ok[[epoch_s_col(e) for e in range(1, k + 1)]].mean(axis=1))
        self.setup_s = float(pd.to_numeric(self.ok["setup_s"], errors="coerce").median())

    def _fit(self, y):
        import warnings
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
        from threadpoolctl import threadpool_limits

        kernel = ConstantKernel() * RBF(length_scale=np.ones(self.x.shape[1]), length_scale_bounds=(1e-2, 1e3)) \
            + WhiteKernel(noise_level_bounds=(1e-6, 1e1))
        gp = GaussianProcessRegressor(kernel, normalize_y=True, random_state=self.seed)
        with threadpool_limits(1), warnings.catch_warnings():  # one BLAS thread: small matrices, shared cores
            warnings.simplefilter("ignore", ConvergenceWarning)  # length scales at the bound = irrelevant inputs
            return gp.fit(self.x, np.asarray(y, dtype=float))

    def final(self, points: Sequence[dict], latency_col: str) -> tuple[np.ndarray, np.ndarray]:
        """(full-budget top-1, latency) the surrogate answers for `points`, in one batch."""
        if latency_col not in self.models:
            self.models[latency_col] = self._fit(self.ok[latency_col])
        x = np.stack([self.table.features(p) for p in points])
        return self.models[top1_col(self.table.epochs)].predict(x), self.models[latency_col].predict(x)

    def __call__(self, point: dict, latency_col: str) -> Outcome:
        if latency_col not in self.models:
            self.models[latency_col] = self._fit(self.ok[latency_col])
        x = self.table.features(point)[None, :]
        k = self.table.epochs

        def predict(name):
            return float(self.models[name].predict(x)[0])

        epoch_s = max(0.0, predict("epoch_s"))
        return Outcome(np.array([predict(top1_col(e)) for e in range(1, k + 1)]), np.full(k, epoch_s),
                       self.setup_s, predict(latency_col), -1)


def sample_points(space: SearchSpace, n: int, seed: int) -> list[dict]:
    """`n` points of the space drawn by Optuna's RandomSampler (the define-by-run space itself)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    points = []
    for _ in range(n):
        trial = study.ask()
        space(trial)
        points.append(dict(trial.params))
        study.tell(trial, 0.0)
    return points


def synthetic_table(n: int = 80, *, seed: int = 0, epochs: int = 4, depth: int = 6, num_patches: int = 49,
                    lr_best: float = 1.1e-3, lr_penalty: float = 400.0) -> CandidateTable:
    """A made-up table with a known structure (for developing and testing the replay, never for
    claims): accuracy falls with the tokens dropped and with the distance of log10(lr) from
    log10(lr_best) (`lr_penalty` points per squared decade: a narrow good band, so a sampler that
    models where good points lie, such as TPE, beats random search), latency grows with the tokens
    kept, accuracy rises over epochs with ranks mostly kept (so early stopping can work), a few
    candidates diverge (replayed by the nearest oracle only)."""
    rng = np.random.default_rng(seed)
    space = SearchSpace(depth, num_patches)
    rows = []
    for i, p in enumerate(sample_points(space, n, seed)):
        kept = _kept_fraction(p, depth, num_patches)
        final = 88 - 30 * (1 - kept) ** 1.5 - lr_penalty * (math.log10(p["lr"]) - math.log10(lr_best)) ** 2 \
            - 1.5 * abs(math.log(p["lambda_token"] / 2)) + rng.normal(0, 0.4)
        final = max(final, 12.0 + rng.random())  # no worse than about chance
        speed = 0.6 + 0.4 * rng.random()
        curve = [10 + (final - 10) * (1 - 0.5 ** (k * speed)) / (1 - 0.5 ** (epochs * speed)) + rng.normal(0, 0.3)
                 for k in range(1, epochs + 1)]
        failed = p["lr"] > 2.3e-3 and p["lambda_logits"] > 2.0
        row = {"candidate": i, **{k: p.get(k, np.nan) for k in PARAMS}, "status": "failed" if failed else "ok",
               "latency_ms": 2.0 + 10.0 * kept, "gmacs": 0.004 + 0.03 * kept, "setup_s": 3.0,
               "test_top1": np.nan if failed else curve[-1]}
        for k in range(1, epochs + 1):
            row[top1_col(k)] = np.nan if failed else curve[k - 1]  # a diverged run has no accuracy
            row[epoch_s_col(k)] = 8.0 * (0.4 + 0.6 * kept) + 1.0
        row["latency_measured_ms"], row["latency_model_ms"] = row["latency_ms"], row["latency_ms"]
        rows.append(row)
    meta = {"preset": "synthetic", "epochs": epochs, "num_classes": 10, "space": dataclasses.asdict(space),
            "teacher": {c: 12.0 for c in LATENCY_COLUMNS}, "warm_starts": [], "concurrent": 2,
            "command": f"synthetic_table(n={n}, seed={seed}, epochs={epochs})"}
    return CandidateTable(pd.DataFrame(rows), meta)


def _kept_fraction(point: dict, depth: int, num_patches: int) -> float:
    """Mean over blocks of the tokens each block sees, as a fraction of the full count."""
    n, tokens, total = int(point["n_stages"]), float(num_patches), 0.0
    cuts = {int(point[f"pos_{i}"]): float(point[f"keep_{i}"]) for i in range(1, n + 1)}
    for block in range(1, depth + 1):
        total += tokens
        if block in cuts:
            tokens *= cuts[block]
    return total / (depth * num_patches)
