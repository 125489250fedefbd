"""Deployable exports: a slimmed student as a torch.export program and as ONNX, each run back from
disk (torch.export.load, ONNX Runtime) and checked against the PyTorch logits at two batch sizes."""
import onnxruntime
import pytest
import torch

from sit_core.config import ModelSpec
from sit_core.schedule import SlimSchedule
from sweeps import deploy

KW = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=3, num_heads=2)


@pytest.fixture(scope="module")
def student():
    torch.manual_seed(0)
    model = ModelSpec("vit_tiny_patch16_224", dict(KW), SlimSchedule((1, 2), 0.6)).build().eval()
    return model


def test_both_formats_reproduce_the_logits_at_any_batch_size(student, tmp_path):
    example = torch.randn(2, 1, 28, 28)
    out = deploy.export(student, example, tmp_path / "tsm-3", ("pt2", "onnx"))
    assert out["pt2"]["file"] == "tsm-3.pt2" and out["onnx"]["file"] == "tsm-3.onnx"
    assert all(v["max_abs_diff"] <= deploy.ATOL for v in out.values())
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        want = student(x)
        program = torch.export.load(tmp_path / "tsm-3.pt2").module()
        torch.testing.assert_close(program(x), want, rtol=deploy.RTOL, atol=deploy.ATOL)
        session = onnxruntime.InferenceSession(str(tmp_path / "tsm-3.onnx"), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
        torch.testing.assert_close(got, want, rtol=deploy.RTOL, atol=deploy.ATOL)


def test_an_export_that_disagrees_is_refused_and_removed(student, tmp_path, monkeypatch):
    real = deploy._pt2

    def off_by_one(model, example, path):  # a program whose logits are wrong
        run = real(model, example, path)
        return lambda x: run(x) + 1.0

    monkeypatch.setattr(deploy, "_pt2", off_by_one)
    with pytest.raises(ValueError, match="differ from the PyTorch model"):
        deploy.export(student, torch.randn(2, 1, 28, 28), tmp_path / "bad", ("pt2",))
    assert not (tmp_path / "bad.pt2").exists()
    with pytest.raises(ValueError, match="formats"):
        deploy.export(student, torch.randn(2, 1, 28, 28), tmp_path / "x", ("tflite",))
