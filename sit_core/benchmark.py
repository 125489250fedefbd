"""Measured speed vs FLOPs-predicted speed of SiT and its peers on DeiT, in one process.

    python -m sit_core.benchmark                  # the target setting: fp32, batch 64
    python -m sit_core.benchmark --quick          # smoke check, batch 8, well under a minute
    python -m sit_core.benchmark --threads 8 --csv results/deit_speed.csv

Builds DeiT-S (timm's own, the baseline), its slimmed versions at one schedule (TSMs / top-k drop /
merging at blocks 3, 6, 9 keeping 0.7: docs/method.md "Peers"; drop and merge reduce before their
block's MLP, so they spend a few % fewer MACs than the TSMs), DeiT-T and SiT-DeiT-T, all with
random weights (speed does not depend on them), and times them interleaved round-robin with
sit_core.speed.compare. Prints GMACs, params, img/s, measured speedup, FLOPs-predicted speedup
and their ratio; the TSMs' share of SiT-DeiT-S's forward time; the protocol; and whether the
target holds: SiT-DeiT-S vs DeiT-S, fp32, batch 64, measured speedup >= 0.9 x FLOPs-predicted.

Limits: numbers are only as quiet as the machine. The default run does ~40 forwards of each
model at batch 64 (minutes on a small CPU). Ratios within this run are the result; absolute
img/s compare across runs only on the same device, threads and versions (see the protocol line).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

BATCH = 64             # the target's batch size
WARMUP = 3             # discarded forwards per model per round
ITERS = 10             # timed forwards per model per round
ROUNDS = 3             # round-robin rounds: drift lands on every model alike
QUICK = dict(batch=8, warmup=1, iters=2, rounds=1)
IMG_SIZE = 224
TARGET_EFFICIENCY = 0.9  # measured speedup must reach this fraction of the FLOPs-predicted one
TARGET_MODEL, TARGET_BASELINE = "SiT-DeiT-S", "DeiT-S"

# label -> (timm name, create_model kwargs, baseline label)
MODELS: dict[str, tuple[str, dict, str]] = {
    "DeiT-S": ("deit_small_patch16_224", {}, "DeiT-S"),
    "SiT-DeiT-S": ("sit_deit_small", {}, "DeiT-S"),
    "Drop-DeiT-S": ("sit_deit_small", {"reducer": "drop"}, "DeiT-S"),
    "Merge-DeiT-S": ("sit_deit_small", {"reducer": "merge"}, "DeiT-S"),
    "DeiT-T": ("deit_tiny_patch16_224", {}, "DeiT-T"),
    "SiT-DeiT-T": ("sit_deit_tiny", {}, "DeiT-T"),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sit_core.benchmark",
        description=(
            "In ONE process on this machine, compare DeiT-S with its TSM (SiT), top-k drop and "
            "merge versions at one schedule (blocks 3, 6, 9 keep 0.7), plus "
            "DeiT-T and SiT-DeiT-T. Prints GMACs, params, img/s, measured speedup, FLOPs-predicted "
            "speedup and their ratio, the TSMs' share of SiT-DeiT-S forward time, the protocol "
            "(device, dtype, batch, threads, versions, warm-up/iters) and whether the target holds: "
            f"SiT-DeiT-S vs DeiT-S at fp32, batch {BATCH}: measured speedup >= "
            f"{TARGET_EFFICIENCY} x FLOPs-predicted. Random weights; ratios within one run are the result."
        ),
    )
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch size (default {BATCH}; --quick: {QUICK['batch']})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"discarded forwards per model per round (default {WARMUP}; --quick: {QUICK['warmup']})")
    p.add_argument("--iters", type=int, default=None,
                   help=f"timed forwards per model per round (default {ITERS}; --quick: {QUICK['iters']})")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"round-robin rounds over all models (default {ROUNDS}; --quick: {QUICK['rounds']})")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="float32 (default) runs plain; bfloat16 / float16 run under autocast (AMP)")
    p.add_argument("--quick", action="store_true",
                   help="smoke check (seconds, numbers meaningless): small batch, few iterations; "
                        "explicit flags still win")
    p.add_argument("--csv", default=None, help="also write the table plus the protocol fields to this CSV")
    p.add_argument("--check", action="store_true", help="exit with status 1 if the target does not hold")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else dict(batch=BATCH, warmup=WARMUP, iters=ITERS, rounds=ROUNDS)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def build_models() -> tuple[dict[str, torch.nn.Module], list[str]]:
    """The benchmark's models, plus notes on any that could not be built (skipped, not fatal)."""
    import timm

    import sit_core  # noqa: F401  (registers the sit_* models with timm)

    models, notes = {}, []
    for label, (name, kwargs, _) in MODELS.items():
        torch.manual_seed(0)  # same random weights every run: drop/merge choices stay the same
        try:
            models[label] = timm.create_model(name, pretrained=False, **kwargs)
        except Exception as e:  # a missing registration should not hide the other rows
            notes.append(f"skipped {label} ({name}, {kwargs}): {type(e).__name__}: {e}")
    return models, notes


def speed_table(models: dict, records: dict, baseline_of: dict, img_size: int):
    """One row per model: MACs, params, img/s, p50, measured speed-up over its baseline, the speed-up its
    MACs predict, and their ratio (`efficiency`: 1.0 when every MAC saved became speed)."""
    import pandas as pd

    from sit_core.flops import count_macs, count_params
    from sit_core.speed import speedup

    macs = {n: count_macs(m, img_size) for n, m in models.items()}
    rows = []
    for n in models:
        base = baseline_of[n]
        measured, predicted = speedup(records, n, base), macs[base] / macs[n]
        rows.append({"name": n, "baseline": base, "params_m": count_params(models[n]) / 1e6, "gmacs": macs[n] / 1e9,
                     "img_s": records[n].img_s, "p50_ms": records[n].p50_ms, "p90_ms": records[n].p90_ms,
                     "speedup": measured, "flops_speedup": predicted, "efficiency": measured / predicted})
    return pd.DataFrame(rows)


def format_table(df) -> str:
    cols = ["name", "gmacs", "params_m", "img_s", "p50_ms", "speedup", "flops_speedup", "efficiency", "baseline"]
    out = df[cols]
    out = out.rename(columns={
        "name": "model", "gmacs": "GMACs", "params_m": "params(M)", "img_s": "img/s", "p50_ms": "p50 ms",
        "speedup": "speedup", "flops_speedup": "FLOPs-pred", "efficiency": "ratio", "baseline": "vs",
    })
    return out.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def target_line(df, *, batch: int, dtype: str) -> tuple[str, bool | None]:
    """The target verdict: True / False, or None when the target models are missing."""
    rows = df.set_index("name")
    if TARGET_MODEL not in rows.index or rows.loc[TARGET_MODEL, "baseline"] != TARGET_BASELINE:
        return f"Target: not evaluated ({TARGET_MODEL} or {TARGET_BASELINE} missing)", None
    r = rows.loc[TARGET_MODEL]
    need = TARGET_EFFICIENCY * r["flops_speedup"]
    holds = bool(r["speedup"] >= need)
    line = (f"Target ({TARGET_MODEL} vs {TARGET_BASELINE}, fp32, batch {BATCH}): measured speedup "
            f"{r['speedup']:.3f}x vs required {TARGET_EFFICIENCY} x {r['flops_speedup']:.3f}x = {need:.3f}x "
            f"(ratio {r['efficiency']:.3f}) -> {'HOLDS' if holds else 'DOES NOT HOLD'}")
    if batch != BATCH or dtype != "float32":
        line += f"  [this run: {dtype}, batch {batch}: indicative only, not the target setting]"
    return line, holds


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from sit_core.flops import count_macs, module_macs
    from sit_core.slimming import TokenSlimming
    from sit_core.speed import compare, module_time_share

    dtype = getattr(torch, args.dtype)
    models, notes = build_models()
    for note in notes:
        print(note, file=sys.stderr)
    baseline_of = {label: MODELS[label][2] for label in models}
    baseline_of = {k: v for k, v in baseline_of.items() if v in models}
    models = {k: m for k, m in models.items() if k in baseline_of}  # no baseline, no ratio
    if TARGET_BASELINE not in models:
        print(f"cannot run: baseline {TARGET_BASELINE} missing", file=sys.stderr)
        return 2

    records = compare(models, batch_size=args.batch, img_size=IMG_SIZE, device=args.device, dtype=dtype,
                      warmup=args.warmup, iters=args.iters, rounds=args.rounds, threads=args.threads)
    df = speed_table(models, records, baseline_of, IMG_SIZE)
    print(format_table(df))
    print("speedup = img/s over the 'vs' model's, measured; FLOPs-pred = its MACs / this model's MACs; "
          "ratio = speedup / FLOPs-pred (1.0: every MAC saved became speed)")

    if TARGET_MODEL in models:
        sit = models[TARGET_MODEL]
        share = module_time_share(sit, TokenSlimming, batch_size=args.batch, img_size=IMG_SIZE,
                                  device=args.device, dtype=dtype, warmup=args.warmup,
                                  iters=max(2, args.iters // 2), threads=args.threads)
        mac_share = module_macs(sit, TokenSlimming, IMG_SIZE) / count_macs(sit, IMG_SIZE)
        print(f"TSM share of {TARGET_MODEL} forward: {share:.1%} of wall time (hook-timed), "
              f"{mac_share:.1%} of MACs")

    print("Protocol:", records[TARGET_BASELINE].protocol())
    line, holds = target_line(df, batch=args.batch, dtype=args.dtype)
    print(line)

    if args.csv:
        import pandas as pd

        proto = pd.DataFrame([records[n].to_dict() for n in df["name"]])
        proto = proto.drop(columns=["img_s", "p50_ms", "p90_ms"])  # already in the table
        pd.concat([df.reset_index(drop=True), proto], axis=1).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return 1 if args.check and holds is not True else 0


if __name__ == "__main__":
    sys.exit(main())
