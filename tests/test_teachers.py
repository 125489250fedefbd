"""The shipped default teacher: found by its config hash, loaded only if its sha256 matches, and as
accurate as its record says; the record's recipe is the preset's (a moved default would orphan it)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from sit_core import teachers
from sit_core.data import load_splits
from sit_core.presets import get_preset

SHIPPED = teachers.SHIPPED_DIR / "fmnist-cpu-teacher.pt"


@pytest.fixture(scope="module")
def record():
    return json.loads(SHIPPED.with_suffix(".json").read_text())


def test_the_default_preset_finds_the_shipped_teacher_without_training(record):
    found = teachers.find(get_preset("fmnist-cpu"))
    assert found is not None and found.source == "shipped" and found.path == SHIPPED
    assert found.key == record["teacher_key"] == get_preset("fmnist-cpu").teacher_key()
    assert found.metrics["test_top1"] >= 90.0  # the strong-teacher bar


def test_the_record_holds_the_presets_recipe_field_by_field(record):
    from sit_core.config import DISTILLATION_ONLY

    job = get_preset("fmnist-cpu")
    recipe = {k: v for k, v in record["recipe"].items() if k not in DISTILLATION_ONLY}  # no TSM in a teacher
    assert recipe == {k: v for k, v in dataclasses.asdict(job.teacher_train).items() if k in recipe}
    assert record["kwargs"] == job.model.kwargs and record["backbone"] == job.model.backbone
    data = {k: v for k, v in record["data"].items() if k not in ("val_subset", "test_subset")}
    assert data == {k: v for k, v in dataclasses.asdict(job.data).items() if k in data}
    assert record["command"].startswith("python sweeps/train_teacher.py") and "--ship" in record["command"]


def test_a_changed_byte_is_refused_before_loading(tmp_path, monkeypatch):
    shutil.copy(SHIPPED, tmp_path / SHIPPED.name)
    shutil.copy(SHIPPED.with_suffix(".json"), tmp_path / SHIPPED.with_suffix(".json").name)
    blob = bytearray((tmp_path / SHIPPED.name).read_bytes())
    blob[-10] ^= 0xFF
    (tmp_path / SHIPPED.name).write_bytes(bytes(blob))
    monkeypatch.setattr(teachers, "SHIPPED_DIR", tmp_path)
    with pytest.raises(ValueError, match="do not match the sha256"):
        teachers.find(get_preset("fmnist-cpu"))


def test_the_shipped_teacher_scores_its_recorded_validation_accuracy(record):
    job = get_preset("fmnist-cpu")
    model = job.model.build_teacher()
    model.load_state_dict(teachers.load_state(job, SHIPPED))
    model.eval()
    val = load_splits(job.data).val  # the validation images it was scored on when trained
    correct = 0
    with torch.inference_mode():
        for x, y in DataLoader(val, batch_size=512):
            correct += int((model(x).argmax(-1) == y).sum())
    assert 100.0 * correct / len(val) == pytest.approx(record["metrics"]["val_top1"], abs=0.05)
