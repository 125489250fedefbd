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
    soft = torch.softmax(torch.randn(4, 5), -1)  # mixup-like targets: -sum(p * log q), batch mean
    c, _ = loss(logits, [], logits, [], soft)
    torch.testing.assert_close(c, -(soft * logits.log_softmax(-1)).sum(-1).mean())


def test_frd_loss_rejects_bad_weights():
    with pytest.raises(ValueError, match="tau must be > 0"):
        FRDLoss(tau=0)


def distiller(reducer="tsm"):
    teacher = timm.create_model("deit_tiny_patch16_224", **KW)
    student, _ = student_from_teacher("sit_deit_tiny", teacher, reducer=reducer, **KW)
    return FRDDistiller(student, teacher)


def test_every_trainable_parameter_gets_a_gradient_deit_tiny():
    d = distiller().train()
    out = d(torch.randn(2, 3, 64, 64))
    total, _ = FRDLoss()(*out, torch.tensor([1, 2]))
    total.backward()
    trainable = {n: p for n, p in d.named_parameters() if p.requires_grad}
    assert any(n.startswith("rtsm.") for n in trainable) and any(".slim." in n for n in trainable)
    missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert [n for n in missing if not n.endswith("slim.reducer.score.3.bias")] == []  # see below
    assert all(p.grad is None for p in d.teacher.parameters())


def test_rtsm_from_the_first_slimming_block_on_and_tokens_are_full_size():
    d = distiller()
    # 64 px: 16 -> 11 -> 7 -> 5 patch tokens after blocks 3, 6, 9; blocks 1-2 use the tokens as they are,
    # blocks 3..12 get an RTSM whose input is the count LEAVING the block (after its TSM)
    assert sorted(d.rtsm, key=int) == [str(i) for i in range(3, 13)]
    assert [d.rtsm[str(i)].in_tokens for i in range(3, 13)] == [11] * 3 + [7] * 3 + [5] * 4
    assert all(r.out_tokens == 16 for r in d.rtsm.values())
    out = d(torch.randn(2, 3, 64, 64))
    assert len(out.student_tokens) == len(out.teacher_tokens) == 12
    assert all(s.shape == t.shape == (2, 16, 192) for s, t in zip(out.student_tokens, out.teacher_tokens))


def test_a_slimming_blocks_rtsm_decodes_its_tsms_output():
    """block -> TSM -> RTSM: every TSM is the encoder of a TSM/RTSM auto-encoder."""
    d = distiller().eval()
    seen = {}
    d.student.blocks[2].slim.register_forward_hook(lambda m, a, out: seen.__setitem__("tsm_out", out[:, 1:]))
    d.rtsm["3"].register_forward_pre_hook(lambda m, a: seen.__setitem__("rtsm_in", a[0]))
    with torch.no_grad():
        out = d(torch.randn(2, 3, 64, 64))
    assert seen["rtsm_in"].shape == (2, 11, 192)
    torch.testing.assert_close(seen["rtsm_in"], seen["tsm_out"])
    with torch.no_grad():
        torch.testing.assert_close(out.student_tokens[2], d.rtsm["3"](seen["tsm_out"]))


def test_teacher_stays_frozen_in_train_mode_and_student_runs_alone():
    d = distiller().train()
    assert not d.teacher.training and d.student.training
    assert d.student(torch.randn(1, 3, 64, 64)).shape == (1, 10)  # the student is a plain timm model


# Official SiT counts (its `rtsm` ModuleList minus the Identity entries): every block from the first TSM on.
OFFICIAL_RTSMS = {"sit_lvvit_tiny": 14, "sit_lvvit_xsmall": 16, "sit_lvvit_small": 8, "sit_lvvit_medium": 11,
                  "sit_lvvit_large": 15, "sit_deit_small": 10}


@pytest.mark.parametrize("name", list(OFFICIAL_RTSMS))
def test_rtsm_counts_and_widths_match_the_official_code(name):
    with torch.device("meta"):  # full-size shapes, no memory, no init cost
        student = timm.create_model(name)
        teacher = timm.create_model(_teacher_name(name))
        d = FRDDistiller(student, teacher)
    depth, n0 = len(student.blocks), student.patch_embed.num_patches
    first = student.slim_schedule.positions[0]
    assert len(d.rtsm) == OFFICIAL_RTSMS[name]
    assert sorted(map(int, d.rtsm)) == list(range(first, depth + 1))
    leaving = student.slim_schedule.block_out_tokens(depth, n0)
    for i, r in d.rtsm.items():  # official ReverseTSM(dim, layer_patches[i + 1], num_patches)
        assert (r.in_tokens, r.out_tokens) == (leaving[int(i) - 1], n0)
        assert r.token_mlp.fc1.out_features == 4 * n0 and r.channel_mlp.fc1.out_features == 4 * student.embed_dim


@pytest.mark.parametrize("name", list(OFFICIAL_RTSMS))
def test_every_rtsm_and_tsm_gets_a_nonzero_gradient(name):
    kw = dict(img_size=64, embed_dim=64, num_heads=2, num_classes=10)  # real depth and schedule, small width
    teacher = timm.create_model(_teacher_name(name), **kw)
    student, _ = student_from_teacher(name, teacher, **kw)
    d = FRDDistiller(student, teacher).train()
    total, _ = FRDLoss()(*d(torch.randn(2, 3, 64, 64)), torch.tensor([1, 2]))
    total.backward()
    trainable = {n: p for n, p in d.named_parameters() if p.requires_grad}
    assert len([n for n in trainable if n.startswith("rtsm.")]) == 12 * OFFICIAL_RTSMS[name]  # 12 tensors each
    missing = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    # the score head's last bias shifts a whole softmax column equally: its gradient is 0 by construction
    # (the official TSM has the same dead bias; kept for checkpoint compatibility)
    assert [n for n in missing if not n.endswith("slim.reducer.score.3.bias")] == []


def _teacher_name(name):
    from sit_core.schedule import PAPER_SCHEDULES
    return PAPER_SCHEDULES[name].backbone if name in PAPER_SCHEDULES else name.replace("sit_", "") + "_patch16_224"


def test_param_groups_follow_the_official_recipe():
    d = distiller()
    groups = {g["name"]: g for g in d.param_groups(lr=1e-3, weight_decay=0.05, rtsm_lr_mult=5.0)}
    assert list(groups) == ["student_decay", "student_no_decay", "rtsm"]
    assert all({"params", "lr", "weight_decay", "name"} <= set(g) for g in groups.values())
    names = {id(p): n for n, p in d.named_parameters()}
    decay = {names[id(p)] for p in groups["student_decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["student_no_decay"]["params"]}
    rtsm = {names[id(p)] for p in groups["rtsm"]["params"]}
    assert rtsm == {n for n in names.values() if n.startswith("rtsm.")}  # ALL RTSM tensors, biases and norms too
    assert groups["rtsm"]["weight_decay"] == 0.05 and groups["rtsm"]["lr"] == pytest.approx(5e-3)
    assert groups["student_decay"]["weight_decay"] == 0.05 and groups["student_no_decay"]["weight_decay"] == 0.0
    assert all(g["lr"] == 1e-3 for k, g in groups.items() if k != "rtsm")
    tsm_scales = {f"student.blocks.{i}.slim.reducer.scale" for i in (2, 5, 8)}
    assert tsm_scales <= decay  # decayed, as the official code does
    assert {"student.blocks.2.slim.reducer.score.3.weight", "student.blocks.0.attn.qkv.weight"} <= decay
    assert {"student.pos_embed", "student.cls_token", "student.blocks.0.norm1.weight", "student.blocks.0.attn.qkv.bias",
            "student.blocks.2.slim.reducer.score.0.weight", "student.blocks.2.slim.reducer.score.3.bias"} <= no_decay
    assert len(decay) + len(no_decay) + len(rtsm) == len(names) - len(list(d.teacher.parameters()))


def test_identity_schedule_frd_is_unchanged():
    """No reducer: no RTSM, and the loss equals FRD computed from forward hooks on every block."""
    torch.manual_seed(0)
    teacher = timm.create_model("deit_tiny_patch16_224", **KW)
    student, _ = student_from_teacher("sit_deit_tiny", teacher, reducer="none", **KW)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a student that differs from its teacher
    d = FRDDistiller(student, teacher).eval()
    assert len(d.rtsm) == 0
    x, y = torch.randn(2, 3, 64, 64), torch.tensor([3, 4])
    taps = {"s": [], "t": []}
    for key, model in (("s", student), ("t", teacher)):
        for b in model.blocks:
            b.register_forward_hook(lambda m, a, out, key=key: taps[key].append(out[:, 1:]))
    with torch.no_grad():
        ref, ref_parts = FRDLoss()(student(x), taps["s"], teacher(x), taps["t"], y)
        taps["s"].clear(), taps["t"].clear()
        total, parts = FRDLoss()(*d(x), y)
    assert ref_parts["loss_token"] > 0
    torch.testing.assert_close(total, ref)
    for k in parts:
        torch.testing.assert_close(parts[k], ref_parts[k])


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
