"""Slimming schedules: which blocks reduce tokens and how many each keeps, plus the paper's schedules.

Two forms, one type (`SlimSchedule`):
  * positions@keep (SiT's form, `3,6,9@0.7`): the 1-indexed blocks whose OUTPUT carries fewer tokens,
    and a keep ratio per stage (one for all, or one per position, as in ToMe's `parse_r`).
    A TSM runs after the block; drop (EViT) and merge (ToMe) reduce inside it, between its
    attention and its MLP, as their papers do. Either way block p+1 is the first to see fewer tokens.
    Token counts are cumulative: stage i keeps int(N0 * keep_1 * ... * keep_i) patch tokens
    (docs/method.md's 196 -> 98 -> 49 -> 24 for keep 0.5 at 224 px), the same count for every reducer.
  * r per block (ToMe's own form, `merge:r13`): every block merges min(r, n // 2) of its n patch tokens
    (ToMe's cap: one bipartite round removes at most half). Merge only.

`PAPER_SCHEDULES` is the one table of the published schedules; `scaled_to_depth` moves one to a
model of another depth (warm starts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence, Union

REDUCERS = ("tsm", "drop", "merge", "none")
IN_BLOCK_REDUCERS = ("drop", "merge")  # reduce between a block's attention and its MLP
# int() of a float product can land just under an integer (0.7 * 0.7 * 100 = 48.999...).
_EPS = 1e-6


@dataclass(frozen=True)
class SlimSchedule:
    """Where token reducers run and what they keep. Validated on construction."""

    positions: tuple[int, ...] = ()  # 1-indexed blocks whose output is reduced, increasing
    keep: tuple[float, ...] = ()     # keep ratio of each stage, in (0, 1]
    reducer: str = "tsm"             # tsm | drop | merge | none
    fuse_dropped: bool = field(default=False)  # drop only: fuse dropped tokens into one (EViT)
    r: int = 0                       # merge only: ToMe's own schedule, r tokens merged in EVERY block

    def __post_init__(self):
        positions = tuple(int(p) for p in self.positions)
        keep = _as_tuple(self.keep)
        if len(keep) == 1 and len(positions) > 1:
            keep = keep * len(positions)
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "r", int(self.r))
        if self.reducer not in REDUCERS:
            raise ValueError(f"reducer={self.reducer!r} is not one of {', '.join(REDUCERS)}")
        if self.fuse_dropped and self.reducer != "drop":
            raise ValueError(f"fuse_dropped=True needs reducer='drop', got reducer={self.reducer!r}")
        if self.r < 0:
            raise ValueError(f"r={self.r} is out of range: ToMe's r (tokens merged per block) must be >= 0")
        if self.r and self.reducer != "merge":
            raise ValueError(f"r={self.r} (tokens merged in every block) needs reducer='merge', got {self.reducer!r}")
        if self.r and (positions or keep):
            raise ValueError(f"give either r={self.r} (ToMe's per-block schedule) or positions@keep, not both")
        if len(keep) != len(positions):
            raise ValueError(
                f"keep has {len(keep)} ratios for {len(positions)} positions {positions}: "
                "give one ratio for all stages or one per position"
            )
        for p in positions:
            if p < 1:
                raise ValueError(f"slimming position {p} is out of range: positions are 1-indexed blocks, >= 1")
        for a, b in zip(positions, positions[1:]):
            if b <= a:
                raise ValueError(
                    f"slimming positions {positions} must be strictly increasing (found {a} then {b})"
                )
        for k in keep:
            if not (0.0 < k <= 1.0) or math.isnan(k):
                raise ValueError(f"keep ratio {k} is out of range: must be in (0, 1]")
        if self.reducer == "none" and positions:
            raise ValueError(f"reducer='none' takes no positions, got {positions}")

    @property
    def is_identity(self) -> bool:
        return self.reducer == "none" or (not self.positions and not self.r)

    @property
    def per_block(self) -> bool:
        """True for ToMe's own form (r tokens in every block) rather than positions@keep."""
        return self.r > 0

    @property
    def in_block(self) -> bool:
        """True when the reducer runs between a block's attention and its MLP (drop, merge)."""
        return self.reducer in IN_BLOCK_REDUCERS

    def reducing_blocks(self, depth: int) -> tuple[int, ...]:
        """1-indexed blocks whose output carries fewer tokens."""
        if self.is_identity:
            return ()
        return tuple(range(1, depth + 1)) if self.per_block else self.positions

    def validate_for(self, depth: int, num_patches: int) -> None:
        """Raise ValueError if this schedule cannot run on a model with `depth` blocks and `num_patches` tokens."""
        last = depth if self.in_block else depth - 1
        for p in self.positions:
            if not 1 <= p <= last:
                why = ("a reducer inside the last block still thins its MLP" if self.in_block
                       else "a reducer after the last block would feed no block")
                raise ValueError(
                    f"slimming position {p} is out of range for a {depth}-block model: "
                    f"valid positions are 1..{last} ({why})"
                )
        if self.per_block:
            return
        least = 2 if self.fuse_dropped else 1
        for p, n in zip(self.positions, self.stage_tokens(num_patches)[1:]):
            if n < least:
                raise ValueError(
                    f"the reducer in block {p} would keep {n} of {num_patches} patch tokens: at least {least} "
                    f"must be left{' (one kept, one fused)' if self.fuse_dropped else ''}; raise the keep ratios"
                )

    def stage_tokens(self, num_patches: int) -> list[int]:
        """Patch-token count of each stage: [N0, after 1st reducer, after 2nd, ...] (positions@keep form)."""
        if self.per_block:
            raise ValueError(f"{self} has no stages (r tokens merge in every block): use block_tokens(depth, num_patches)")
        counts, frac = [num_patches], 1.0
        for k in self.keep:
            frac *= k
            counts.append(int(num_patches * frac + _EPS))
        return counts

    def block_out_tokens(self, depth: int, num_patches: int) -> list[int]:
        """Patch-token count LEAVING each of the `depth` blocks (index 0 = block 1)."""
        out, n = [], num_patches
        if self.per_block:
            for _ in range(depth):
                n -= min(self.r, n // 2)  # ToMe's cap: (t - protected) // 2 with the prefix protected
                out.append(n)
            return out
        counts, stage = self.stage_tokens(num_patches), 0
        for block in range(1, depth + 1):
            if stage < len(self.positions) and block == self.positions[stage]:
                stage += 1
            out.append(counts[stage])
        return out

    def block_tokens(self, depth: int, num_patches: int) -> list[int]:
        """Patch-token count ENTERING each of the `depth` blocks (index 0 = block 1)."""
        return [num_patches] + self.block_out_tokens(depth, num_patches)[:-1]

    def scaled_to_depth(self, depth: int, from_depth: int) -> "SlimSchedule":
        """The same schedule moved from a `from_depth`-block model to a `depth`-block one.

        Position p becomes floor(p * depth / from_depth), clamped into the valid range (DeiT's 3, 6, 9
        of 12 -> 1/4, 1/2, 3/4 of the depth); positions that collide merge into one stage (first keep
        ratio kept). A per-block r schedule is depth-free and returns unchanged.
        """
        if self.per_block or self.is_identity:
            return self
        last = depth if self.in_block else depth - 1
        if last < 1:
            raise ValueError(f"a {depth}-block model has no valid slimming position")
        positions, keep = [], []
        for p, k in zip(self.positions, self.keep):
            q = min(max(1, p * depth // from_depth), last)
            if positions and q <= positions[-1]:
                if positions[-1] >= last:
                    continue
                q = positions[-1] + 1
            positions.append(q)
            keep.append(k)
        return SlimSchedule(tuple(positions), tuple(keep), self.reducer, self.fuse_dropped)

    def describe(self) -> str:
        """A label saying which method this schedule is, and whether it is the method's own form."""
        where = f"blocks {','.join(map(str, self.positions))}, keep {','.join(f'{k:g}' for k in self.keep)}"
        if self.is_identity:
            return "no token reduction"
        if self.reducer == "tsm":
            return f"SiT TSM after {where}"
        if self.reducer == "drop":
            return f"EViT top-k drop inside {where}{', dropped tokens fused' if self.fuse_dropped else ''}"
        if self.per_block:
            return f"ToMe merging, r={self.r} in every block (ToMe's own schedule)"
        return f"ToMe merging inside {where} (SiT-position adaptation of ToMe)"

    def to_dict(self) -> dict:
        d = {"positions": list(self.positions), "keep": list(self.keep), "reducer": self.reducer}
        if self.fuse_dropped:
            d["fuse_dropped"] = True
        if self.r:
            d["r"] = self.r
        return d

    def __str__(self) -> str:
        if self.is_identity:
            return "none"
        if self.per_block:
            return f"{self.reducer}:r{self.r}"
        text = f"{self.reducer}:{','.join(map(str, self.positions))}@{','.join(f'{k:g}' for k in self.keep)}"
        return text + ("+fuse" if self.fuse_dropped else "")

    @classmethod
    def parse(cls, text: str, reducer: str | None = None) -> "SlimSchedule":
        """Parse the CLI forms `3,6,9@0.7`, `3,6,9@0.7,0.6,0.5`, `drop:4,7,10@0.7+fuse`, `merge:r13`.

        A `reducer:` prefix is optional (default tsm; `r13` alone means merge).
        """
        text = text.strip()
        if text in ("", "none"):
            return cls(reducer="none")
        if ":" in text:
            reducer, text = text.split(":", 1)
        fuse = text.endswith("+fuse")
        text = text.removesuffix("+fuse")
        if text.startswith("r") and "@" not in text:
            if not text[1:].isdigit():
                raise ValueError(f"schedule {text!r} must look like 'merge:r13' (tokens merged per block)")
            return cls(reducer=reducer or "merge", r=int(text[1:]))
        if "@" not in text:
            raise ValueError(f"schedule {text!r} must look like '3,6,9@0.7' (positions@keep ratios) or 'merge:r13'")
        pos, keep = text.split("@", 1)
        try:
            positions = tuple(int(p) for p in pos.split(",") if p.strip())
            ratios = tuple(float(k) for k in keep.split(",") if k.strip())
        except ValueError:
            raise ValueError(f"schedule {text!r} must look like '3,6,9@0.7' (integers@floats)") from None
        return cls(positions, ratios, reducer or "tsm", fuse_dropped=fuse)


ScheduleLike = Union[SlimSchedule, dict, str, None]
_FIELDS = ("positions", "keep", "reducer", "fuse_dropped", "r")


def as_schedule(spec: ScheduleLike = None, *, positions: Sequence[int] | None = None,
                keep: float | Sequence[float] | None = None, reducer: str | None = None,
                fuse_dropped: bool | None = None, r: int | None = None,
                default: SlimSchedule | None = None) -> SlimSchedule:
    """One schedule from any accepted form; keyword fields override `spec`, which overrides `default`."""
    base = default or SlimSchedule(reducer="none")
    if isinstance(spec, SlimSchedule):
        base = spec
    elif isinstance(spec, str):
        base = SlimSchedule.parse(spec)
    elif isinstance(spec, dict):
        unknown = set(spec) - set(_FIELDS)
        if unknown:
            raise ValueError(f"unknown schedule fields {sorted(unknown)}: valid are {', '.join(_FIELDS)}")
        fields = {**base.to_dict(), **spec}
        if "r" in spec and spec["r"]:
            fields.update(positions=[], keep=[])
        elif "positions" in spec:
            fields.pop("r", None)
        base = SlimSchedule(**fields)
    elif spec is not None:
        raise ValueError(f"schedule must be a SlimSchedule, dict or 'positions@keep' string, got {type(spec).__name__}")
    fields = base.to_dict()
    if reducer == "none":
        return SlimSchedule(reducer="none")
    if positions is not None:
        fields["positions"] = list(positions)
        fields.pop("r", None)
        if keep is None and len(set(fields["keep"])) <= 1:  # a uniform ratio carries to new positions
            fields["keep"] = fields["keep"][:1]
    if keep is not None:
        fields["keep"] = keep
    if r is not None:
        fields.update(r=r, positions=[], keep=[], reducer=reducer or "merge")
    if reducer is not None:
        fields["reducer"] = reducer
        if reducer != "drop":
            fields.pop("fuse_dropped", None)
        if reducer != "merge":
            fields.pop("r", None)
    if fuse_dropped is not None:
        fields["fuse_dropped"] = fuse_dropped
    if fields["reducer"] == "none" and fields["positions"]:
        fields["reducer"] = "tsm"
    return SlimSchedule(**fields)


def _as_tuple(keep) -> tuple[float, ...]:
    if isinstance(keep, (int, float)):
        return (float(keep),)
    try:
        return tuple(float(k) for k in keep)
    except (TypeError, ValueError):
        raise ValueError(f"keep must be a ratio or a list of ratios, got {keep!r}") from None


# --------------------------------------------------------------------------------------------------
# The paper's schedules: the one place they are written down.

@dataclass(frozen=True)
class PaperSchedule:
    """One published configuration: the backbone it runs on, its schedule, and where it comes from."""

    backbone: str           # timm name of the unslimmed backbone (the teacher)
    depth: int              # that backbone's block count (what `scaled_to` scales from)
    schedule: SlimSchedule
    source: str             # the paper / code the numbers come from

    def scaled_to(self, depth: int) -> SlimSchedule:
        """This schedule on a `depth`-block model (see SlimSchedule.scaled_to_depth)."""
        return self.schedule.scaled_to_depth(depth, self.depth)


def _sit(backbone: str, depth: int, after: tuple[int, ...], stage_blocks: str) -> PaperSchedule:
    return PaperSchedule(backbone, depth, SlimSchedule(after, 0.5),
                         f"SiT (ECCV 2022) LV-ViT row, official stage_blocks {stage_blocks}: TSM closes every stage but the last")


PAPER_SCHEDULES: dict[str, PaperSchedule] = {
    # docs/method.md "Backbones": the FLOP-matched DeiT-S schedule the peers are compared at.
    "deit_flop_matched": PaperSchedule("deit_small_patch16_224", 12, SlimSchedule((3, 6, 9), 0.7),
                                       "docs/method.md: FLOP-matched DeiT-S schedule used by the peers (TSMs after 3, 6, 9)"),
    # table in docs/method.md: the SiT students on LV-ViT (XS and S share the LV-ViT-S teacher).
    "sit_lvvit_tiny": _sit("lvvit_tiny", 14, (1, 2, 3), "1,1,1,11"),
    "sit_lvvit_xsmall": _sit("lvvit_small", 16, (1, 2, 3), "1,1,1,13"),
    "sit_lvvit_small": _sit("lvvit_small", 16, (9, 12, 14), "9,3,2,2"),
    "sit_lvvit_medium": _sit("lvvit_medium", 20, (10, 14, 17), "10,4,3,3"),
    "sit_lvvit_large": _sit("lvvit_large", 24, (10, 14, 17), "10,4,3,7"),
    # EViT on DeiT-S: drop_loc (3, 6, 9) 0-indexed = blocks 4, 7, 10, keep 0.7, inattentive tokens fused.
    "evit_deit_small": PaperSchedule("deit_small_patch16_224", 12,
                                     SlimSchedule((4, 7, 10), 0.7, "drop", fuse_dropped=True),
                                     "EViT (ICLR 2022): --drop_loc '(3, 6, 9)' --base_keep_rate 0.7 --fuse_token"),
    # ToMe on DeiT-S: r = 13 tokens merged in every block (79.4% at ~2.7 GMACs in the ToMe paper).
    "tome_deit_small": PaperSchedule("deit_small_patch16_224", 12, SlimSchedule(reducer="merge", r=13),
                                     "ToMe (ICLR 2023): r=13 per block on DeiT-S, off the shelf"),
}

SIT_LVVIT_VARIANTS = ("tiny", "xsmall", "small", "medium", "large")  # PAPER_SCHEDULES[f"sit_lvvit_{v}"]


def paper_schedule(name: str) -> SlimSchedule:
    """The schedule of the PAPER_SCHEDULES row `name`."""
    if name not in PAPER_SCHEDULES:
        raise ValueError(f"unknown paper schedule {name!r}: choose one of {', '.join(PAPER_SCHEDULES)}")
    return PAPER_SCHEDULES[name].schedule
