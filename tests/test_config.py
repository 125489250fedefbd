"""sit_core.config: one override() for every change to a job, strict round trips, one-line errors."""
from __future__ import annotations

import math

import pytest

from sit_core.config import DistillJob, LossWeights, SpeedSpec, TrainSpec, override
from sit_core.presets import PRESETS, get_preset, smoke
from sit_core.schedule import SlimSchedule


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_a_dict(name):
    job = get_preset(name)
    assert DistillJob.from_dict(job.to_dict()) == job


def test_override_changes_only_what_it_names_and_validates():
    job = get_preset("fmnist-cpu")
    changed = override(job, {"train.lr": 3e-4, "loss.tau": 2.0, "model.schedule": "1,3@0.5",
                             "model.kwargs.drop_path_rate": 0.1, "data.val_subset": 512})
    assert changed.train.lr == 3e-4 and changed.loss.tau == 2.0 and changed.data.val_subset == 512
    assert changed.model.schedule == SlimSchedule((1, 3), 0.5)
    assert changed.model.kwargs["drop_path_rate"] == 0.1
    assert job.train.lr != 3e-4 and "drop_path_rate" not in job.model.kwargs  # the original is untouched
    rest = {k: v for k, v in changed.to_dict().items() if k not in ("train", "loss", "model", "data")}
    assert rest == {k: v for k, v in job.to_dict().items() if k not in ("train", "loss", "model", "data")}
    # a None for a timm keyword removes it
    assert "drop_path_rate" not in override(changed, {"model.kwargs.drop_path_rate": None}).model.kwargs


@pytest.mark.parametrize("path, match", [
    ("train.learning_rate", "unknown job field 'train.learning_rate'.*valid fields here are .*lr"),
    ("trian.lr", "unknown job field 'trian'"),
    ("model.backbone.x", "unknown job field"),
])
def test_override_names_unknown_fields(path, match):
    with pytest.raises(ValueError, match=match):
        override(get_preset("fmnist-cpu"), {path: 1})


@pytest.mark.parametrize("changes, match", [
    ({"train.lr": float("nan")}, "lr=nan must be a finite number"),
    ({"train.lr": float("inf")}, "lr=inf must be a finite number"),
    ({"train.lr": 0.0}, "lr=0.0 must be > 0"),
    ({"loss.lambda_token": -1.0}, "lambda_token=-1.0 must be >= 0"),
    ({"loss.tau": float("nan")}, "tau=nan"),
    ({"train.min_lr": 1.0}, "min_lr=1.0 must not exceed lr"),
    ({"train.cooldown_epochs": 4}, "cooldown_epochs=4"),
    ({"train.max_steps_per_epoch": 0}, "max_steps_per_epoch=0"),
    ({"speed.dtype": "float8"}, "float8"),
    ({"model.schedule": "2,4@1.5"}, "keep ratio 1.5"),
])
def test_bad_values_are_one_line_errors(changes, match):
    with pytest.raises(ValueError, match=match) as info:
        override(get_preset("fmnist-cpu"), changes)
    assert "\n" not in str(info.value)


def test_from_dict_refuses_unknown_sections_and_fields():
    d = get_preset("fmnist-cpu").to_dict()
    with pytest.raises(ValueError, match="unknown job field\\(s\\) trainer"):
        DistillJob.from_dict({**d, "trainer": {}})
    with pytest.raises(ValueError, match="unknown train field\\(s\\) lrr"):
        DistillJob.from_dict({**d, "train": {**d["train"], "lrr": 1}})


def test_teacher_key_ignores_what_cannot_change_the_teachers_weights():
    job = get_preset("fmnist-cpu")
    same = override(job, {"model.schedule": "1@0.5", "train.lr": 1e-4, "loss.tau": 3.0, "data.val_subset": 100,
                          "data.test_subset": 100, "speed.batch_size": 1})
    assert same.teacher_key() == job.teacher_key()
    for change in ({"teacher_train.epochs": 3}, {"model.kwargs.embed_dim": 48, "model.kwargs.num_heads": 2},
                   {"data.train_subset": 1000}, {"data.augment": False}):
        assert override(job, change).teacher_key() != job.teacher_key(), change


def test_smoke_is_an_override_of_the_preset():
    job = smoke(get_preset("fmnist-cpu"))
    assert job.model.kwargs["depth"] == 4 and job.train.max_steps_per_epoch == 4 and job.data.train_subset == 1024
    assert job.model.geometry().num_patches == 49


def test_geometry_comes_from_the_model():
    assert tuple(get_preset("deit-small-imagenet").model.geometry()) == (12, 196, 1, 384)
    assert get_preset("lvvit-large-imagenet").model.geometry().num_patches == (288 // 16) ** 2


def test_train_spec_cosine_epochs_leave_the_cooldown_at_min_lr():
    spec = TrainSpec(epochs=135, cooldown_epochs=10)
    assert spec.cosine_epochs == 125 and math.isclose(LossWeights().tau, 1.0) and SpeedSpec().device == "cpu"
