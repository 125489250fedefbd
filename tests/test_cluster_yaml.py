"""cluster.yaml passes the checks `ray up` makes before it talks to AWS, and keeps our promises.

`ray up` runs ray.autoscaler._private.commands._bootstrap_config: prepare_config (merge with
the provider's defaults.yaml), then validate_config (jsonschema against ray-schema.json plus
cross-field checks), then the AWS bootstrap, which needs credentials and is not run here.
"""

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_up_validation(config: dict) -> None:
    """The schema on the file as written, then Ray's own prepare + validate, as `ray up` does."""
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    validate_config(prepare_config(copy.deepcopy(config)))


def all_commands(config: dict) -> list[str]:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands",
            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"]
    return [cmd for key in keys for cmd in config.get(key, [])]


def test_validates_against_rays_schema(config):
    ray_up_validation(config)


@pytest.mark.parametrize("break_it, error", [
    (lambda c: c.pop("provider"), jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu_1x_a10g"].update(min_worker=0),  # typo
     jsonschema.ValidationError),
    (lambda c: c["available_node_types"]["gpu_1x_a10g"]["resources"].update(GPU=-1),
     jsonschema.ValidationError),
    (lambda c: c.update(head_node_type="no_such_type"), ValueError),
])
def test_a_broken_copy_fails_validation(config, break_it, error):
    broken = copy.deepcopy(config)
    break_it(broken)
    with pytest.raises(error):
        ray_up_validation(broken)


def test_has_an_autoscaling_gpu_worker_type(config):
    head = config["head_node_type"]
    gpu_types = {name: t for name, t in config["available_node_types"].items()
                 if name != head and t["resources"].get("GPU", 0) > 0}
    assert gpu_types, "no GPU worker node type"
    assert all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in gpu_types.values())
    assert config["available_node_types"][head]["resources"].get("GPU", 0) == 0


def test_has_an_optional_serving_node_type_for_latency(config):
    """`--latency-resource inference_cpu` reaches a node type that advertises it, starts on demand and
    takes no training (CPU 0: trials and workers need CPUs; latency tasks ask for none)."""
    serving = {name: t for name, t in config["available_node_types"].items()
               if t["resources"].get("inference_cpu", 0) > 0}
    assert list(serving) == ["serving_cpu"]
    node = serving["serving_cpu"]
    assert node["resources"]["CPU"] == 0 and node["resources"].get("GPU", 0) == 0
    assert node["min_workers"] == 0 and node["max_workers"] >= 1
    assert "--latency-resource inference_cpu" in CLUSTER_YAML.read_text()


def test_setup_installs_this_project_with_the_constraints_file(config):
    setup = " ; ".join(config["setup_commands"])
    assert "git clone" in setup
    assert re.search(r"pip install -c constraints\.txt -e \.", setup)
    assert "/mnt/shared" in setup  # the shared storage Ray Tune's storage_path needs


def test_region_is_set_consistently(config):
    region = config["provider"]["region"]
    assert f'SIT_AWS_REGION="{region}"' in config["setup_commands"][0]
    assert config["provider"]["availability_zone"].startswith(region)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_command_is_valid_bash(config):
    for cmd in all_commands(config):
        result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"{cmd!r}: {result.stderr}"


def test_gpu_workers_get_cpus_to_decode_with(config):
    """The sweep gives a GPU worker its node's CPUs per GPU (sweeps.cluster): at least 4, so 3
    DataLoader processes decode JPEGs beside the training process."""
    for name, t in config["available_node_types"].items():
        if t["resources"].get("GPU"):
            assert t["resources"]["CPU"] / t["resources"]["GPU"] >= 4, name


def test_spot_workers_are_watched_and_data_is_staged_before_ray_starts(config):
    spot = [n for n, t in config["available_node_types"].items()
            if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot, "no spot node type"
    assert any("python -m sweeps.spot_watch --address" in c for c in config["worker_start_ray_commands"])
    assert any("scripts/stage_data.sh" in c and "--mount-nvme" in c for c in config["worker_setup_commands"])
    assert any("SIT_DATA_SRC" in c for c in config["head_setup_commands"])
    assert (Path(__file__).resolve().parents[1] / "scripts" / "stage_data.sh").stat().st_mode & 0o111


@pytest.mark.parametrize("with_tars", [False, True])
def test_stage_data_copies_the_tree_once(tmp_path, with_tars):
    src, dest = tmp_path / "shared" / "imagenet", tmp_path / "nvme" / "imagenet"
    for split, classes in (("train", ("n01", "n02", "n03")), ("val", ("n01", "n02", "n03"))):
        for c in classes:
            (src / split / c).mkdir(parents=True)
            for i in range(3):
                (src / split / c / f"{i}.JPEG").write_bytes(f"{split}{c}{i}".encode())
    if with_tars:  # the fast path: one sequential read per split
        for split in ("train", "val"):
            subprocess.run(["tar", "-C", str(src), "-cf", str(src / f"{split}.tar"), split], check=True)
    script = str(Path(__file__).resolve().parents[1] / "scripts" / "stage_data.sh")
    r = subprocess.run(["bash", script, str(src), str(dest)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    copied = sorted(str(p.relative_to(dest)) for p in dest.rglob("*.JPEG"))
    assert copied == sorted(str(p.relative_to(src)) for p in src.rglob("*.JPEG")) and len(copied) == 18
    assert (dest / "val" / "n02" / "1.JPEG").read_bytes() == b"valn021"
    again = subprocess.run(["bash", script, str(src), str(dest)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already staged" in again.stdout
    bad = subprocess.run(["bash", script, str(tmp_path / "nothing"), str(dest)], capture_output=True, text=True)
    assert bad.returncode == 2 and "must hold train/ and val/" in bad.stderr

# ---------------------------------------------------------------- nothing listens unauthenticated in public

def _head_commands(config: dict) -> str:
    return "\n".join(config["head_setup_commands"] + config["head_start_ray_commands"])


def test_no_service_binds_every_interface(config):
    for cmd in all_commands(config):
        assert not re.search(r"(--host|--dashboard-host)[= ]+(0\.0\.0\.0|::)(\s|$)", cmd), cmd


def test_ray_dashboard_binds_the_head_loopback(config):
    starts = [c for c in config["head_start_ray_commands"] if "ray start --head" in c]
    assert len(starts) == 1 and re.search(r"--dashboard-host[= ](127\.0\.0\.1|localhost)(\s|$)", starts[0]), starts


def test_mlflow_server_asks_for_a_login_and_binds_the_loopback(config):
    servers = [c for c in config["head_start_ray_commands"] if "mlflow server" in c]
    assert len(servers) == 1
    server = " ".join(servers[0].split())
    assert "--app-name basic-auth" in server and re.search(r"--host 127\.0\.0\.1\b", server), server
    assert "${MLFLOW_AUTH_ADMIN_PASSWORD:?" in server  # refuses to start without credentials
    assert re.search(r'pip install -c constraints\.txt .*"mlflow\[auth\]"', _head_commands(config))


def test_no_credential_is_written_in_the_file():
    text = CLUSTER_YAML.read_text()
    # a value after a password-like key would be a secret in the repository (variables are fine)
    found = [m.group(0) for m in re.finditer(r"(PASSWORD|SECRET_KEY|admin_password)\s*(=|:\s)\s*([^\s'\"$;{)]+)", text)]
    assert not found, f"literal credentials in cluster.yaml: {found}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_credentials_are_generated_on_the_head_private_and_once(config, tmp_path):
    """Run the head's credential command in a scratch HOME: a 600 file exporting one random login,
    the same for the server (admin) and its clients; a second run keeps it."""
    import os
    import stat
    import sys

    make = next(c for c in config["head_setup_commands"] if "sit_mlflow_credentials" in c)
    homes = [tmp_path / "a", tmp_path / "b"]
    env = {"PATH": f"{os.path.dirname(sys.executable)}:/usr/bin:/bin"}
    for home in homes:
        home.mkdir()
        (home / ".bashrc").write_text("")
        for _ in range(2):
            r = subprocess.run(["bash", "-c", make], env={**env, "HOME": str(home)}, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
    first = (homes[0] / ".sit_mlflow_credentials").read_text()
    assert stat.S_IMODE((homes[0] / ".sit_mlflow_credentials").stat().st_mode) == 0o600
    assert (homes[0] / ".bashrc").read_text().count("source ~/.sit_mlflow_credentials") == 1
    shown = subprocess.run(["bash", "-c", "source ~/.sit_mlflow_credentials && echo $MLFLOW_TRACKING_PASSWORD "
                            "$MLFLOW_AUTH_ADMIN_PASSWORD $MLFLOW_TRACKING_USERNAME"],
                           env={**env, "HOME": str(homes[0])}, capture_output=True, text=True).stdout.split()
    assert len(shown) == 3 and shown[0] == shown[1] and len(shown[0]) >= 24 and shown[2] == "admin"
    assert first != (homes[1] / ".sit_mlflow_credentials").read_text()  # random per cluster
