"""Cards: write -> YAML on disk -> load_card rebuilds the exact model; bad cards fail loudly."""
import shutil

import pytest
import timm
import torch
import yaml

from sit_core import FRDDistiller, SlimSchedule, card_job, load_card, read_card, write_card
from sit_core.card import FORMAT
from sit_core.config import DistillJob, ModelSpec, override

KW = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=48, depth=4, num_heads=2)
METRICS = {"val_top1": 81.5, "test_top1": None, "latency_ms": 1.25, "img_s": 5120, "gmacs": 0.01, "params": 1.2e5}
SPEED = {"protocol": "cpu, float32, batch 8", "device": "cpu", "dtype": "float32", "batch": 8, "threads": 1,
         "img_size": (28, 28), "torch_version": torch.__version__}


def _spec(reducer="tsm"):
    return ModelSpec("vit_tiny_patch16_224", dict(KW), SlimSchedule((1, 2), 0.5, reducer=reducer))


def _job(reducer="tsm", **changes):
    return override(DistillJob(name="student", model=_spec(reducer)), changes)


def _trained(spec):
    """The student with every weight moved off its init, so a fresh build cannot pass for it."""
    torch.manual_seed(0)
    model = spec.build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _write(tmp_path, job, model, **kw):
    return write_card(tmp_path / "cards" / "student.yaml", name="student", job=job,
                      state_dict=model.state_dict(), metrics=METRICS, speed=SPEED, **kw)


@pytest.mark.parametrize("reducer", ["tsm", "drop", "merge"])
def test_round_trip_gives_identical_logits_and_the_same_job(tmp_path, reducer):
    job = _job(reducer, **{"train.lr": 3e-4, "loss.tau": 2.5, "data.val_subset": 100})
    model = _trained(job.model)
    path = _write(tmp_path, job, model)
    x = torch.randn(3, 1, 28, 28)
    loaded = load_card(path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert card_job(path) == job  # the whole job comes back, not hand-picked fields


def test_yaml_is_plain_and_complete(tmp_path):
    job = _job(name="knee")
    path = write_card(tmp_path, name="knee", job=job, state_dict=_trained(job.model),
                      metrics=METRICS, speed=SPEED, mlflow={"tracking_uri": "file:./mlruns", "run_id": "abc",
                                                            "experiment": "pareto"})
    assert path == tmp_path / "knee.yaml"
    card = yaml.safe_load(path.read_text())
    assert card["format"] == FORMAT and card["name"] == "knee"
    assert list(card)[:3] == ["format", "name", "job"]  # written in schema order, not sorted
    assert card["job"]["model"]["schedule"] == {"positions": [1, 2], "keep": [0.5, 0.5], "reducer": "tsm"}
    assert card["job"]["model"]["kwargs"] == KW
    assert card["job"]["loss"]["lambda_token"] == 2.0 and card["job"]["train"]["rtsm_lr_mult"] == 5.0
    assert card["job"]["data"]["kind"] == "fashion_mnist" and card["job"]["data"]["img_size"] == 28
    assert card["metrics"]["img_s"] == 5120.0 and card["metrics"]["test_top1"] is None
    assert card["speed"]["img_size"] == [28, 28] and card["mlflow"]["run_id"] == "abc"
    assert card["weights"]["file"] == "knee.pt" and len(card["weights"]["sha256"]) == 64
    assert card["created"].endswith("+00:00")
    assert read_card(path) == card


def test_moved_card_directory_still_loads(tmp_path):
    job = _job()
    model = _trained(job.model)
    path = _write(tmp_path, job, model)
    moved = shutil.move(str(path.parent), str(tmp_path / "elsewhere"))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_card(f"{moved}/student.yaml")(x), model(x))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_existing_weights_file_is_copied_beside_the_card(tmp_path, suffix):
    job = _job()
    model = _trained(job.model)
    source = tmp_path / f"best{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(model.state_dict(), source)
    else:
        torch.save(model.state_dict(), source)
    path = write_card(tmp_path / "out" / "c.yaml", name="student", job=job, weights_path=source, metrics={}, speed={})
    assert read_card(path)["weights"]["file"] == f"student{suffix}"
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_card(path)(x), model(x))


def test_tampered_weights_fail_the_sha_check(tmp_path):
    job = _job()
    path = _write(tmp_path, job, _trained(job.model))
    weights = path.parent / read_card(path)["weights"]["file"]
    torch.save(job.model.build().state_dict(), weights)  # a valid state_dict, just not the card's
    with pytest.raises(ValueError, match="does not match the card's sha256"):
        load_card(path)


def test_missing_field_and_wrong_format_are_named(tmp_path):
    job = _job()
    path = _write(tmp_path, job, _trained(job.model))
    card = read_card(path)
    for key, match in (("weights", "required field 'weights'"), ("job", "required field 'job'")):
        broken = {k: v for k, v in card.items() if k != key}
        path.write_text(yaml.safe_dump(broken))
        with pytest.raises(ValueError, match=match):
            read_card(path)
    path.write_text(yaml.safe_dump({**card, "weights": {"file": "student.pt"}}))
    with pytest.raises(ValueError, match="weights.sha256"):
        load_card(path)
    path.write_text(yaml.safe_dump({**card, "format": "sit-card/1"}))
    with pytest.raises(ValueError, match="sit-card/1"):
        read_card(path)
    path.write_text(yaml.safe_dump({"some": "other yaml"}))
    with pytest.raises(ValueError, match="not a SiT card"):
        read_card(path)


def test_rtsm_and_mismatched_weights_are_refused_before_writing(tmp_path):
    job = _job()
    student = _trained(job.model)
    distiller = FRDDistiller(student, timm.create_model(job.model.backbone, **KW))
    out = tmp_path / "cards"
    with pytest.raises(ValueError, match="RTSM"):
        write_card(out / "s.yaml", name="s", job=job, state_dict=distiller.state_dict(), metrics={}, speed={})
    with pytest.raises(ValueError, match="do not fit"):  # a plain-ViT state_dict lacks the reducers
        write_card(out / "s.yaml", name="s", job=job, state_dict=distiller.teacher, metrics={}, speed={})
    assert not out.exists()  # refused before anything, even the directory, was made
    # The distiller's student is the inference model: that one is accepted and loads to the same logits.
    loaded = load_card(write_card(out / "s.yaml", name="s", job=job, state_dict=distiller.student, metrics={}, speed={}))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), student.eval()(x))


def test_failed_write_leaves_no_half_card(tmp_path, monkeypatch):
    job = _job()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(yaml, "dump", crash)  # fails inside the YAML write
    with pytest.raises(OSError, match="disk full"):
        _write(tmp_path, job, _trained(job.model))
    names = [p.name for p in (tmp_path / "cards").iterdir()]
    assert "student.yaml" not in names and not [n for n in names if n.endswith(".tmp")]
