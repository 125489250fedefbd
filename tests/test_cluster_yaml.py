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
