"""The spot watcher against a local stand-in for EC2's instance metadata service (IMDSv2): it drains
its node for PREEMPTION on the first interruption notice, with the notice's deadline, and does
nothing on an on-demand node. That Ray then treats the node's death as a preemption (the trial
resumes without a counted failure) is shown on a real cluster in test_fake_cluster.py."""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sweeps import spot_watch


class FakeIMDS:
    """/latest/api/token (PUT), /latest/meta-data/<item> (GET, token required); 404 for absent items."""

    def __init__(self, items: dict):
        self.items, self.requests = items, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body=b""):
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self):
                outer.requests.append(("PUT", self.path))
                ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
                self._send(200 if ok else 400, b"TOKEN" if ok else b"")

            def do_GET(self):
                outer.requests.append(("GET", self.path))
                if self.headers.get("X-aws-ec2-metadata-token") != "TOKEN":
                    return self._send(401)
                item = outer.items.get(self.path.removeprefix("/latest/meta-data/"))
                self._send(404) if item is None else self._send(200, item.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def imds():
    servers = []

    def make(items):
        servers.append(FakeIMDS(items))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def notice_in(seconds: int) -> str:
    when = datetime.now(timezone.utc) + timedelta(seconds=seconds)
    return json.dumps({"action": "terminate", "time": when.strftime("%Y-%m-%dT%H:%M:%SZ")})


def test_a_notice_drains_this_node_for_preemption_with_its_deadline(imds):
    server = imds({"instance-life-cycle": "spot"})
    drained = []

    def drain(address, node, deadline_s, message):
        drained.append((address, node, deadline_s, message))
        return True, ""

    # the notice appears after a few quiet polls
    threading.Timer(0.3, lambda: server.items.update({"spot/instance-action": notice_in(100)})).start()
    rc = spot_watch.watch("head:6379", spot_watch.Metadata(server.url), poll_s=0.05, node_id=lambda: "abc123",
                          drain=drain, log=lambda *_: None, max_polls=200)
    assert rc == 0 and len(drained) == 1
    address, node, deadline_s, message = drained[0]
    assert (address, node) == ("head:6379", "abc123") and 95 <= deadline_s <= 100
    assert "spot interruption notice" in message and '"terminate"' in message
    polls = [p for m, p in server.requests if p.endswith("spot/instance-action")]
    assert len(polls) >= 2  # it kept polling through the 404s
    assert ("PUT", "/latest/api/token") in server.requests  # IMDSv2: a token, not bare GETs


def test_an_on_demand_node_is_not_watched(imds):
    server = imds({"instance-life-cycle": "on-demand"})
    drained = []
    rc = spot_watch.watch("head:6379", spot_watch.Metadata(server.url), poll_s=0.01, node_id=lambda: "n",
                          drain=lambda *a: drained.append(a) or (True, ""), log=lambda *_: None, max_polls=5)
    assert rc == 0 and drained == []
    assert not [p for _, p in server.requests if "instance-action" in p]


def test_a_rejected_drain_is_reported():
    class Notice:
        def get(self, path):
            return {"instance-life-cycle": "spot", "spot/instance-action": notice_in(60)}[path]

    lines = []
    rc = spot_watch.watch("h:1", Notice(), node_id=lambda: "n", drain=lambda *a: (False, "node is dead"),
                          log=lines.append, max_polls=1)
    assert rc == 1 and "rejected: node is dead" in lines[-1]


def test_deadlines_from_notices():
    now = time.time()
    assert 55 <= spot_watch.seconds_left(notice_in(60), now) <= 60
    assert spot_watch.seconds_left(notice_in(-30), now) == 0
    assert spot_watch.seconds_left("{}", now) == spot_watch.DEFAULT_DEADLINE_S
    assert spot_watch.seconds_left("not json", now) == spot_watch.DEFAULT_DEADLINE_S


def test_no_metadata_service_means_not_watching(capsys):
    # nothing listens on this port: the watcher says so and exits 0 (not an EC2 instance)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert spot_watch.main(["--address", "h:1", "--metadata-url", f"http://127.0.0.1:{port}"]) == 0
    assert "not watching" in capsys.readouterr().err
