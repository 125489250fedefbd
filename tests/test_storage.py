"""--out as a directory or a URI through pyarrow filesystems; SQLite kept on the driver's disk; a
local --out refused where the cluster's other nodes cannot see it.

URIs are tested with `file://` (pyarrow's LocalFileSystem behind the same URI code path s3:// and
gs:// take; no S3-compatible server is installable offline) and with pyarrow's GcsFileSystem built
offline (anonymous) for the URI a checkpoint reports."""
from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from sweeps import storage

ROOT = Path(__file__).resolve().parents[1]


def test_uris_stay_uris_and_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.normalise("s3://bucket/runs/x/") == "s3://bucket/runs/x"  # os.path.abspath would mangle it
    assert storage.normalise("gs://b/x") == "gs://b/x"
    assert storage.normalise("runs/x") == str(tmp_path / "runs" / "x")
    assert storage.join("s3://bucket/runs/x", "ray", "sweep") == "s3://bucket/runs/x/ray/sweep"
    assert storage.join("/abs/x", "ray") == "/abs/x/ray"
    assert storage.local_path("file:///abs/x") == "/abs/x" and storage.local_path("/abs/x") == "/abs/x"
    assert storage.local_path("s3://bucket/x") is None


def test_publish_copies_files_trees_and_consistent_sqlite_snapshots_to_a_uri(tmp_path):
    local, out = tmp_path / "local", f"file://{tmp_path}/shared/out"
    (local / "cards").mkdir(parents=True)
    (local / "cards" / "tsm-1.yaml").write_text("name: tsm-1\n")
    (local / "pareto.csv").write_text("a,b\n1,2\n")
    with sqlite3.connect(local / "optuna.db") as db:  # held open while it is published, as in a sweep
        db.execute("create table t (x)")
        db.execute("insert into t values (42)")
        db.commit()
        copied = storage.publish(str(local), out, ["pareto.csv", "cards", "optuna.db", "missing.png"])
    assert copied == ["pareto.csv", "cards", "optuna.db"]
    shared = tmp_path / "shared" / "out"
    assert (shared / "pareto.csv").read_text() == "a,b\n1,2\n"
    assert (shared / "cards" / "tsm-1.yaml").read_text() == "name: tsm-1\n"
    with sqlite3.connect(shared / "optuna.db") as db:
        assert db.execute("select x from t").fetchall() == [(42,)]
    assert storage.exists(storage.join(out, "cards", "tsm-1.yaml")) and not storage.exists(storage.join(out, "nope"))
    assert storage.read_text(storage.join(out, "pareto.csv")) == "a,b\n1,2\n"
    assert storage.publish(str(shared), str(shared), ["pareto.csv"]) == []  # --out is the local dir: nothing to copy


def test_a_new_driver_gets_the_published_databases_back_on_resume(tmp_path):
    out = f"file://{tmp_path}/shared"
    (tmp_path / "shared").mkdir()
    with sqlite3.connect(tmp_path / "shared" / "mlflow.db") as db:
        db.execute("create table runs (id)")
    fresh = tmp_path / "fresh-head"
    fresh.mkdir()
    assert storage.restore_missing(out, str(fresh)) == ["mlflow.db"]  # optuna.db was never published
    assert (fresh / "mlflow.db").exists()
    assert storage.restore_missing(out, str(fresh)) == []  # a local copy is never overwritten


def test_staging_dir_is_out_on_local_disk_else_a_stable_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SIT_CACHE_DIR", str(tmp_path / "cache"))
    assert storage.staging_dir(str(tmp_path / "out"), "sw") == str(tmp_path / "out")
    a = storage.staging_dir("s3://bucket/a", "sw")
    assert a.startswith(str(tmp_path / "cache" / "sweeps" / "sw-"))
    assert storage.staging_dir("s3://bucket/a", "sw") == a != storage.staging_dir("s3://bucket/b", "sw")
    monkeypatch.setattr(storage, "mount_type", lambda path: "nfs4")  # --out on EFS: SQLite must not go there
    assert storage.staging_dir(str(tmp_path / "out"), "sw").startswith(str(tmp_path / "cache"))


def test_mount_types_come_from_proc_mounts():
    fstype = storage.mount_type("/")
    assert fstype and not storage.is_network_fs(fstype)
    assert storage.is_network_fs("nfs4") and storage.is_network_fs("fuse.gcsfuse") and not storage.is_network_fs("ext4")


def test_optuna_storage_urls(tmp_path, monkeypatch):
    assert storage.check_sqlite_url(f"sqlite:///{tmp_path}/o.db") == f"sqlite:///{tmp_path}/o.db"
    assert storage.check_sqlite_url("postgresql://u@db:5432/optuna").startswith("postgresql://")
    for bad, message in [("optuna.db", "must be a database URL"), ("sqlite:///rel.db", "give an absolute file"),
                         ("http://x", "must be a database URL")]:
        with pytest.raises(ValueError, match=message):
            storage.check_sqlite_url(bad)
    monkeypatch.setattr(storage, "mount_type", lambda path: "nfs4")
    with pytest.raises(ValueError, match="network filesystem \\(nfs4\\): SQLite locks unreliably"):
        storage.check_sqlite_url(f"sqlite:///{tmp_path}/o.db")


@pytest.mark.parametrize("out, alive, can_add, confirmed, fstype, unseen, problem", [
    ("/local/out", 1, False, False, "ext4", [], None),                          # one node, nothing to share with
    ("s3://b/out", 5, True, False, None, [], None),                             # object storage: every node sees it
    ("/local/out", 2, False, False, "ext4", [], None),                          # two live nodes both see it: verified
    ("/local/out", 2, False, True, "ext4", ["10.0.0.2"], "not visible from 1 of the cluster's 2 nodes"),
    ("/local/out", 1, True, False, "ext4", [], "the autoscaler can add nodes that will not see it"),
    ("/mnt/shared/out", 1, True, False, "nfs4", [], None),                      # an NFS/EFS mount
    ("/local/out", 1, True, True, "ext4", [], None),                            # --shared-out
    ("file:///local/out", 1, True, False, "ext4", [], "the autoscaler can add nodes"),
])
def test_shared_out_decisions(out, alive, can_add, confirmed, fstype, unseen, problem):
    found = storage.shared_out_problem(out, alive=alive, can_add_nodes=can_add, confirmed=confirmed, fstype=fstype,
                                       unseen=unseen)
    assert (found is None) if problem is None else (problem in found and "\n" not in found)


def test_every_live_node_is_asked_whether_it_sees_out(ray_local, tmp_path):
    from sweeps.cluster import Capacity, NodeType

    assert storage._nodes_not_seeing(str(tmp_path), timeout_s=120) == []
    assert not list(tmp_path.iterdir())  # the marker is gone
    two = Capacity([NodeType("live-0", {"CPU": 1.0}, 2)], alive=2)
    storage.check_shared_out(str(tmp_path / "out"), two)  # both "nodes" are this machine: seen, no error
    grow = Capacity([NodeType("head", {"CPU": 1.0}, 1, head=True), NodeType("gpu", {"GPU": 1.0}, 4)],
                    autoscaling=True, alive=1)
    with pytest.raises(ValueError, match="--shared-out"):
        storage.check_shared_out(str(tmp_path / "out"), grow)
    storage.check_shared_out(str(tmp_path / "out"), grow, confirmed=True)
    assert not (tmp_path / "out").exists()  # checking wrote nothing


def test_checkpoint_locations_keep_their_scheme(tmp_path):
    from ray.train import Checkpoint

    local = Checkpoint(str(tmp_path))
    assert storage.checkpoint_location(local) == str(tmp_path)
    gcs = Checkpoint("bucket/runs/ray/sw/t/checkpoint_000001", filesystem=pafs.GcsFileSystem(anonymous=True))
    assert storage.checkpoint_location(gcs) == "gs://bucket/runs/ray/sw/t/checkpoint_000001"
    assert storage.checkpoint_location(None) is None
    # a multi-worker trial's checkpoint, as Tune's result names it (no scheme), on its storage
    assert storage.on_storage("s3://b/runs/ray", "b/runs/ray/trial-x/checkpoint_1") == "s3://b/runs/ray/trial-x/checkpoint_1"
    assert storage.on_storage(str(tmp_path), f"{tmp_path}/c") == f"{tmp_path}/c"
    assert storage.on_storage("s3://b/runs", None) is None


def test_plan_keeps_a_uri_out_and_puts_sqlite_on_local_disk(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from sweeps import pareto

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SIT_CACHE_DIR", str(tmp_path / "cache"))
    out = f"file://{tmp_path}/shared/out"
    plan = pareto.make_plan(pareto.build_parser().parse_args(["--smoke-test", "--out", out]))
    assert plan.out == out and plan.storage == f"{out}/ray"
    assert plan.local_dir.startswith(str(tmp_path / "cache" / "sweeps"))
    assert plan.optuna_storage == f"sqlite:///{plan.local_dir}/optuna.db"
    assert plan.tracking_uri == f"sqlite:///{plan.local_dir}/mlflow.db"
    assert plan.concurrent is None  # decided from the cluster once Ray runs
    assert not (tmp_path / "shared").exists()
    (tmp_path / "shared" / "out" / "ray" / plan.name).mkdir(parents=True)  # an earlier sweep of that name
    with pytest.raises(ValueError, match="already exists"):
        pareto.make_plan(pareto.build_parser().parse_args(["--smoke-test", "--out", out]))
    resumed = pareto.make_plan(pareto.build_parser().parse_args(
        ["--smoke-test", "--out", out, "--resume", "--optuna-storage", "postgresql://db/optuna"]))
    assert resumed.resume and resumed.optuna_storage == "postgresql://db/optuna"


def test_export_reads_a_sweep_from_a_uri(tmp_path):
    sys.path.insert(0, str(ROOT))
    from sweeps import export

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "sweep.json").write_text(json.dumps({"name": "sw"}))
    assert export._recorded_sweep(f"file://{tmp_path}/out") == {"name": "sw"}
    with pytest.raises(ValueError, match="holds no sweep"):
        export._recorded_sweep(f"file://{tmp_path}/none")
    assert storage.fetch(f"file://{tmp_path}/out/sweep.json", "unused") == f"{tmp_path}/out/sweep.json"


def test_fetch_downloads_what_is_not_local(tmp_path, monkeypatch):
    (tmp_path / "model.pt").write_bytes(b"weights")
    monkeypatch.setattr(storage, "local_path", lambda loc: None)  # treat file:// as remote: the download path
    got = storage.fetch(f"file://{tmp_path}/model.pt", str(tmp_path / "dl" / "model.pt"))
    assert got == str(tmp_path / "dl" / "model.pt") and Path(got).read_bytes() == b"weights"
