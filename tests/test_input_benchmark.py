"""The input-pipeline benchmark times the real path (ImageFolder + DeiT's training transforms through
a DataLoader) on the images it generates; the figure itself is measured on a quiet machine only."""
from __future__ import annotations

import os

import pytest
import torch

from sit_core import input_benchmark as bench


def test_generated_folder_is_an_image_folder_of_jpegs(tmp_path):
    root = bench.make_folder(str(tmp_path), images=6, classes=3, size=(40, 30))
    files = sorted(os.listdir(tmp_path / "train" / "c0"))
    assert files == ["0.JPEG", "3.JPEG"] and sorted(os.listdir(tmp_path / "val")) == ["c0", "c1", "c2"]
    from PIL import Image
    with Image.open(tmp_path / "train" / "c1" / "1.JPEG") as img:
        assert img.format == "JPEG" and img.size == (40, 30)
    assert bench.mean_kb(root) > 0


def test_every_image_goes_through_the_deit_transforms(tmp_path):
    root = bench.make_folder(str(tmp_path), images=2 * bench.BATCH, size=(64, 48))
    torch.set_num_threads(1)
    [row] = bench.run(root, images=2 * bench.BATCH, workers=[0], img_size=32)
    assert row["images"] == 2 * bench.BATCH and row["timed"] == bench.BATCH  # the warm-up batch is not timed
    assert row["img_s"] > 0 and row["img_s_per_cpu"] == row["img_s"]         # 0 workers: the main process's CPU


def test_too_few_images_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--images", "10"])
    assert e.value.code == 2 and "time at least 64" in capsys.readouterr().err
