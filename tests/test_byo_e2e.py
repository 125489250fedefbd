"""Your own ViT, end to end, as a user runs it: a timm ViT that is no preset (register tokens, 32 px),
a checkpoint trained for another class count, an image folder -> `pareto.py --finetune-teacher`
(a new head trained on the folder, cached) -> smoke sweep -> cards -> `sit_core.load_card` gives
back the trained students exactly."""
from __future__ import annotations

import json
import tempfile
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch

from conftest import TINY_VIT, TINY_VIT_KWARGS, TINY_VIT_SETS, make_image_folder
from test_sweep_e2e import assert_ok, kill_processes_using, run_pareto, sweep_env

pytestmark = pytest.mark.slow


@pytest.fixture
def private_tmp():
    path = tempfile.mkdtemp(prefix="sit-byo-", dir="/tmp")  # short: Ray's socket paths
    try:
        yield path
    finally:
        kill_processes_using(path)
        shutil.rmtree(path, ignore_errors=True)


def test_own_vit_from_a_checkpoint_with_another_head_and_an_image_folder_to_cards(tmp_path, private_tmp, monkeypatch):
    from sit_core import card_job, load_card, read_card, teachers
    from sit_core.config import DistillJob
    from sit_core.data import load_splits
    from sit_core.files import file_sha256

    data = make_image_folder(tmp_path / "pets")
    torch.manual_seed(0)
    user = timm.create_model(TINY_VIT, **TINY_VIT_KWARGS, num_classes=10)  # "ImageNet" weights: 10 classes
    checkpoint = tmp_path / "my_vit.pth"
    torch.save({"model": user.state_dict(), "epoch": 299}, checkpoint)     # timm/DeiT's usual wrapper
    out, cache = tmp_path / "out", tmp_path / "cache"

    t0 = time.time()
    result = run_pareto(["--model", TINY_VIT, *TINY_VIT_SETS, "--img-size", "32", "--num-classes", "3",
                         "--data", data, "--teacher-checkpoint", str(checkpoint), "--finetune-teacher", "1",
                         "--smoke-test", "--trials", "2", "--out", str(out)],
                        sweep_env(private_tmp, str(cache)), tmp_path / "pareto.log")
    print(f"byo sweep: {time.time() - t0:.0f}s")
    assert_ok(result)
    assert f"teacher: fine-tuning (head) teacher checkpoint {checkpoint}" in result.stdout

    # the fine-tuned teacher: cached by its config hash, with its record
    weights = list((cache / "teachers").glob("*.pt"))
    assert len(weights) == 1
    record = json.loads(weights[0].with_suffix(".json").read_text())
    base = DistillJob.from_dict(json.loads(Path(out, "sweep.json").read_text())["base_job"])
    assert record["teacher_key"] == base.teacher_key() and record["sha256"] == file_sha256(weights[0])
    assert record["start"]["weights"] == {"checkpoint": file_sha256(checkpoint)}
    assert record["start"]["head_classes"] == 10 and not record["start"]["head_trained"]
    assert "--finetune-teacher 1" in record["command"] and 0 <= record["metrics"]["val_top1"] <= 100
    monkeypatch.setenv("SIT_CACHE_DIR", str(cache))
    found = teachers.find(base)  # the next run finds it instead of fine-tuning again
    assert found is not None and found.source == "cache" and found.path == weights[0]
    tuned = torch.load(weights[0], weights_only=True)
    assert tuned["head.weight"].shape == (3, 64)
    for key, value in user.state_dict().items():  # head-only fine-tune: the rest is the user's
        if not key.startswith("head."):
            assert torch.equal(tuned[key], value), key

    # cards: the students, rebuilt exactly from the card alone
    table = pd.read_csv(Path(out, "pareto.csv"), dtype={"trial_id": str})
    cards = sorted(Path(out, "cards").glob("*.yaml"))
    assert cards and len(cards) == int(table["pareto"].sum())
    images = torch.stack([x for x, _ in (load_splits(base.data).test[i] for i in range(6))])
    for card in cards:
        job = card_job(card)
        assert job.model.backbone == TINY_VIT and job.model.kwargs["reg_tokens"] == 4
        assert job.model.kwargs["num_classes"] == 3 and not job.model.schedule.is_identity
        row = table[table["run_id"] == read_card(card)["mlflow"]["run_id"]].iloc[0]
        loaded = load_card(card)
        assert loaded.num_prefix_tokens == 5 and loaded.slim_schedule == job.model.schedule
        rebuilt = job.model.build(pretrained=False)
        rebuilt.load_state_dict(torch.load(Path(row["checkpoint"], "model.pt"), weights_only=True), strict=True)
        with torch.no_grad():
            logits = loaded(images)
            assert logits.shape == (6, 3) and torch.equal(logits, rebuilt.eval()(images)), card
