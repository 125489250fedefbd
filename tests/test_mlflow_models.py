"""Logged and registered models against a real SQLite MLflow store: a trial's student logged with
its card, registered under aliases, loaded back by MLflow and by `sit_core.load_card("models:/...")`."""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from sit_core.card import load_card, read_card, write_card
from sit_core.config import DistillJob, ModelSpec
from sit_core.files import file_sha256
from sit_core.schedule import SlimSchedule
from sweeps import mlflow_models, tracking

KW = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)


def _student(seed: int):
    job = DistillJob(name="student", model=ModelSpec("vit_tiny_patch16_224", dict(KW), SlimSchedule((1,), 0.5)))
    torch.manual_seed(seed)
    model = job.model.build()
    with torch.no_grad():
        for p in model.parameters():  # off its init: a fresh build cannot pass for it
            p.add_(torch.randn_like(p) * 0.1)
    return job, model.eval()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sweep with two trials whose students are logged as MLflow models, then registered."""
    out = tmp_path_factory.mktemp("store")
    uri = tracking.default_tracking_uri(out)
    exp = tracking.ensure_experiment(uri, "models")
    parent = tracking.start_parent_run(uri, exp, "sweep-m", {}, {})
    runs, models, uris, cards = {}, {}, {}, {}
    cwd = os.getcwd()
    os.chdir(out)  # anything MLflow wrote to the working directory would show up here
    try:
        for i, name in enumerate(["a", "b"]):
            runs[name] = tracking.start_trial_run(uri, exp, parent, name, f"tsm 1@0.5 #{i}", params={"i": i})
            job, models[name] = _student(i)
            with tempfile.TemporaryDirectory() as tmp:
                def write(model_uri, name=name, job=job):
                    card = write_card(Path(tmp, f"tsm-{name}.yaml"), name=f"tsm-{name}", job=job, state_dict=models[name],
                                      metrics={"top1": 50.0 + i}, speed={}, mlflow={"run_id": runs[name], "model_uri": model_uri})
                    cards[name] = file_sha256(card.with_suffix(".pt"))
                    return [card, card.with_suffix(".pt")]
                uris[name] = mlflow_models.log_student(uri, runs[name], models[name], torch.randn(2, 1, 28, 28), write)
        versions = mlflow_models.register_picks(uri, "sweep-m", [runs["a"], runs["b"]],
                                                {"knee": runs["a"], "fastest": runs["b"], "most-accurate": runs["a"]})
    finally:
        os.chdir(cwd)
    return dict(uri=uri, exp=exp, runs=runs, models=models, uris=uris, cards=cards, versions=versions, out=out)


def test_each_run_logged_its_model_in_its_experiment(store):
    client = MlflowClient(store["uri"])
    for name, run_id in store["runs"].items():
        found = mlflow_models.logged_model(store["uri"], run_id)
        assert store["uris"][name] == f"models:/{found.model_id}"
        assert found.experiment_id == store["exp"] and found.source_run_id == run_id
        assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [found.model_id]
    assert sorted(os.listdir(store["out"])) == ["mlartifacts", "mlflow.db"]  # no ./mlruns, no second database


def test_the_logged_model_loads_with_mlflow_and_takes_any_batch(store):
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        for name, model_uri in store["uris"].items():
            mlflow.set_tracking_uri(store["uri"])
            try:
                loaded = mlflow.pytorch.load_model(model_uri)
                signature = mlflow.models.get_model_info(model_uri).signature
            finally:
                mlflow.set_tracking_uri(None)
            assert torch.equal(loaded(x), store["models"][name](x))
            assert signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 28, 28)
            assert signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 10)


def mlflow_models_path(store, model_uri):
    found = MlflowClient(store["uri"]).get_logged_model(model_uri.removeprefix("models:/"))
    return found.artifact_location


def test_load_card_from_the_registry_by_alias_version_and_model_id(store):
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        want = {n: m(x) for n, m in store["models"].items()}
        for uri, name in [("models:/sweep-m@knee", "a"), ("models:/sweep-m@fastest", "b"),
                          ("models:/sweep-m@most-accurate", "a"), (f"models:/sweep-m/{store['versions'][store['runs']['b']]}", "b"),
                          (store["uris"]["b"], "b")]:
            assert torch.equal(load_card(uri, tracking_uri=store["uri"])(x), want[name]), uri


def test_card_and_run_point_at_each_other(store, tmp_path):
    client = MlflowClient(store["uri"])
    for name, run_id in store["runs"].items():
        card_dir = mlflow.artifacts.download_artifacts(
            artifact_uri=mlflow_models.card_uri(mlflow_models_path(store, store["uris"][name]), f"tsm-{name}").rsplit("/", 1)[0],
            dst_path=str(tmp_path / name), tracking_uri=store["uri"])
        card = read_card(Path(card_dir, f"tsm-{name}.yaml"))
        assert card["mlflow"] == {"run_id": run_id, "model_uri": store["uris"][name]}
        assert card["weights"]["sha256"] == store["cards"][name]
        version = client.get_model_version("sweep-m", str(store["versions"][run_id]))
        assert version.run_id == run_id


def test_registry_holds_one_version_per_run_and_the_aliases(store):
    client = MlflowClient(store["uri"], registry_uri=store["uri"])
    registered = client.get_registered_model("sweep-m")
    runs = store["runs"]
    version = {name: str(store["versions"][run_id]) for name, run_id in runs.items()}
    assert {a: str(v) for a, v in registered.aliases.items()} == {"knee": version["a"], "fastest": version["b"],
                                                                   "most-accurate": version["a"]}
    # registering again (a resumed sweep, a second export) adds no version; an alias can move
    again = mlflow_models.register_picks(store["uri"], "sweep-m", [runs["b"]], {"knee": runs["b"]})
    assert again == {runs["b"]: store["versions"][runs["b"]]}
    assert len(client.search_model_versions("name = 'sweep-m'")) == 2
    assert str(client.get_model_version_by_alias("sweep-m", "knee").version) == version["b"]
    mlflow_models.register_picks(store["uri"], "sweep-m", [], {"knee": runs["a"]})  # put it back for the other tests
    # tags on a version registered before (what the sweep measured after logging the model)
    mlflow_models.register_picks(store["uri"], "sweep-m", [runs["b"]], {},
                                 tags={runs["b"]: {"sit.latency_measured_ms": "1.25"}})
    assert client.get_model_version("sweep-m", version["b"]).tags["sit.latency_measured_ms"] == "1.25"
    assert len(client.search_model_versions("name = 'sweep-m'")) == 2
    with pytest.raises(ValueError, match="alias"):
        mlflow_models.register_picks(store["uri"], "sweep-m", [], {"v3": runs["a"]})


def test_logging_again_keeps_the_first_model(store):
    job, other = _student(7)
    again = mlflow_models.log_student(store["uri"], store["runs"]["a"], other, torch.randn(2, 1, 28, 28),
                                      lambda uri: pytest.fail("a logged run must not write a second card"))
    assert again == store["uris"]["a"]


def test_budget_alias_is_a_valid_alias():
    assert mlflow_models.budget_alias(12.5) == "budget-12_5ms" and mlflow_models.budget_alias(30) == "budget-30ms"


def test_sit_core_does_not_import_mlflow():
    code = ("import sys, sit_core, timm; sit_core.load_card; timm.create_model('sit_deit_tiny', img_size=32); "
            "assert 'mlflow' not in sys.modules, 'sit_core imported mlflow'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
