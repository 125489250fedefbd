"""FRD loss by hand, the distillation wrapper's gradients, and student-from-teacher."""
import pytest
import timm
import torch
import torch.nn.functional as F

from sit_core import FRDDistiller, FRDLoss, student_from_teacher
from sit_core.slimming import ReverseTokenSlimming

KW = dict(img_size=64, num_classes=10)


def test_frd_loss_equals_hand_computation():
    s_logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 1.0]])
    t_logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    target = torch.tensor([0, 2])
    s_tok = [torch.ones(2, 2, 1), torch.zeros(2, 2, 1)]
    t_tok = [torch.zeros(2, 2, 1), torch.full((2, 2, 1), 3.0)]
    tau = 2.0
    total, parts = FRDLoss(lambda_token=0.5, lambda_logits=3.0, tau=tau)(s_logits, s_tok, t_logits, t_tok, target)

    def log_softmax(row):
        return [v - torch.logsumexp(row, 0).item() for v in row.tolist()]

    ce = -(log_softmax(s_logits[0])[0] + log_softmax(s_logits[1])[2]) / 2
    token = (1.0 + 9.0) / 2  # MSE per block: 1 and 9, averaged over the 2 blocks
    kl = 0.0
    for s_row, t_row in zip(s_logits / tau, t_logits / tau):
        ls, lt = log_softmax(s_row), log_softmax(t_row)
        kl += sum(torch.tensor(b).exp().item() * (b - a) for a, b in zip(ls, lt))
    kl = kl / 2 * tau ** 2
    assert parts["loss_cls"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["loss_token"].item() == pytest.approx(token)
    assert parts["loss_logits"].item() == pytest.approx(kl, rel=1e-5)
    assert total.item() == pytest.approx(ce + 0.5 * token + 3.0 * kl, rel=1e-5)


def test_frd_loss_takes_soft_targets():
    logits = torch.randn(4, 5)
    hard = torch.tensor([0, 1, 2, 3])
    loss = FRDLoss(lambda_token=0, lambda_logits=0)
    a, _ = loss(logits, [], logits, [], hard)
    b, _ = loss(logits, [], logits, [], F.one_hot(hard, 5).float())
    torch.testing.assert_close(a, b)


def test_frd_loss_rejects_bad_weights():
    with pytest.raises(ValueError, match="tau must be > 0"):
        FRDLoss(tau=0)


def distiller(reducer="tsm"):
    teacher = timm.create_model("deit_tiny_patch16_224", **KW)
    student, _ = student_from_teacher("sit_deit_tiny", teacher, reducer=reducer, **KW)
    return FRDDistiller(student, teacher)


def test_every_trainable_parameter_gets_a_gradient():
    d = distiller().train()
    out = d(torch.randn(2, 3, 64, 64))
    total, _ = FRDLoss()(*out, torch.tensor([1, 2]))
    total.backward()
    trainable = {n: p for n, p in d.named_parameters() if p.requires_grad}
    assert any(n.startswith("rtsm.") for n in trainable) and any(".slim." in n for n in trainable)
    missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert all(p.grad is None for p in d.teacher.parameters())


def test_rtsm_per_slimmed_block_and_tokens_are_full_size():
    d = distiller()
    # blocks 4..12 see slimmed tokens (16 -> 11 -> 7 -> 5 at 64 px); blocks 1..3 use tokens as they are
    assert sorted(d.rtsm, key=int) == [str(i) for i in range(4, 13)]
    assert [d.rtsm[str(i)].in_tokens for i in (4, 7, 10)] == [11, 7, 5]
    out = d(torch.randn(2, 3, 64, 64))
    assert len(out.student_tokens) == len(out.teacher_tokens) == 12
    assert all(s.shape == t.shape == (2, 16, 192) for s, t in zip(out.student_tokens, out.teacher_tokens))


def test_teacher_stays_frozen_in_train_mode_and_student_runs_alone():
    d = distiller().train()
    assert not d.teacher.training and d.student.training
    d.student(torch.randn(1, 3, 64, 64))  # outside the wrapper's forward: no taps accumulate
    assert d._student_taps == [] and d._teacher_taps == []


def test_student_from_teacher_copies_every_backbone_tensor():
    teacher = timm.create_model("deit_tiny_patch16_224", **KW)
    student, report = student_from_teacher("sit_deit_tiny", teacher, **KW)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for k, v in t_state.items():
        assert torch.equal(s_state[k], v), k
    assert report.unused_keys == ()
    assert report.copied == len(t_state)
    assert report.new_keys and all(".slim.reducer." in k for k in report.new_keys)
    assert not any(isinstance(m, ReverseTokenSlimming) for m in student.modules())


def test_student_from_teacher_refuses_a_mismatched_teacher():
    teacher = timm.create_model("deit_small_patch16_224", **KW)
    with pytest.raises(ValueError, match=r"teacher does not match the student: cls_token is \(1, 1, 384\)"):
        student_from_teacher("sit_deit_tiny", teacher, **KW)
    shallow = timm.create_model("deit_tiny_patch16_224", depth=6, **KW)
    with pytest.raises(ValueError, match="student backbone tensors missing from the teacher"):
        student_from_teacher("sit_deit_tiny", shallow, **KW)


def test_peer_reducers_distill_through_the_same_wrapper():
    for reducer in ("drop", "merge"):
        d = distiller(reducer)
        out = d(torch.randn(2, 3, 64, 64))
        total, parts = FRDLoss()(*out, torch.tensor([0, 1]))
        assert torch.isfinite(total)
