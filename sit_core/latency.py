"""A per-device latency model of a slimmed ViT: parts measured once on the serving device, any
schedule predicted in microseconds.

    latency = stem + sum over blocks of [attention half(n_in) + reducer(n_in -> n_out) + MLP half]
              + head(n_last) + offset

A block is timed as its two residual halves (how `patch.py` cuts it for drop and merge): the
attention half at the tokens entering, the MLP half at the tokens leaving an in-block reducer
(drop, merge) or entering a TSM block, the TSM after the block. Blocks after a merge time their
attention with ToMe's proportional-attention bias (`attn_prop`). Each part is a lookup table over
a grid of token counts (every count up to DENSE_UP_TO, GRID_POINTS spread over larger models),
reducers over (tokens in, keep ratio); queries between grid points are interpolated linearly.
`offset` is what a whole forward costs beyond its parts (dispatch, weights gone cold between
blocks, the allocator's state), the same for every candidate of the backbone: the median, over a
few whole models (the teacher and one FLOP-matched schedule per reducer), of their end-to-end time
minus the sum of their parts. Those whole models are timed end to end the way the sweep confirms
its front (`measure_models`: interleaved with each other, never with hundreds of small parts,
which leave the caches and the allocator in a state no real forward sees).

Every part is timed with `speed.interleaved`: all parts in `Protocol.rounds` rounds, rotated, medians.
Tables are keyed by a fingerprint (device, threads or GPU, batch, dtype, torch/timm versions,
backbone, input size, protocol) and stored as JSON under `files.cache_dir("latency")` (or a
directory on shared storage); `ensure_table` reuses a matching table and rebuilds, with a
warning, one whose fingerprint does not match or whose file is corrupt or partial.

Limits: blocks must all be alike and split at the MLP (timm's Block, LV-ViT's); in-block reducers
are timed on random attention statistics (their cost depends on shapes, not values).
"""
from __future__ import annotations

import functools
import json
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import timm
import torch
from torch import nn

from .config import ModelSpec, SpeedSpec, stable_hash
from .files import atomic_write_text, cache_dir
from .patch import BlockHalves, SlimPoint, _splits_at_mlp, model_geometry
from .peers import AttentionStats, BipartiteMerge, TokenSizes, TopKDrop
from .schedule import PAPER_SCHEDULES, ScheduleLike, as_schedule
from .slimming import TokenSlimming
from .speed import (SpeedRecord, as_device, autocast, bench_setup, compare, device_name, interleaved, node_threads,
                    random_input)

FORMAT = "sit-latency/2"
DENSE_UP_TO = 64           # token grids hold every count up to this many patch tokens
GRID_POINTS = 17           # ... and this many counts spread over 1..N beyond it
REDUCER_POINTS = 9         # tokens-in grid of the reducer tables
KEEP_GRID = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # reducer tables: tokens out / in
REDUCERS = ("tsm", "drop", "drop+fuse", "merge")
PathLike = Union[str, Path]


@dataclass(frozen=True)
class Protocol:
    """How a table's entries are timed (`speed.interleaved`); part of the fingerprint."""

    warmup: int = 2          # discarded calls per entry before the first round
    rounds: int = 15         # interleaved rounds over every entry; medians over all rounds
    # One timed call per entry per round: a layer inside a model runs once between other layers, and
    # a second call in a row finds its data in cache (measured: parts then sum to ~20% below the whole).
    iters: int = 1


QUICK = Protocol(warmup=1, rounds=3)  # smoke runs and tests: mechanics, not numbers


class LatencyTableWarning(UserWarning):
    """A stored table could not be used (fingerprint mismatch, corrupt or partial file): rebuilt."""


def reducer_kind(schedule: ScheduleLike) -> Optional[str]:
    """The table part a schedule's reducer needs: tsm | drop | drop+fuse | merge, None for a plain ViT."""
    s = as_schedule(schedule)
    if s.is_identity:
        return None
    return "drop+fuse" if s.fuse_dropped else s.reducer


def token_grid(num_patches: int, points: int = GRID_POINTS, dense_up_to: int = DENSE_UP_TO) -> list[int]:
    """Every count 1..num_patches up to `dense_up_to` patches, else `points` counts spread evenly over them."""
    if num_patches <= dense_up_to:
        return list(range(1, num_patches + 1))
    return sorted({int(round(v)) for v in np.linspace(1, num_patches, points)})


def _out_tokens(n_in: int, keep: float, kind: str) -> int:
    return max(2 if kind == "drop+fuse" else 1, min(n_in, int(n_in * keep + 1e-6)))


@functools.lru_cache(maxsize=64)
def _input_shape(backbone: str, kwargs_json: str) -> tuple[int, tuple[int, int]]:
    with torch.device("meta"):  # shapes only
        model = ModelSpec(backbone, json.loads(kwargs_json)).build_teacher(pretrained=False)
    conv = next(m for m in model.patch_embed.modules() if isinstance(m, nn.Conv2d))
    return conv.in_channels, tuple(int(v) for v in model.patch_embed.img_size)


def input_shape(spec: ModelSpec) -> tuple[int, tuple[int, int]]:
    """(in_chans, (height, width)) the backbone takes."""
    return _input_shape(spec.backbone, json.dumps(spec.kwargs, sort_keys=True, default=str))


def serving_threads(speed: SpeedSpec) -> Optional[int]:
    """CPU threads latency is timed with on this node (the spec's, else every core); None on a GPU."""
    return None if speed.device == "cuda" else (speed.threads or node_threads())


def fingerprint(spec: ModelSpec, speed: SpeedSpec, threads: Optional[int] = None,
                protocol: Protocol = Protocol()) -> dict:
    """What a table's numbers depend on. Computed where the table is built and used (the serving node)."""
    device = as_device(speed.device)
    in_chans, img = input_shape(spec)
    return {
        "format": FORMAT, "device": device.type, "device_name": device_name(device),
        "threads": threads or serving_threads(speed), "cuda": torch.version.cuda if device.type == "cuda" else None,
        "batch_size": speed.batch_size, "dtype": speed.dtype, "torch": torch.__version__, "timm": timm.__version__,
        "backbone": spec.backbone, "kwargs": json.loads(json.dumps(spec.kwargs, sort_keys=True, default=str)),
        "img_size": list(img), "in_chans": in_chans, "geometry": list(spec.geometry()),
        "protocol": {**asdict(protocol), "dense_up_to": DENSE_UP_TO, "grid_points": GRID_POINTS,
                     "reducer_points": REDUCER_POINTS, "keeps": list(KEEP_GRID)},
    }


def table_path(fp: Mapping, directory: Optional[PathLike] = None) -> Path:
    root = Path(directory) if directory is not None else cache_dir("latency")
    return root / f"{fp['backbone']}-b{fp['batch_size']}-{fp['dtype']}-{fp['device']}-{stable_hash(fp)}.json"


def parts_needed(reducers: Sequence[str]) -> set[str]:
    unknown = [r for r in reducers if r not in REDUCERS and r != "none"]
    if unknown:
        raise ValueError(f"reducers {unknown}: the latency model knows {', '.join(REDUCERS)}")
    kinds = {r for r in reducers if r != "none"}
    return {"calibration", "stem", "head", "attn", "mlp", *kinds} | ({"attn_prop"} if "merge" in kinds else set())


def calibration_schedules(depth: int, kinds: Sequence[str]) -> list[str]:
    """The whole models the offset is measured on: the teacher and, per reducer, the FLOP-matched DeiT-S
    schedule (blocks 3, 6, 9 of 12, keep 0.7) moved to this depth."""
    base = PAPER_SCHEDULES["deit_flop_matched"]
    out = ["none"]
    for kind in kinds:
        reducer = "drop" if kind == "drop+fuse" else kind
        s = as_schedule(base.schedule, reducer=reducer, fuse_dropped=kind == "drop+fuse").scaled_to_depth(depth, base.depth)
        out.append(str(s))
    return out


# ------------------------------------------------------------------------------------------- the table

@dataclass
class LatencyTable:
    """Medians (ms per batch) of every part over its grid, and how and where they were measured."""

    fingerprint: dict
    parts: dict            # part -> {"ms": ..., "iqr_ms": ...} (+ "n" grid, + "keep" grid for reducers)
    protocol: str
    build_s: float
    path: Optional[str] = field(default=None, compare=False)

    @property
    def reducers(self) -> tuple[str, ...]:
        return tuple(r for r in REDUCERS if r in self.parts)

    @property
    def offset_ms(self) -> float:
        """Median over the calibration models of (measured end to end - the sum of their parts)."""
        c = self.parts["calibration"]
        return float(np.median([ms - sum(self._parts(as_schedule(s)).values()) for s, ms in zip(c["schedules"], c["ms"])]))

    @property
    def teacher_ms(self) -> float:
        """The teacher as measured end to end while the table was built."""
        c = self.parts["calibration"]
        return c["ms"][c["schedules"].index("none")]

    def predict(self, schedule: ScheduleLike) -> float:
        """Predicted ms per batch of this backbone slimmed by `schedule`."""
        return self.breakdown(schedule)["total"]

    def predict_spec(self, spec: ModelSpec) -> float:
        if spec.backbone != self.fingerprint["backbone"] or fingerprint_kwargs(spec) != self.fingerprint["kwargs"]:
            raise ValueError(f"this latency table is for {self.fingerprint['backbone']} {self.fingerprint['kwargs']}, "
                             f"not {spec.backbone} {spec.kwargs}")
        return self.predict(spec.schedule)

    def breakdown(self, schedule: ScheduleLike) -> dict[str, float]:
        """{stem, blocks, reducers, head, offset, total} in ms per batch."""
        parts = self._parts(as_schedule(schedule))
        parts["offset"] = self.offset_ms
        parts["total"] = sum(parts.values())
        return parts

    def _parts(self, s) -> dict[str, float]:
        depth, num_patches, _, _ = self.fingerprint["geometry"]
        s.validate_for(depth, num_patches)
        kind = reducer_kind(s)
        if kind is not None and kind not in self.parts:
            raise ValueError(f"this latency table has no '{kind}' reducer (it has {', '.join(self.reducers) or 'none'}): "
                             f"build it with that reducer")
        n_in, n_out = s.block_tokens(depth, num_patches), s.block_out_tokens(depth, num_patches)
        reducing = set(s.reducing_blocks(depth))
        first = min(reducing, default=0)
        blocks = reducers = 0.0
        for i, (a, b) in enumerate(zip(n_in, n_out), start=1):
            blocks += self._1d("attn_prop" if kind == "merge" and i > first else "attn", a)
            blocks += self._1d("mlp", a if kind in (None, "tsm") else b)
            if i in reducing and (kind != "merge" or b < a):
                reducers += self._2d(kind, a, b)
        return {"stem": self.parts["stem"]["ms"], "blocks": blocks, "reducers": reducers,
                "head": self._1d("head", n_out[-1])}

    def _1d(self, part: str, n: int) -> float:
        p = self.parts[part]
        return float(np.interp(n, p["n"], p["ms"]))

    def _2d(self, part: str, n_in: int, n_out: int) -> float:
        p = self.parts[part]
        along_keep = [np.interp(n_out / n_in, p["keep"], row) for row in p["ms"]]
        return float(np.interp(n_in, p["n"], along_keep))

    def describe(self) -> str:
        fp = self.fingerprint
        where = f"{fp['threads']} threads" if fp["device"] == "cpu" else f"CUDA {fp['cuda']}"
        teacher = self.teacher_ms
        parts = sum(self._parts(as_schedule(None)).values())
        return (f"latency table for {fp['backbone']} ({', '.join(self.reducers) or 'no reducer'}), batch "
                f"{fp['batch_size']} {fp['dtype']} on {fp['device_name']} [{fp['device']}, {where}], built in "
                f"{self.build_s:.0f} s: teacher {teacher:.3f} ms end to end, {parts:.3f} ms in parts; offset "
                f"{self.offset_ms:+.3f} ms (median over {len(self.parts['calibration']['ms'])} whole models)")

    def to_dict(self) -> dict:
        return {"format": FORMAT, "fingerprint": self.fingerprint, "protocol": self.protocol, "build_s": self.build_s,
                "parts": self.parts}

    @classmethod
    def from_dict(cls, d: Mapping, path: Optional[str] = None) -> "LatencyTable":
        """Raises ValueError saying what is wrong with a table that cannot be trusted whole."""
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise ValueError(f"format is {d.get('format') if isinstance(d, Mapping) else type(d).__name__!r}, "
                             f"expected {FORMAT!r}")
        for key in ("fingerprint", "parts", "protocol", "build_s"):
            if key not in d:
                raise ValueError(f"field {key!r} is missing")
        parts = d["parts"]
        for name, p in parts.items():
            _check_part(name, p)
        missing = {"calibration", "stem", "head", "attn", "mlp"} - set(parts)
        if missing:
            raise ValueError(f"parts {sorted(missing)} are missing")
        return cls(dict(d["fingerprint"]), dict(parts), str(d["protocol"]), float(d["build_s"]), path)

    def save(self, path: PathLike) -> Path:
        self.path = str(path)
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: PathLike) -> "LatencyTable":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read it ({type(e).__name__}: {e})") from None
        return cls.from_dict(d, str(path))


def fingerprint_kwargs(spec: ModelSpec) -> dict:
    return json.loads(json.dumps(spec.kwargs, sort_keys=True, default=str))


def _check_part(name: str, p) -> None:
    def positive(values) -> bool:
        a = np.asarray(values, dtype=float)
        return a.size > 0 and bool(np.isfinite(a).all() and (a > 0).all())

    try:
        if name == "stem":
            ok = positive([p["ms"]])
        elif name == "calibration":
            ok = (positive(p["ms"]) and len(p["ms"]) == len(p["schedules"]) and "none" in p["schedules"]
                  and all(isinstance(x, str) for x in p["schedules"]))
            for x in p["schedules"]:
                as_schedule(x)  # ValueError: not a schedule
        elif name in REDUCERS:
            ok = (positive(p["ms"]) and np.shape(p["ms"]) == (len(p["n"]), len(p["keep"]))
                  and sorted(p["n"]) == list(p["n"]) and sorted(p["keep"]) == list(p["keep"]))
        else:
            ok = positive(p["ms"]) and len(p["ms"]) == len(p["n"]) and sorted(p["n"]) == list(p["n"])
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"part {name!r} is incomplete or not a table of positive times")


# ------------------------------------------------------------------------------------------- building

class _ReplayedStats(AttentionStats):
    """q and k of one attention call, replayed on every call: a harness times the reducer alone."""

    def __init__(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor):
        self.attn, self.q, self.k, self.handle = attn, q, k, None

    def clear(self) -> None:
        pass


def _halves(block: nn.Module) -> tuple[Callable, Callable]:
    """The block's residual halves (LV-ViT's own, else timm Block's as patch.BlockHalves cuts them)."""
    cls = type(block)
    attn = getattr(cls, "attn_residual", BlockHalves.attn_residual)
    mlp = getattr(cls, "mlp_residual", BlockHalves.mlp_residual)
    return functools.partial(attn, block), functools.partial(mlp, block)


def _check_blocks(model: nn.Module) -> None:
    shapes = [[tuple(p.shape) for p in b.parameters()] for b in model.blocks]
    if any(type(b) is not type(model.blocks[0]) or s != shapes[0] for b, s in zip(model.blocks, shapes)):
        raise ValueError("the latency model needs blocks that are all alike (one block type and width)")
    if not _splits_at_mlp(model.blocks[0]):
        raise ValueError(f"the latency model times blocks as attention and MLP halves: {type(model.blocks[0]).__name__} "
                         "is not timm's Block or LV-ViT's; use end-to-end measurement (--latency measure)")


def _with_sizes(sizes: TokenSizes, size: torch.Tensor, fn: Callable, *args, bias_of=None) -> Callable:
    """A call that first restores the token sizes (a merge overwrites them) and, for attention, adds
    proportional attention's bias exactly as a block after a merge does."""
    def call():
        sizes.size = size
        if bias_of is not None:
            return fn(bias_of, attn_mask=sizes.attn_bias(bias_of))
        return fn(*args)
    return call


def build_table(spec: ModelSpec, speed: SpeedSpec, reducers: Sequence[str] = ("tsm",), *,
                threads: Optional[int] = None, protocol: Protocol = Protocol(),
                log: Callable[[str], None] = print) -> LatencyTable:
    """Measure every part of `spec`'s backbone on `speed.device` (see the module docstring)."""
    t0 = time.time()
    needed = parts_needed(reducers)
    kinds = [r for r in REDUCERS if r in needed]
    threads = threads or serving_threads(speed)
    device, dtype = as_device(speed.device), getattr(torch, speed.dtype)
    torch.manual_seed(0)
    teacher = spec.teacher().build()
    _check_blocks(teacher)
    depth, num_patches, prefix, dim = model_geometry(teacher)
    stem = spec.teacher().build()
    stem.blocks, stem.norm = nn.Sequential(), nn.Identity()
    block = teacher.blocks[0]
    attn_half, mlp_half = _halves(block)
    grid, rgrid = token_grid(num_patches), token_grid(num_patches, REDUCER_POINTS, dense_up_to=0)
    tsms = {(a, k): SlimPoint(TokenSlimming(dim, a, _out_tokens(a, k, "tsm")), prefix)
            for a in rgrid for k in KEEP_GRID} if "tsm" in kinds else {}
    in_chans, img_size = input_shape(spec)
    b = speed.batch_size

    with bench_setup([teacher, stem, *tsms.values()], device, threads) as used, torch.inference_mode():
        img = random_input(b, img_size, in_chans, device)
        x = {n: torch.randn(b, prefix + n, dim, device=device) for n in sorted(set(grid) | set(rgrid))}
        calls = {"stem": lambda: stem.forward_features(img)}
        for n in grid:
            calls[f"attn:{n}"] = functools.partial(attn_half, x[n])
            calls[f"mlp:{n}"] = functools.partial(mlp_half, x[n])
            calls[f"head:{n}"] = functools.partial(lambda t: teacher.forward_head(teacher.norm(t)), x[n])
        sizes = TokenSizes()
        sizes.active = True  # as inside a merging model's forward
        ones = {n: torch.ones(b, n, 1, device=device) for n in x}
        if "attn_prop" in needed:
            for n in grid:
                calls[f"attn_prop:{n}"] = _with_sizes(sizes, ones[n], attn_half, bias_of=x[n])
        qk = _attention_stats(block, {a: x[a] for a in rgrid}, device, dtype) if set(kinds) - {"tsm"} else {}
        for kind in kinds:
            for a in rgrid:
                for k in KEEP_GRID:
                    out = _out_tokens(a, k, kind)
                    if kind == "tsm":
                        calls[f"tsm:{a}:{k}"] = functools.partial(tsms[(a, k)], x[a])
                        continue
                    reducer = (BipartiteMerge(a, out, prefix) if kind == "merge"
                               else TopKDrop(a, out, fuse=kind == "drop+fuse"))
                    slim = SlimPoint(reducer, prefix, sizes=sizes if kind == "merge" else None)
                    slim._stats = _ReplayedStats(block.attn, *qk[a])
                    calls[f"{kind}:{a}:{k}"] = _with_sizes(sizes, ones[a], slim, x[a])
        log(f"latency table: timing {len(calls)} parts of {spec.backbone} ({', '.join(sorted(needed - {'calibration'}))}) "
            f"at batch {b} {speed.dtype} on {device_name(device)} [{device}{f', {used} threads' if device.type == 'cpu' else ''}]: "
            f"{protocol.rounds} interleaved rounds")
        samples = interleaved(calls, device=device, dtype=dtype, warmup=protocol.warmup, rounds=protocol.rounds,
                              iters=protocol.iters,
                              progress=lambda r, total: log(f"latency table: round {r}/{total} ({time.time() - t0:.0f} s)"))
    del tsms, x, ones, qk, calls  # the whole models below get the memory (and the caches) to themselves

    anchors = calibration_schedules(depth, kinds)
    log(f"latency table: the offset, on {len(anchors)} whole models end to end ({', '.join(anchors)}): "
        f"{protocol.rounds} interleaved rounds ({time.time() - t0:.0f} s)")
    whole = measure_models({a: spec.with_schedule(a) for a in anchors}, speed, rounds=protocol.rounds,
                           iters=protocol.iters, warmup=protocol.warmup, threads=threads)

    def stat(name: str) -> tuple[float, float]:
        ms = np.asarray(samples[name]) * 1e3
        q25, q50, q75 = np.percentile(ms, [25, 50, 75])
        return float(q50), float(q75 - q25)

    med, iqr = stat("stem")
    parts: dict = {"stem": {"ms": med, "iqr_ms": iqr},
                   "calibration": {"schedules": anchors, "ms": [whole[a].p50_ms for a in anchors],
                                   "iqr_ms": [whole[a].iqr_ms for a in anchors]}}
    for name in ("attn", "mlp", "head", "attn_prop"):
        if name in needed:
            cols = [stat(f"{name}:{n}") for n in grid]
            parts[name] = {"n": grid, "ms": [c[0] for c in cols], "iqr_ms": [c[1] for c in cols]}
    for kind in kinds:
        cells = [[stat(f"{kind}:{a}:{k}") for k in KEEP_GRID] for a in rgrid]
        parts[kind] = {"n": rgrid, "keep": list(KEEP_GRID), "ms": [[c[0] for c in row] for row in cells],
                       "iqr_ms": [[c[1] for c in row] for row in cells]}
    how = (f"{device_name(device)} [{device}], {speed.dtype}{'' if speed.dtype == 'float32' else ' (autocast)'}, "
           f"batch {b}, {used} threads, eval + inference_mode, random input; {len(samples)} parts, {protocol.warmup} "
           f"warm-up discarded each, then {protocol.rounds} rounds interleaved over all parts x {protocol.iters} timed, "
           f"median per part; offset from {len(anchors)} whole models timed end to end the same way, interleaved with "
           f"each other; torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}")
    table = LatencyTable(fingerprint(spec, speed, threads, protocol), parts, how, round(time.time() - t0, 1))
    log(f"latency table: built in {table.build_s:.0f} s")
    return table


def _attention_stats(block: nn.Module, xs: Mapping[int, torch.Tensor], device, dtype) -> dict:
    """(q, k) of the block's attention for each input, as the peers' hook takes them."""
    stats = AttentionStats(block.attn)
    out = {}
    try:
        with autocast(device, dtype):
            for n, x in xs.items():
                block.attn(block.norm1(x))
                out[n] = (stats.q, stats.k)
    finally:
        stats.handle.remove()
    return out


def ensure_table(spec: ModelSpec, speed: SpeedSpec, reducers: Sequence[str] = ("tsm",), *,
                 directory: Optional[PathLike] = None, threads: Optional[int] = None,
                 protocol: Protocol = Protocol(), log: Callable[[str], None] = print) -> LatencyTable:
    """The stored table for this backbone on this device if it matches, else a new one (saved).

    A table whose fingerprint differs from this device's, that is corrupt or partial, or that lacks a
    reducer asked for, is rebuilt (with a LatencyTableWarning for the first two) and never used as is.
    """
    threads = threads or serving_threads(speed)
    fp = fingerprint(spec, speed, threads, protocol)
    path = table_path(fp, directory)
    needed = parts_needed(reducers)
    if path.exists():
        try:
            table = LatencyTable.load(path)
        except ValueError as e:
            warnings.warn(f"latency table {path} is unusable ({e}): rebuilding it", LatencyTableWarning, stacklevel=2)
        else:
            if table.fingerprint != fp:
                diff = sorted(k for k in set(fp) | set(table.fingerprint) if fp.get(k) != table.fingerprint.get(k))
                warnings.warn(f"latency table {path} was measured for another setting (differs in {', '.join(diff)}): "
                              "rebuilding it", LatencyTableWarning, stacklevel=2)
            elif needed - set(table.parts):
                log(f"latency table {path} lacks {', '.join(sorted(needed - set(table.parts)))}: rebuilding it with "
                    "every part, so all are timed in the same rounds")
                needed |= set(table.parts)
            else:
                log(f"{table.describe()}; loaded from {path}")
                return table
    table = build_table(spec, speed, sorted(needed & set(REDUCERS)), threads=threads, protocol=protocol, log=log)
    table.save(path)
    log(f"{table.describe()}; saved to {path}")
    return table


# ------------------------------------------------------------------------------------------- measuring whole models

def measure_models(specs: Mapping[str, ModelSpec], speed: SpeedSpec, *, rounds: Optional[int] = None,
                   iters: int = 1, warmup: Optional[int] = None,
                   threads: Optional[int] = None) -> dict[str, SpeedRecord]:
    """Every model built (random weights: speed does not depend on them) and timed end to end,
    interleaved (`speed.compare`): `rounds` rounds (default: the spec's iterations) of `iters` timed
    forwards each, after `warmup` (default: the spec's) discarded forwards per model."""
    shapes = {input_shape(s) for s in specs.values()}
    if len(shapes) != 1:
        raise ValueError(f"models to compare must take one input shape, got {sorted(shapes)}")
    (in_chans, img_size), = shapes
    models = {}
    for name, s in specs.items():
        torch.manual_seed(0)
        models[name] = s.build().eval()
    return compare(models, batch_size=speed.batch_size, img_size=img_size, in_chans=in_chans, device=speed.device,
                   dtype=getattr(torch, speed.dtype), warmup=speed.warmup if warmup is None else warmup,
                   iters=iters, rounds=rounds or speed.iters, threads=threads or serving_threads(speed))
