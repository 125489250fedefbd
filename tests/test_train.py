"""sit_core.train, pure PyTorch: the loss goes down, every group's cosine ends at min_lr, gradient
accumulation equals the full batch, resuming equals not stopping, non-finite losses stop cleanly."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from sit_core.config import override
from sit_core.train import Trainer, distill_task, run_epochs, teacher_task

from conftest import tiny_job


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batches(n=4, batch=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n * batch, 1, 28, 28, generator=g), torch.randint(0, 10, (n * batch,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def teacher_state(job):
    torch.manual_seed(0)
    return job.model.build_teacher().state_dict()


def paper_start_job():
    """The paper's random TSM start: the task needs no training set to build."""
    return override(tiny_job(), {"train.tsm_init": "random"})


def test_one_distillation_step_lowers_the_loss_and_leaves_the_teacher_frozen():
    job = paper_start_job()
    task = distill_task(job, teacher_state(job))
    trainer = Trainer(task, override(job, {"train.lr": 1e-3}).train, steps_per_epoch=1, device="cpu")
    x, y = next(iter(batches()))
    before_teacher = copy.deepcopy(task.net.teacher.state_dict())
    task.net.train()
    before, _ = task.loss(task.net(x), y)
    trainer.train_epoch([(x, y)])
    with torch.no_grad():
        after, parts = task.loss(task.net(x), y)
    assert after.item() < before.item()
    assert parts["loss_token"] > 0  # FRD compares every block's tokens with the teacher's
    for k, v in task.net.teacher.state_dict().items():
        assert torch.equal(v, before_teacher[k]), k


def test_every_group_ends_its_cosine_at_min_lr_and_the_rtsm_group_starts_5x():
    job = override(paper_start_job(), {"train.epochs": 3, "train.cooldown_epochs": 1, "train.lr": 1e-3, "train.min_lr": 1e-5})
    task = distill_task(job, teacher_state(job))
    trainer = Trainer(task, job.train, steps_per_epoch=10, device="cpu")
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert {n: v for n, v in lrs.items() if n.startswith("rtsm")} and all(
        v == pytest.approx(5e-3) for n, v in lrs.items() if n.startswith("rtsm"))
    assert all(v == pytest.approx(1e-3) for n, v in lrs.items() if not n.startswith("rtsm"))
    seen = []
    for step in range(1, 31):
        trainer.scheduler.step_update(step)
        seen.append({g["name"]: g["lr"] for g in trainer.optimizer.param_groups})
    # the cosine spans epochs 1-2 (20 steps), the cool-down epoch stays at min_lr for every group
    assert all(v == pytest.approx(1e-5) for s in seen[19:] for v in s.values())
    assert all(v > 1e-5 for v in seen[9].values())  # mid-cosine


def test_warm_up_ramps_from_min_lr():
    job = override(tiny_job(), {"train.warmup_steps": 4, "train.lr": 1e-3, "train.min_lr": 1e-5})
    trainer = Trainer(teacher_task(job), job.train, steps_per_epoch=10, device="cpu")
    ramp = []
    for step in range(5):
        trainer.scheduler.step_update(step)
        ramp.append(trainer.optimizer.param_groups[0]["lr"])
    assert ramp[0] == pytest.approx(1e-5) and ramp == sorted(ramp) and ramp[4] == pytest.approx(1e-3)


def test_gradient_accumulation_under_a_device_cap_equals_the_full_batch():
    job = override(tiny_job(), {"train.lr": 1e-3, "teacher_train.drop_path_rate": 0.0})  # deterministic forward
    x, y = next(iter(batches(batch=12)))
    grads = []
    for cap in (None, 5):  # 12 images as one forward, or as 5 + 5 + 2
        torch.manual_seed(0)
        task = teacher_task(override(job, {"train.device_batch_cap": cap}))
        trainer = Trainer(task, override(job, {"train.device_batch_cap": cap}).train, steps_per_epoch=1, device="cpu")
        trainer._accumulate(x, y)
        grads.append({n: p.grad.clone() for n, p in task.net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_label_smoothing_and_mixup_train_on_soft_targets():
    job = override(tiny_job(), {"train.label_smoothing": 0.1})
    trainer = Trainer(teacher_task(job), job.train, steps_per_epoch=1, device="cpu")
    x, y = next(iter(batches()))
    _, targets = trainer._targets(x, y)
    assert targets.shape == (16, 10) and torch.allclose(targets.sum(1), torch.ones(16))
    assert targets.max().item() == pytest.approx(0.9 + 0.1 / 10)
    mixed = Trainer(teacher_task(job), override(job, {"train.mixup": 0.8, "train.cutmix": 1.0}).train,
                    steps_per_epoch=1, device="cpu")
    original = x.clone()
    mx, mt = mixed._targets(x, y)  # timm mixes the batch in place
    assert mt.shape == (16, 10) and not torch.equal(mx, original)


def test_resuming_from_a_state_dict_equals_not_stopping():
    job = override(paper_start_job(), {"train.epochs": 2, "train.lr": 1e-3})
    state = teacher_state(job)

    def trainer():
        torch.manual_seed(3)
        task = distill_task(job, state)
        return task, Trainer(task, job.train, steps_per_epoch=4, device="cpu")

    loader = list(batches())
    task_a, a = trainer()
    a.train_epoch(loader)
    a.train_epoch(loader)
    task_b, b = trainer()
    b.train_epoch(loader)
    saved = copy.deepcopy(b.state_dict())
    assert not [k for k in saved["model"] if k.startswith("teacher.")]  # the frozen teacher is not saved
    task_c, c = trainer()
    c.load_state_dict(saved)
    c.train_epoch(loader)
    for (k, va), vc in zip(task_a.net.state_dict().items(), task_c.net.state_dict().values()):
        torch.testing.assert_close(vc, va, msg=k)


def test_a_non_finite_loss_stops_the_epoch_and_says_where():
    job = paper_start_job()
    state = {k: torch.full_like(v, float("nan")) if k == "head.weight" else v for k, v in teacher_state(job).items()}
    trainer = Trainer(distill_task(job, state), job.train, steps_per_epoch=4, device="cpu")
    reports = []
    held_out = batches(1).dataset
    run_epochs(trainer, list(batches()), held_out, held_out, start_epoch=0,
               report=lambda m, last: reports.append((m, last)))
    (metrics, last), = reports
    assert metrics["status"] == "non_finite" and "step 1" in metrics["failure"] and last


def test_top1_counts_correct_predictions():
    job = tiny_job()
    task = teacher_task(job)
    trainer = Trainer(task, job.train, steps_per_epoch=1, device="cpu")
    x, _ = next(iter(batches()))
    with torch.no_grad():
        task.net.eval()
        pred = task.net(x).argmax(-1)
    y = pred.clone()
    y[:4] = (y[:4] + 1) % 10  # exactly 4 of 16 wrong
    assert trainer.top1(TensorDataset(x, y)) == pytest.approx(75.0)


def test_tsm_pool_warm_start_is_fitted_on_the_same_batch_every_time():
    from sit_core.data import load_splits

    job = tiny_job()  # the default start: pooling
    assert job.train.tsm_init == "pool"
    state = teacher_state(job)
    train_set = load_splits(job.data).train
    def task(j, data=None):  # every DDP rank seeds the same way before it builds the task
        torch.manual_seed(j.train.seed)
        return distill_task(j, state, data)

    a, b = task(job, train_set), task(job, train_set)
    random_start = task(override(job, {"train.tsm_init": "random"}))
    tsm = [k for k in a.net.student.state_dict() if ".slim." in k and k.endswith("score.3.weight")]
    assert tsm, "the tiny job has TSMs"
    for k in tsm:  # deterministic (every DDP rank fits the same start), and not the random init
        assert torch.equal(a.net.student.state_dict()[k], b.net.student.state_dict()[k])
        assert not torch.equal(a.net.student.state_dict()[k], random_start.net.student.state_dict()[k])
    with pytest.raises(ValueError, match="needs the training set"):
        distill_task(job, state)


IMAGENET_PRESETS = [name for name in __import__("sit_core.presets", fromlist=["PRESETS"]).PRESETS if "imagenet" in name]


@pytest.mark.parametrize("preset", IMAGENET_PRESETS)
@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_the_global_batch_holds_for_any_worker_count_and_never_lands_on_one_device(preset, workers):
    from sit_core.presets import get_preset
    from sit_core.train import device_batches

    recipe = get_preset(preset).train
    per_worker, per_forward = device_batches(recipe, workers)
    assert per_worker * workers == recipe.batch_size == 1024  # the recipe's global batch, whatever --workers
    assert per_forward <= recipe.device_batch_cap <= 128       # --workers 1: 1024 images, at most 128 per forward
    forwards = -(-per_worker // per_forward)                   # what Trainer._accumulate runs per step
    assert forwards * per_forward >= per_worker > (forwards - 1) * per_forward


def test_a_batch_that_does_not_split_over_the_workers_is_refused():
    from sit_core.presets import get_preset
    from sit_core.train import device_batches

    with pytest.raises(ValueError, match="batch_size 1024 does not split evenly over 3 workers"):
        device_batches(get_preset("deit-small-imagenet").train, 3)


@pytest.mark.parametrize("preset", IMAGENET_PRESETS)
def test_imagenet_device_caps_fit_a_24gb_gpu_by_the_activation_estimate(preset):
    """Training activations per image, mixed precision (Korthikanti et al. 2022, per block:
    tokens x width x (34 + 5 x heads x tokens / width) bytes), times the cap, must leave a 24 GB
    A10G room for weights, AdamW state, the frozen teacher and the allocator: <= 16 GiB."""
    from sit_core.presets import get_preset

    job = get_preset(preset)
    with torch.device("meta"):
        heads = job.model.build_teacher(pretrained=False).blocks[0].attn.num_heads
    g = job.model.geometry()
    tokens = g.num_patches + g.num_prefix_tokens
    per_image = g.depth * tokens * g.embed_dim * (34 + 5 * heads * tokens / g.embed_dim)
    assert per_image * job.train.device_batch_cap <= 16 * 2**30, f"{preset}: {per_image / 2**20:.0f} MiB per image"


def test_each_forward_sees_at_most_the_device_cap():
    job = override(tiny_job(), {"train.device_batch_cap": 5})
    task = teacher_task(job)
    sizes = []
    task.net.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    trainer = Trainer(task, job.train, steps_per_epoch=1, device="cpu")
    x, y = next(iter(batches(batch=12)))
    trainer._accumulate(x, y)
    assert sizes == [5, 5, 2]
