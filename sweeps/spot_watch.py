"""Turn a spot instance's interruption notice into a Ray preemption, so a reclaimed node costs a trial
nothing but the work since its last checkpoint.

Ray counts a node's death as a preemption (not a failure) when the node was drained with reason
PREEMPTION before it died: Tune then restarts the trial from its last checkpoint without charging
its `max_failures` (ray.tune.experiment.trial: a preempted RayActorError is not counted), and Ray
Train retries its worker group under `max_preemption_failures` (unlimited by default), not
`max_failures`. Ray's AWS autoscaler does not watch EC2's two-minute spot notice; this does. It runs
on every worker node (cluster.yaml's worker_start_ray_commands), polls the instance metadata
service, and on a notice drains its own node with the notice's deadline:

    python -m sweeps.spot_watch --address $RAY_HEAD_IP:6379        # exits at once on on-demand nodes
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Callable, Optional

IMDS = "http://169.254.169.254"   # EC2's instance metadata service (IMDSv2: token first)
POLL_S = 5.0                      # AWS: "check every 5 seconds"; the notice comes 2 minutes ahead
DEFAULT_DEADLINE_S = 110          # when a notice carries no time: a little under AWS's 2 minutes


class Metadata:
    """EC2 instance metadata (IMDSv2). `base` is replaceable for tests."""

    def __init__(self, base: str = IMDS, timeout: float = 2.0):
        self.base, self.timeout, self._token, self._token_at = base.rstrip("/"), timeout, None, 0.0

    def _token_header(self) -> dict:
        if self._token is None or time.time() - self._token_at > 3000:  # tokens live 6 hours; renew hourly
            req = urllib.request.Request(f"{self.base}/latest/api/token", method="PUT",
                                         headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                self._token, self._token_at = r.read().decode(), time.time()
        return {"X-aws-ec2-metadata-token": self._token}

    def get(self, path: str) -> Optional[str]:
        """The value at `path`, or None where the service answers 404 (no such item: no notice yet)."""
        req = urllib.request.Request(f"{self.base}/latest/meta-data/{path}", headers=self._token_header())
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return r.read().decode()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise


def seconds_left(notice: str, now: Optional[float] = None) -> int:
    """Seconds until the interruption a notice ({"action": "terminate", "time": "...Z"}) announces."""
    try:
        when = datetime.strptime(json.loads(notice)["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (ValueError, KeyError, TypeError):
        return DEFAULT_DEADLINE_S
    return max(0, int(when.timestamp() - (time.time() if now is None else now)))


def drain_node(address: str, node_id: str, deadline_s: int, message: str) -> tuple[bool, str]:
    """Ask the GCS to drain `node_id` for PREEMPTION (what `ray drain-node --reason
    DRAIN_NODE_REASON_PREEMPTION` does): no new work lands there, and its death counts as a preemption."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=address)
    deadline_ms = int(time.time() * 1000) + deadline_s * 1000
    return gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                          message, deadline_ms)


def this_node_id(address: str) -> str:
    """The Ray node id of this machine (a driver connected here attaches to the local raylet)."""
    import ray
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        return ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()


def watch(address: str, metadata: Metadata, *, poll_s: float = POLL_S, node_id: Callable[[], str] = None,
          drain: Callable = drain_node, log=print, max_polls: Optional[int] = None) -> int:
    """Poll for a spot interruption notice; drain this node on the first one. 0 on a drain or an on-demand node."""
    lifecycle = metadata.get("instance-life-cycle")
    if lifecycle != "spot":
        log(f"spot_watch: this instance is {lifecycle or 'not an EC2 instance'}: nothing to watch")
        return 0
    polls = 0
    while max_polls is None or polls < max_polls:
        polls += 1
        try:
            notice = metadata.get("spot/instance-action")
        except (urllib.error.URLError, OSError) as e:  # a hiccup of the metadata service: keep watching
            log(f"spot_watch: metadata service error ({e}); retrying")
            notice = None
        if notice:
            left = seconds_left(notice)
            node = (node_id or (lambda: this_node_id(address)))()
            accepted, why = drain(address, node, left, f"spot interruption notice: {notice}")
            log(f"spot_watch: notice {notice}: drained node {node} for preemption in {left}s "
                f"({'accepted' if accepted else 'rejected: ' + why})")
            return 0 if accepted else 1
        time.sleep(poll_s)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, help="the head's GCS address (host:port)")
    p.add_argument("--metadata-url", default=IMDS, help="instance metadata service (default: %(default)s)")
    p.add_argument("--poll-s", type=float, default=POLL_S, help="seconds between polls (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        return watch(args.address, Metadata(args.metadata_url), poll_s=args.poll_s)
    except (urllib.error.URLError, OSError) as e:
        print(f"spot_watch: no instance metadata service at {args.metadata_url} ({e}): not watching", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
