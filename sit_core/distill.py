"""Everything that exists only for training: the distillation wrapper and student-from-teacher.

`FRDDistiller(student, teacher)` holds the student, the frozen teacher and one RTSM per block from
the first reducing block on (docs/method.md "RTSM"); its forward returns what `FRDLoss` needs. Per-block
tokens come from timm's own `forward_intermediates` (NLC, before the final norm, prefix tokens
split off), which follows the slimmed token counts: at a TSM block it yields the TSM's output, so
block -> TSM -> RTSM is compared with the teacher's block output and every TSM trains as the
encoder of a TSM/RTSM auto-encoder. The inference model the registry returns never contains an
RTSM, a tap or a teacher.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import timm
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from .patch import model_geometry, slim_schedule, tokens_leaving_block
from .slimming import ReverseTokenSlimming, TokenSlimming


class FRDOutput(NamedTuple):  # NamedTuple: DDP walks tuples when it looks for output tensors
    student_logits: torch.Tensor
    student_tokens: list  # per block, (B, N, C): recovered by that block's RTSM from the first reducing block on
    teacher_logits: torch.Tensor
    teacher_tokens: list  # per block, (B, N, C): raw block outputs, patch tokens only


class FRDDistiller(nn.Module):
    """Student + frozen teacher + RTSMs. Only the student's and RTSMs' parameters train."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        s_geo, t_geo = model_geometry(student), model_geometry(teacher)
        if s_geo != t_geo:
            raise ValueError(f"student (depth, patches, prefix, dim)={s_geo} does not match teacher {t_geo}")
        if not slim_schedule(teacher).is_identity:
            raise ValueError("the teacher must be the plain backbone, without token reducers")
        depth, num_patches, _, dim = s_geo
        self.student, self.teacher = student, teacher.requires_grad_(False).eval()
        reducing = slim_schedule(student).reducing_blocks(depth)
        leaving = tokens_leaving_block(student)
        like = next(student.parameters())
        # One RTSM per block from the first reducing block on, that block included (official SiT:
        # rtsm[i] maps the tokens LEAVING block i, after its TSM, back to all patches).
        self.rtsm = nn.ModuleDict({
            str(i): ReverseTokenSlimming(dim, leaving[i - 1], num_patches).to(like.device, like.dtype)
            for i in range(reducing[0] if reducing else depth + 1, depth + 1)
        })

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: no dropout, no BatchNorm statistics updates
        return self

    def forward(self, x: torch.Tensor) -> FRDOutput:
        with torch.no_grad():
            teacher_logits, teacher_tokens = _logits_and_block_tokens(self.teacher, x)
        student_logits, student_tokens = _logits_and_block_tokens(self.student, x)
        student_tokens = [self.rtsm[str(i)](t) if str(i) in self.rtsm else t
                          for i, t in enumerate(student_tokens, start=1)]
        return FRDOutput(student_logits, student_tokens, teacher_logits, teacher_tokens)

    def param_groups(self, lr: float, weight_decay: float, rtsm_lr_mult: float = 5.0) -> list[dict]:
        """AdamW groups as the official SiT recipe (its `get_param_groups`).

        - `student_decay` / `student_no_decay` at `lr`: timm's split (no decay for biases, norms and
          the model's `no_weight_decay()`: pos_embed, cls_token, ...), except the TSM scale, which
          the official code decays (its shape there is (1, 1, 1), so its 1-D rule misses it);
        - `rtsm` at `lr * rtsm_lr_mult`: ALL RTSM parameters, weight-decayed.
        """
        skip = set(getattr(self.student, "no_weight_decay", set)())
        scales = {id(m.scale) for m in self.student.modules() if isinstance(m, TokenSlimming)}
        decay, no_decay = [], []
        for group in param_groups_weight_decay(self.student, weight_decay, no_weight_decay_list=skip):
            for p in group["params"]:
                (decay if group["weight_decay"] or id(p) in scales else no_decay).append(p)
        groups = [("student_decay", decay, lr, weight_decay), ("student_no_decay", no_decay, lr, 0.0),
                  ("rtsm", list(self.rtsm.parameters()), lr * rtsm_lr_mult, weight_decay)]
        return [{"params": params, "lr": group_lr, "weight_decay": wd, "name": name}
                for name, params, group_lr, wd in groups if params]


def _logits_and_block_tokens(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Logits and every block's raw output (patch tokens, NLC), in one forward through timm's API."""
    final, tokens = model.forward_intermediates(x, norm=False, output_fmt="NLC")
    return model.forward_head(final), tokens


@dataclass(frozen=True)
class LoadReport:
    """What `student_from_teacher` did: every teacher tensor copied except these."""

    new_keys: tuple[str, ...]     # student tensors with no teacher counterpart (the reducers)
    unused_keys: tuple[str, ...]  # teacher tensors the student has no place for (must be empty)
    copied: int                   # tensors copied from the teacher


def student_from_teacher(student: nn.Module | str, teacher: nn.Module, **create_kwargs) -> tuple[nn.Module, LoadReport]:
    """Load the teacher's weights into the student (a model or a timm name); only reducers stay new.

    Raises ValueError naming the first mismatching tensor if the teacher is another architecture.
    """
    if isinstance(student, str):
        student = timm.create_model(student, **create_kwargs)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    mismatched = [(k, tuple(v.shape), tuple(s_state[k].shape)) for k, v in t_state.items()
                  if k in s_state and s_state[k].shape != v.shape]
    if mismatched:
        k, t_shape, s_shape = mismatched[0]
        raise ValueError(f"teacher does not match the student: {k} is {t_shape} in the teacher but {s_shape} "
                         f"in the student ({len(mismatched)} mismatched tensors)")
    unused = tuple(k for k in t_state if k not in s_state)
    new = tuple(k for k in s_state if k not in t_state)
    foreign = [k for k in new if ".slim." not in k]
    if unused or foreign:
        raise ValueError(
            "teacher does not match the student: "
            + (f"teacher tensors with no place in the student: {list(unused[:5])}; " if unused else "")
            + (f"student backbone tensors missing from the teacher: {foreign[:5]}" if foreign else "")
        )
    student.load_state_dict(t_state, strict=False)
    return student, LoadReport(new_keys=new, unused_keys=unused, copied=len(t_state))
