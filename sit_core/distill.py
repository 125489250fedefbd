"""Everything that exists only for training: the distillation wrapper and student-from-teacher.

`FRDDistiller(student, teacher)` holds the student, the frozen teacher and one RTSM per block
whose tokens were slimmed; its forward returns what `FRDLoss` needs. The inference model the
registry returns never contains an RTSM, a tap or a teacher.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import timm
import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from .patch import model_geometry, tokens_per_block
from .slimming import ReverseTokenSlimming


class FRDOutput(NamedTuple):  # NamedTuple: DDP walks tuples when it looks for output tensors
    student_logits: torch.Tensor
    student_tokens: list  # per block, (B, N, C): recovered by that block's RTSM when slimmed
    teacher_logits: torch.Tensor
    teacher_tokens: list  # per block, (B, N, C): raw block outputs, patch tokens only


class FRDDistiller(nn.Module):
    """Student + frozen teacher + RTSMs. Only the student's and RTSMs' parameters train."""

    def __init__(self, student: nn.Module, teacher: nn.Module):
        super().__init__()
        s_geo, t_geo = model_geometry(student), model_geometry(teacher)
        if s_geo != t_geo:
            raise ValueError(f"student (depth, patches, prefix, dim)={s_geo} does not match teacher {t_geo}")
        if getattr(teacher, "slim_schedule", None) is not None and not teacher.slim_schedule.is_identity:
            raise ValueError("the teacher must be the plain backbone, without token reducers")
        depth, num_patches, self.num_prefix, dim = s_geo
        self.student, self.teacher = student, teacher.requires_grad_(False).eval()
        self.rtsm = nn.ModuleDict({
            str(i + 1): ReverseTokenSlimming(dim, n, num_patches)
            for i, n in enumerate(tokens_per_block(student)) if n != num_patches
        })
        self._student_taps: list = []
        self._teacher_taps: list = []
        self._recording = False  # the student may also run alone (eval): taps only inside forward
        for block in student.blocks:
            if hasattr(block, "slim"):  # tap what enters the reducer: the block's raw output
                block.slim.register_forward_pre_hook(lambda m, args: self._tap(self._student_taps, args[0]))
            else:
                block.register_forward_hook(lambda m, args, out: self._tap(self._student_taps, out))
        for block in teacher.blocks:
            block.register_forward_hook(lambda m, args, out: self._tap(self._teacher_taps, out))

    def _tap(self, taps: list, tokens: torch.Tensor) -> None:
        if self._recording:
            taps.append(tokens)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: no dropout, no BatchNorm statistics updates
        return self

    def forward(self, x: torch.Tensor) -> FRDOutput:
        p = self.num_prefix
        self._student_taps.clear()
        self._teacher_taps.clear()
        self._recording = True
        try:
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            student_logits = self.student(x)
        finally:
            self._recording = False
        student_tokens = [
            self.rtsm[str(i + 1)](t[:, p:]) if str(i + 1) in self.rtsm else t[:, p:]
            for i, t in enumerate(self._student_taps)
        ]
        teacher_tokens = [t[:, p:] for t in self._teacher_taps]
        self._student_taps.clear()
        self._teacher_taps.clear()
        return FRDOutput(student_logits, student_tokens, teacher_logits, teacher_tokens)

    def param_groups(self, lr: float, weight_decay: float, rtsm_lr_mult: float = 5.0) -> list[dict]:
        """AdamW groups (timm's weight-decay split): student + TSM at `lr`, RTSMs at `lr * rtsm_lr_mult`."""
        skip = set(getattr(self.student, "no_weight_decay", set)())  # pos_embed, cls_token...
        groups = []
        for name, module, mult, no_wd in (("student", self.student, 1.0, skip), ("rtsm", self.rtsm, rtsm_lr_mult, ())):
            for group in param_groups_weight_decay(module, weight_decay, no_weight_decay_list=no_wd):
                groups.append({**group, "name": f"{name}_{'decay' if group['weight_decay'] else 'no_decay'}",
                               "lr": lr * mult})
        return groups


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
