"""Your own ViT and your own data on both commands (no Ray): `--model`, `--num-classes`, `--img-size`,
`--data`, the teacher from a checkpoint, timm's pretrained weights (a local file through timm) or a
teacher card, `--finetune-teacher`, `--config` / `--set`; refusals before anything starts; the search
space derived from the model. The end-to-end run is tests/test_byo_e2e.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml

from conftest import TINY_VIT, TINY_VIT_KWARGS, TINY_VIT_SETS, make_image_folder
from sit_core import teachers
from sit_core.config import DistillJob, ModelSpec, override
from sit_core.data import DataSpec
from sit_core.patch import WORKING_FAMILIES
from sit_core.schedule import PAPER_SCHEDULES

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", TINY_VIT, *TINY_VIT_SETS, "--img-size", "32"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "pets", n_train=10, n_val=2)


@pytest.fixture(scope="module")
def user_checkpoint(tmp_path_factory):
    """A user's fine-tuned ViT saved as timm's train.py does ({"state_dict": ...}) with a 10-class head."""
    torch.manual_seed(0)
    model = timm.create_model(TINY_VIT, **TINY_VIT_KWARGS, num_classes=10)
    path = tmp_path_factory.mktemp("ckpt") / "my_vit.pth.tar"
    torch.save({"epoch": 99, "arch": TINY_VIT, "state_dict": model.state_dict()}, path)
    return path, model.state_dict()


@pytest.fixture(scope="module")
def pretrained_file(tmp_path_factory):
    """A local copy of 'timm's pretrained weights' for the tiny ViT: its pretrained_cfg says 1000 classes."""
    torch.manual_seed(1)
    model = timm.create_model(TINY_VIT, **TINY_VIT_KWARGS)
    assert model.num_classes == 1000 == model.pretrained_cfg["num_classes"]
    path = tmp_path_factory.mktemp("hub") / "vit_small_tiny.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def job_of(*args):
    """The job a command line makes (what --print-config prints), not yet validated."""
    from sweeps import distill
    return distill.make_job(distill.build_parser().parse_args([*map(str, args), "--print-config"]))


@pytest.fixture
def run_main(monkeypatch, tmp_path, capsys):
    """`main(argv)` of distill.py or pareto.py in this process, Ray forbidden, output into tmp_path/out."""
    from sweeps import runner

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for bad input")

    monkeypatch.setattr(runner, "init_ray", no_ray)
    monkeypatch.setenv("SIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)

    def call(*args, command="distill"):
        from sweeps import distill, pareto
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            (distill if command == "distill" else pareto).main(["--out", str(tmp_path / "out"), *map(str, args)])
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return call


def assert_refused(result, tmp_path, *fragments):
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1 and ": error: " in lines[0], err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # nothing written
    return lines[0]


# ------------------------------------------------------------------------------ refusals by model name

FAMILY_REFUSALS = {  # --model NAME (+ options) -> why
    "EVA-02": (["--model", "eva02_tiny_patch14_224", "--img-size", "28"], "rotary position terms"),
    "RoPE ViT": (["--model", "vit_small_patch16_rope_224", "--img-size", "32"], "rotary position terms"),
    "BEiT": (["--model", "beit_base_patch16_224", "--img-size", "32"], "relative position bias"),
    "features_only": ([*TINY, "--set", "model.kwargs.features_only=true"], "features_only wrapper"),
    "ResNet": (["--model", "resnet18"], "not a timm VisionTransformer"),
    "ResNet given a ViT option": (["--model", "resnet18", "--img-size", "32"], "not a timm VisionTransformer"),
}


@pytest.mark.parametrize("command", ["distill", "pareto"])
@pytest.mark.parametrize("family", list(FAMILY_REFUSALS))
def test_a_backbone_slimming_cannot_serve_is_refused_by_name_before_anything_starts(family, command, run_main,
                                                                                    folder, tmp_path):
    args, why = FAMILY_REFUSALS[family]
    line = assert_refused(run_main(*args, "--num-classes", 3, "--data", folder, command=command), tmp_path,
                          "cannot slim ", why, WORKING_FAMILIES)
    assert line.count("error") == 1


@pytest.mark.parametrize("args, fragments", [
    (["--model", "vit_nope_patch16_224"], ["unknown timm model 'vit_nope_patch16_224'", "timm.list_models"]),
    (["--model", "sit_deit_tiny"], ["sit_deit_tiny is already a slimmed model", "plain backbone"]),
    ([*TINY, "--set", "model.kwargs.no_such_option=1"], ["does not take the options", "no_such_option"]),
    ([*TINY, "--set", "nonsense"], ["--set 'nonsense' must look like FIELD=VALUE"]),
    ([*TINY, "--set", "train.lrr=1"], ["unknown job field 'train.lrr'"]),
    ([*TINY, "--finetune-backbone"], ["--finetune-backbone goes with --finetune-teacher"]),
    ([*TINY, "--finetune-teacher", 1], ["fine-tuning the teacher needs its weights"]),
])
def test_other_model_and_teacher_mistakes_are_one_line(args, fragments, run_main, folder, tmp_path):
    assert_refused(run_main(*args, "--num-classes", 3, "--data", folder), tmp_path, *fragments)


def test_refusal_through_the_real_entry_point(folder, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "SIT_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "cwd").mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / "pareto.py"), "--model", "eva02_tiny_patch14_224",
                           "--num-classes", "3", "--img-size", "28", "--data", folder, "--out", str(tmp_path / "out")],
                          cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pareto.py: error: cannot slim Eva: "), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"] and not any((tmp_path / "cwd").iterdir())


# ------------------------------------------------------------------------------ classes vs the teacher's head

def test_a_folder_whose_classes_the_model_does_not_have_names_the_fix(run_main, folder, tmp_path):
    for command in ("distill", "pareto"):
        assert_refused(run_main(*TINY, "--num-classes", 5, "--data", folder, command=command), tmp_path,
                       "has 3 classes but the model has 5", "--num-classes 3", "--finetune-teacher")
    # the model's default head (1000 ImageNet classes), no --num-classes
    assert_refused(run_main(*TINY, "--data", folder), tmp_path, "has 3 classes but the model has 1000",
                   "--num-classes 3")


def test_a_teacher_head_for_other_classes_needs_a_fine_tune(run_main, folder, user_checkpoint, pretrained_file,
                                                            tmp_path):
    ckpt, _ = user_checkpoint
    for command in ("distill", "pareto"):
        assert_refused(run_main(*TINY, "--num-classes", 3, "--data", folder, "--teacher-checkpoint", ckpt,
                                command=command), tmp_path,
                       f"teacher checkpoint {ckpt} has a 10-class head but the job's model has 3 classes",
                       "--finetune-teacher EPOCHS")
    assert_refused(run_main(*TINY, "--num-classes", 3, "--data", folder, "--pretrained", pretrained_file[0]),
                   tmp_path, f"timm's pretrained {TINY_VIT} (local file {pretrained_file[0]}) has a 1000-class head",
                   "--finetune-teacher EPOCHS")


def test_class_mismatch_through_the_real_entry_point(folder, user_checkpoint, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "SIT_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / "distill.py"), *TINY, "--num-classes", "3",
                           "--data", folder, "--teacher-checkpoint", str(user_checkpoint[0]),
                           "--out", str(tmp_path / "out")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distill.py: error: teacher checkpoint ") and \
        "has a 10-class head" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------ the job the flags make

def test_model_flags_replace_the_backbone_and_the_data_follows_it(folder):
    job = job_of(*TINY, "--num-classes", 3, "--data", folder, "--train-subset", 20)
    assert job.name == TINY_VIT and job.model.backbone == TINY_VIT
    # timm's defaults for the new backbone: none of the preset's (Fashion-MNIST) keywords survive
    assert job.model.kwargs == {**TINY_VIT_KWARGS, "num_classes": 3}
    # the folder replaces Fashion-MNIST (and its subsets); size, channels and normalisation follow the model
    assert job.data == DataSpec(kind="folder", root=folder, img_size=32, in_chans=3, train_subset=20,
                                mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # vit_small's augreg statistics
    assert job.model.schedule == PAPER_SCHEDULES["deit_flop_matched"].scaled_to(4)  # 1,2,3@0.7
    assert job_of(*TINY, "--num-classes", 3, "--data", folder, "--schedule", "2@0.5").model.schedule.positions == (2,)
    kept = job_of(*TINY, "--num-classes", 3, "--set", "data.mean=[0.4,0.4,0.4]", "--set", "data.std=[0.2,0.2,0.2]")
    assert kept.data.mean == (0.4, 0.4, 0.4) and kept.data.std == (0.2, 0.2, 0.2)
    assert kept.data.kind == "fashion_mnist" and kept.data.in_chans == 3  # grey images, repeated to 3 channels
    # a relative --data becomes absolute (Ray workers do not run in this directory)
    os.chdir(Path(folder).parent)
    assert job_of(*TINY, "--num-classes", 3, "--data", "pets").data.root == folder


def test_config_file_round_trips_and_flags_override_it(folder, user_checkpoint, tmp_path, capsys):
    from sweeps import distill, pareto

    args = [*TINY, "--num-classes", "3", "--data", folder, "--teacher-checkpoint", str(user_checkpoint[0]),
            "--finetune-teacher", "2", "--lr", "3e-4", "--set", "teacher_train.lr=5e-4", "--smoke-test"]

    def printed(module, *argv):
        capsys.readouterr()
        assert module.main([*argv, "--print-config"]) == 0
        return capsys.readouterr().out

    text = printed(distill, *args)
    assert printed(pareto, *args) == text                           # both commands make the same job
    job = DistillJob.from_dict(yaml.safe_load(text))
    assert job == job_of(*args) and job.teacher_finetune == "head" and job.teacher_train.lr == 5e-4
    assert job.teacher_checkpoint == str(user_checkpoint[0]) and job.train.lr == 3e-4
    config = tmp_path / "my_job.yaml"
    config.write_text(text)
    assert printed(distill, "--config", str(config)) == text       # the round trip
    assert printed(pareto, "--config", str(config)) == text
    changed = yaml.safe_load(printed(distill, "--config", str(config), "--lr", "1e-4", "--val-subset", "4"))
    expected = yaml.safe_load(text)
    expected["train"]["lr"], expected["data"]["val_subset"] = 1e-4, 4
    assert changed == expected                                     # a flag changes only its own field
    # --finetune-teacher on a job file that already fine-tunes keeps its recipe (new epochs only)
    again = yaml.safe_load(printed(distill, "--config", str(config), "--finetune-teacher", "5"))
    assert again["teacher_train"] == {**expected["teacher_train"], "epochs": 5}


def test_a_partial_job_file_gives_a_whole_backbone(folder, tmp_path):
    config = tmp_path / "partial.yaml"
    config.write_text(yaml.safe_dump({"model": {"backbone": TINY_VIT, "kwargs": {**TINY_VIT_KWARGS, "num_classes": 3}},
                                      "data": {"kind": "folder", "root": folder}, "train": {"epochs": 2}}))
    job = job_of("--config", config)
    assert job.model.kwargs == {**TINY_VIT_KWARGS, "num_classes": 3}  # the preset's in_chans/embed_dim do not leak in
    assert (job.data.img_size, job.data.in_chans, job.train.epochs) == (32, 3, 2)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lrr: 1}\n")
    with pytest.raises(ValueError, match="unknown job field 'train.lrr'"):
        job_of("--config", bad)


# ------------------------------------------------------------------------------ teacher weights

@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict_ema", "ddp", "safetensors"])
def test_teacher_checkpoints_in_their_usual_wrappers(wrap, user_checkpoint, tmp_path):
    _, state = user_checkpoint
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.pth")
    if wrap == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"plain": state, "model": {"model": state, "epoch": 3}, "state_dict_ema": {"state_dict_ema": state},
                    "ddp": {f"module.{k}": v for k, v in state.items()}}[wrap], path)
    job = job_of(*TINY, "--num-classes", 10, "--teacher-checkpoint", path)
    loaded = teachers.load_state(job, path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_fine_tune_start_weights_keep_the_backbone_and_seed_a_new_head(folder, user_checkpoint):
    path, state = user_checkpoint
    job = job_of(*TINY, "--num-classes", 3, "--data", folder, "--teacher-checkpoint", path, "--finetune-teacher", 1)
    start = teachers.start_weights(job)
    assert not start.head_trained and start.head_classes == 10 and start.state["head.weight"].shape == (3, 64)
    assert all(torch.equal(start.state[k], v) for k, v in state.items() if not k.startswith("head."))
    assert torch.equal(teachers.start_weights(job).state["head.weight"], start.state["head.weight"])  # seeded
    with pytest.raises(ValueError, match="has a 10-class head"):
        teachers.ready_weights(job)
    # the fine-tuning recipe, and a key that follows the start weights' content (not their path)
    assert (job.teacher_finetune, job.teacher_train.epochs, job.teacher_train.lr, job.teacher_train.warmup_steps) == \
        ("head", 1, 1e-3, 0)
    full = job_of(*TINY, "--num-classes", 3, "--data", folder, "--teacher-checkpoint", path, "--finetune-teacher", 1,
                  "--finetune-backbone")
    assert full.teacher_finetune == "all" and full.teacher_train.lr == 1e-4 and full.teacher_key() != job.teacher_key()
    key = job.teacher_key()
    moved = Path(path).with_name("copy.pth")
    moved.write_bytes(Path(path).read_bytes())
    assert override(job, {"teacher_checkpoint": str(moved)}).teacher_key() == key
    torch.save({"state_dict": {**state, "blocks.0.norm1.weight": state["blocks.0.norm1.weight"] + 1}}, moved)
    assert override(job, {"teacher_checkpoint": str(moved)}).teacher_key() != key


def test_head_only_fine_tune_trains_the_head_and_nothing_else(folder, user_checkpoint):
    from sit_core.train import Trainer, teacher_task

    job = job_of(*TINY, "--num-classes", 3, "--data", folder, "--teacher-checkpoint", user_checkpoint[0],
                 "--finetune-teacher", 1)
    start = teachers.start_weights(job)
    task = teacher_task(job, start.state)
    assert [n for n, p in task.net.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    trainer = Trainer(task, job.teacher_train, steps_per_epoch=1, device="cpu")
    torch.manual_seed(0)
    stats = trainer.train_epoch([(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))])
    assert stats.status == "ok"
    after = task.net.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], start.state[k]))
    assert changed == ["head.bias", "head.weight"]
    everything = teacher_task(override(job, {"teacher_finetune": "all"}), start.state)
    assert all(p.requires_grad for p in everything.net.parameters())


def test_pretrained_weights_load_through_timm_from_a_local_file(folder, pretrained_file):
    path, state = pretrained_file
    # same class count as the weights: the teacher as it is, head included
    as_is = job_of(*TINY, "--pretrained", path)
    assert as_is.teacher_pretrained == str(path) and as_is.teacher_checkpoint is None
    ready = teachers.ready_weights(as_is)
    assert ready.keys() == state.keys() and all(torch.equal(ready[k], state[k]) for k in state)
    # another class count: timm keeps its fresh head, which --finetune-teacher trains
    tuned = job_of(*TINY, "--num-classes", 3, "--data", folder, "--pretrained", path, "--finetune-teacher", 1)
    start = teachers.start_weights(tuned)
    assert not start.head_trained and start.head_classes == 1000 and start.state["head.weight"].shape == (3, 64)
    assert torch.equal(start.state["blocks.3.mlp.fc2.weight"], state["blocks.3.mlp.fc2.weight"])
    assert tuned.teacher_source() == {"pretrained_file": teachers.file_sha256(path)}
    # another image size: timm resizes the position embedding
    bigger = teachers.ready_weights(job_of(*TINY, "--img-size", 48, "--pretrained", path))
    assert bigger["pos_embed"].shape == (1, 5 + 36, 64) and state["pos_embed"].shape == (1, 5 + 16, 64)  # + 5 prefix
    # the flag without FILE means timm's download; --pretrained and --teacher-checkpoint exclude each other
    assert job_of(*TINY, "--pretrained").teacher_pretrained == "timm"
    with pytest.raises(SystemExit):
        job_of(*TINY, "--pretrained", path, "--teacher-checkpoint", path)


def test_a_teacher_card_gives_the_model_its_normalisation_and_weights(folder, tmp_path, run_main):
    from sit_core.card import write_card

    job = DistillJob(model=ModelSpec(TINY_VIT, {**TINY_VIT_KWARGS, "num_classes": 3}),
                     data=DataSpec(kind="folder", root=folder, img_size=32, in_chans=3, mean=(0.4, 0.4, 0.4),
                                   std=(0.3, 0.3, 0.3)))
    model = job.model.build_teacher()
    card = write_card(tmp_path / "cards" / "my-teacher.yaml", name="my-teacher", job=job, state_dict=model,
                      metrics={"top1": 91.0}, speed={})
    byo = job_of("--teacher-card", card, "--data", folder)
    assert byo.model.backbone == TINY_VIT and byo.model.kwargs == job.model.kwargs
    assert byo.teacher_checkpoint == str(card) and byo.data.mean == (0.4, 0.4, 0.4) and byo.data.std == (0.3, 0.3, 0.3)
    assert byo.model.schedule == PAPER_SCHEDULES["deit_flop_matched"].scaled_to(4)
    loaded = teachers.load_state(byo, card)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    # a student card is no teacher
    write_card(tmp_path / "cards" / "student.yaml", name="student", job=byo,
                         state_dict=byo.model.build(), metrics={}, speed={})
    (tmp_path / "cards" / "student.yaml").rename(tmp_path / "student.yaml")
    assert_refused(run_main("--teacher-card", tmp_path / "student.yaml", "--data", folder), tmp_path,
                   "holds a slimmed model (tsm:1,2,3@", "plain backbone")


# ------------------------------------------------------------------------------ the search space of the model

def test_the_search_space_comes_from_the_model(folder):
    from search_spaces import SearchSpace, apply_point, warm_starts

    job = job_of(*TINY, "--num-classes", 3, "--data", folder)
    space = SearchSpace.for_job(job, ("tsm", "drop", "merge"))
    # 4 blocks, 16 patch tokens: positions 1..3, keep grid of 0.1 (one token of 16 is 0.0625), >= 1 token left
    assert (space.depth, space.num_patches, space.stages, space.keep_step) == (4, 16, 3, 0.1)
    assert (space.min_keep, space.max_keep) == (0.4, 0.9)
    points = warm_starts(job, space)
    deit = PAPER_SCHEDULES["deit_flop_matched"].scaled_to(4)
    assert [(p["pos_1"], p["pos_2"], p["pos_3"], p["keep_1"]) for p in points[:3]] == [(*deit.positions, 0.7)] * 3
    for point in points:
        schedule = apply_point(job, point).model.schedule
        assert min(schedule.block_tokens(4, 16)) >= 1
    # the 28 px Fashion-MNIST model keeps the 0.05 grid (49 tokens)
    assert SearchSpace.for_job(job_of("--smoke-test")).keep_step == 0.05


def test_a_reducer_the_model_cannot_serve_is_refused(run_main, folder, tmp_path):
    gap = [*TINY, "--set", "model.kwargs.class_token=false", "--set", "model.kwargs.global_pool=avg"]
    assert_refused(run_main(*gap, "--num-classes", 3, "--data", folder, "--reducers", "tsm,drop", command="pareto"),
                   tmp_path, "--reducers drop cannot serve vit_small_patch16_224", "no class token")


def test_a_folder_smaller_than_a_batch_still_trains(folder):
    from sit_core.data import load_splits, train_loader

    splits = load_splits(job_of(*TINY, "--num-classes", 3, "--data", folder).data)
    assert len(splits.train) == 27
    assert [len(x) for x, _ in train_loader(splits.train, 64)] == [27]         # one short batch, not none
    assert [len(x) for x, _ in train_loader(splits.train, 8)] == [8, 8, 8]     # else full batches only


def test_set_is_the_last_word_even_over_the_smoke_test():
    """--help says --set is applied last: a smoke run of a changed recipe keeps the change."""
    job = job_of("--smoke-test", "--set", "teacher_train.epochs=2", "--set", "train.epochs=3")
    assert job.teacher_train.epochs == 2 and job.train.epochs == 3
    assert job.train.max_steps_per_epoch == 4  # the rest of the smoke shrink stays
