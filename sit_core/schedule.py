"""Slimming schedules: after which blocks a token reducer runs, and how many tokens each keeps.

In the spirit of ToMe's `parse_r`, `keep` is one ratio for every stage or one per stage.
Positions are 1-indexed block numbers: (3, 6, 9) means "after the 3rd, 6th and 9th block".
Token counts are cumulative: stage i keeps int(N0 * keep_1 * ... * keep_i) patch tokens,
which gives SPEC's 196 -> 98 -> 49 -> 24 for keep 0.5 at 224 px.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence, Union

REDUCERS = ("tsm", "drop", "merge", "none")
# int() of a float product can land just under an integer (0.7 * 0.7 * 100 = 48.999...).
_EPS = 1e-6


@dataclass(frozen=True)
class SlimSchedule:
    """Where token reducers run and what they keep. Validated on construction."""

    positions: tuple[int, ...] = ()  # 1-indexed blocks after which a reducer runs, increasing
    keep: tuple[float, ...] = ()     # keep ratio of each stage, in (0, 1]
    reducer: str = "tsm"             # tsm | drop | merge | none
    fuse_dropped: bool = field(default=False)  # drop only: fuse dropped tokens into one (EViT)

    def __post_init__(self):
        positions = tuple(int(p) for p in self.positions)
        keep = _as_tuple(self.keep)
        if len(keep) == 1 and len(positions) > 1:
            keep = keep * len(positions)
        object.__setattr__(self, "positions", positions)
        object.__setattr__(self, "keep", keep)
        if self.reducer not in REDUCERS:
            raise ValueError(f"reducer={self.reducer!r} is not one of {', '.join(REDUCERS)}")
        if self.fuse_dropped and self.reducer != "drop":
            raise ValueError(f"fuse_dropped=True needs reducer='drop', got reducer={self.reducer!r}")
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
        for r in keep:
            if not (0.0 < r <= 1.0) or math.isnan(r):
                raise ValueError(f"keep ratio {r} is out of range: must be in (0, 1]")
        if self.reducer == "none" and positions:
            raise ValueError(f"reducer='none' takes no positions, got {positions}")

    @property
    def is_identity(self) -> bool:
        return self.reducer == "none" or not self.positions

    def validate_for(self, depth: int, num_patches: int) -> None:
        """Raise ValueError if this schedule cannot run on a model with `depth` blocks and `num_patches` tokens."""
        for p in self.positions:
            if not 1 <= p <= depth - 1:
                raise ValueError(
                    f"slimming position {p} is out of range for a {depth}-block model: "
                    f"valid positions are 1..{depth - 1} (a reducer after the last block would feed no block)"
                )
        counts = self.stage_tokens(num_patches)
        for p, n in zip(self.positions, counts[1:]):
            if n < 1:
                raise ValueError(
                    f"the reducer after block {p} would keep {n} of {num_patches} patch tokens: "
                    "at least 1 must be left; raise the keep ratios"
                )

    def stage_tokens(self, num_patches: int) -> list[int]:
        """Patch-token count of each stage: [N0, after 1st reducer, after 2nd, ...]."""
        counts, frac = [num_patches], 1.0
        for r in self.keep:
            frac *= r
            counts.append(int(num_patches * frac + _EPS))
        return counts

    def block_tokens(self, depth: int, num_patches: int) -> list[int]:
        """Patch-token count ENTERING each of the `depth` blocks (index 0 = block 1)."""
        counts = self.stage_tokens(num_patches)
        stage, out = 0, []
        for block in range(1, depth + 1):
            out.append(counts[stage])
            if stage < len(self.positions) and block == self.positions[stage]:
                stage += 1
        return out

    def to_dict(self) -> dict:
        d = {"positions": list(self.positions), "keep": list(self.keep), "reducer": self.reducer}
        if self.fuse_dropped:
            d["fuse_dropped"] = True
        return d

    def __str__(self) -> str:
        if self.is_identity:
            return "none"
        return f"{self.reducer}:{','.join(map(str, self.positions))}@{','.join(f'{k:g}' for k in self.keep)}"

    @classmethod
    def parse(cls, text: str, reducer: str | None = None) -> "SlimSchedule":
        """Parse the CLI form `3,6,9@0.7` or `3,6,9@0.7,0.6,0.5`, optionally prefixed `drop:`."""
        text = text.strip()
        if text in ("", "none"):
            return cls(reducer="none")
        if ":" in text:
            reducer, text = text.split(":", 1)
        if "@" not in text:
            raise ValueError(f"schedule {text!r} must look like '3,6,9@0.7' (positions@keep ratios)")
        pos, keep = text.split("@", 1)
        try:
            positions = tuple(int(p) for p in pos.split(",") if p.strip())
            ratios = tuple(float(k) for k in keep.split(",") if k.strip())
        except ValueError:
            raise ValueError(f"schedule {text!r} must look like '3,6,9@0.7' (integers@floats)") from None
        return cls(positions, ratios, reducer or "tsm")


ScheduleLike = Union[SlimSchedule, dict, str, None]


def as_schedule(spec: ScheduleLike = None, *, positions: Sequence[int] | None = None,
                keep: float | Sequence[float] | None = None, reducer: str | None = None,
                fuse_dropped: bool | None = None, default: SlimSchedule | None = None) -> SlimSchedule:
    """One schedule from any accepted form; keyword fields override `spec`, which overrides `default`."""
    base = default or SlimSchedule(reducer="none")
    if isinstance(spec, SlimSchedule):
        base = spec
    elif isinstance(spec, str):
        base = SlimSchedule.parse(spec)
    elif isinstance(spec, dict):
        unknown = set(spec) - {"positions", "keep", "reducer", "fuse_dropped"}
        if unknown:
            raise ValueError(f"unknown schedule fields {sorted(unknown)}: valid are positions, keep, reducer, fuse_dropped")
        base = SlimSchedule(**{**base.to_dict(), **spec})
    elif spec is not None:
        raise ValueError(f"schedule must be a SlimSchedule, dict or 'positions@keep' string, got {type(spec).__name__}")
    fields = base.to_dict()
    if reducer == "none":
        return SlimSchedule(reducer="none")
    if positions is not None:
        fields["positions"] = list(positions)
        if keep is None and len(set(fields["keep"])) <= 1:  # a uniform ratio carries to new positions
            fields["keep"] = fields["keep"][:1]
    if keep is not None:
        fields["keep"] = keep
    if reducer is not None:
        fields["reducer"] = reducer
        if reducer != "drop":
            fields.pop("fuse_dropped", None)
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
