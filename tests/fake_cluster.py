"""A private autoscaling Ray cluster on this machine: Ray's `fake_multinode` node provider, whose
"nodes" are raylets the autoscaler starts here with the resources of their node type (GPUs only
accounted: no device behind them).

Never `ray.cluster_utils.AutoscalingCluster`: its start and shutdown run `ray stop --force`, which
kills every Ray process on the machine, other people's included. This head runs under a private
temp dir (`TMPDIR`/`RAY_TMPDIR`/`--temp-dir`) on free ports, and everything it starts (the monitor,
the fake nodes, their workers) inherits that directory in its environment: `stop()` kills exactly
those processes, by pid.

    cluster = FakeCluster(tmp, node_types={...}, max_workers=4)
    env = cluster.start()          # the environment a driver joining it should run with
    ... cluster.address ...
    cluster.stop()
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

HEAD_TYPE = "ray.head.default"  # the fake provider tags its head with this node type


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pids_using(marker: str) -> list[int]:
    """Processes whose command line or environment names `marker` (a private temp dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            blob = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob:
            found.append(int(proc.name))
    return found


def kill_pids(pids, timeout: float = 20) -> None:
    import signal
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout
    while any(Path(f"/proc/{p}").exists() and _alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class FakeCluster:
    def __init__(self, tmp: str, *, node_types: dict, head_cpus: int = 1, max_workers: int = 4,
                 idle_timeout_minutes: float = 5):
        self.tmp, self.head_cpus = tmp, head_cpus
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config_path = os.path.join(tmp, "cluster.yaml")
        self.config = {
            "cluster_name": "sit-fake", "max_workers": max_workers, "upscaling_speed": 10.0,
            "idle_timeout_minutes": idle_timeout_minutes,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.address},
            "available_node_types": {HEAD_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {},
                                                 "max_workers": 0}, **node_types},
            "head_node_type": HEAD_TYPE, "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        }

    def env(self) -> dict:
        env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": self.tmp, "RAY_TMPDIR": self.tmp,
               "SIT_NODE_LOCK_DIR": os.path.join(self.tmp, "locks"), "PYTHONUNBUFFERED": "1",
               "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
            env.pop(key, None)
        os.makedirs(env["SIT_NODE_LOCK_DIR"], exist_ok=True)
        return env

    def start(self) -> dict:
        Path(self.config_path).write_text(yaml.safe_dump(self.config))
        ray = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
        cmd = [ray, "start", "--head", f"--port={self.port}", f"--temp-dir={self.tmp}",
               f"--autoscaling-config={self.config_path}", f"--num-cpus={self.head_cpus}", "--num-gpus=0",
               "--include-dashboard=false", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
               f"--object-manager-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0"]
        env = self.env()
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        if result.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return env

    def node_pids(self, node_id: str) -> list[int]:
        """The processes of one fake node (its raylet and workers carry the node id in their environment)."""
        return [p for p in pids_using(node_id) if p in set(pids_using(self.tmp))]

    def stop(self) -> None:
        kill_pids(pids_using(self.tmp))
