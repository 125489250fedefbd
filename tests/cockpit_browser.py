"""Open a sweep's cockpit as a user would, in headless Chromium (Debian: `apt-get install chromium`):
MLflow's UI (`mlflow server` on the sweep's SQLite store, one worker, no job runner, 127.0.0.1) and
Optuna's dashboard on its study. Each page is rendered with its JavaScript run, to its DOM (for
assertions) and to a PNG (for people).

    python sweeps/pareto.py --smoke-test --out OUT | tee sweep.log
    python tests/cockpit_browser.py OUT SHOTS_DIR < sweep.log    # screenshots of its views

Used by the slow end-to-end tests; the links are the ones the sweep printed, pointed at the ports
the servers here got.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
PRINTED_MLFLOW, PRINTED_DASHBOARD = "http://127.0.0.1:5000", "http://127.0.0.1:8080"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        raise RuntimeError("no Chromium: apt-get install chromium (./install.sh test does)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(cmd: list[str], ready_url: str, env: dict | None = None, timeout: float = 180):
    """Run a server in its own process group until the block ends; waits for `ready_url` to answer."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"{cmd[0]} did not serve {ready_url}:\n{log.read().decode()[-3000:]}")
                time.sleep(1)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@contextlib.contextmanager
def mlflow_ui(out: Path):
    port = free_port()
    cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{Path(out).resolve()}/mlflow.db",
           "--host", "127.0.0.1", "--port", str(port), "-w", "1"]
    base = f"http://127.0.0.1:{port}"
    with serve(cmd, f"{base}/health", env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}):
        yield base


@contextlib.contextmanager
def optuna_dashboard(storage: str):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with serve([str(BIN / "optuna-dashboard"), storage, "--host", "127.0.0.1", "--port", str(port)], f"{base}/api/studies"):
        yield base


def render(url: str, png: Path, size: tuple[int, int] = (1600, 1000), budget_ms: int = 20000) -> str:
    """Screenshot `url` into `png` and return its DOM once its scripts ran (`budget_ms` of page time)."""
    png.parent.mkdir(parents=True, exist_ok=True)
    dom = ""
    with tempfile.TemporaryDirectory(prefix="sit-chromium-") as profile:  # fresh storage: a first visit
        common = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                  f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}", f"--virtual-time-budget={budget_ms}"]
        for args in ([f"--screenshot={png}"], ["--dump-dom"]):
            r = subprocess.run(common + args + [url], capture_output=True, text=True, timeout=240)
            if r.returncode != 0:
                raise RuntimeError(f"chromium failed on {url}: {r.stderr[-2000:]}")
            dom = r.stdout or dom
    return dom


def printed_links(stdout: str) -> dict[str, str]:
    """The links a sweep printed at its end: MLflow's views and the Optuna dashboard's study page."""
    def after(label: str) -> str:
        m = re.search(rf"^\s*{label}: (http\S+)$", stdout, re.M)
        if not m:
            raise AssertionError(f"the sweep printed no {label!r} link")
        return m.group(1)

    return {"pareto": after("Pareto-optimal trials"), "trials": after("all trials"),
            "plot": after("interactive Pareto plot"), "dashboard": after("the sweep's study")}


def shoot_all(out: Path, stdout: str, shots: Path) -> dict[str, tuple[Path, str]]:
    """Every view of a finished sweep: {name: (png, dom)}."""
    links, pages = printed_links(stdout), {}
    with mlflow_ui(out) as base:
        for name in ("pareto", "trials", "plot"):
            png = shots / f"mlflow-{name}.png"
            pages[f"mlflow-{name}"] = (png, render(links[name].replace(PRINTED_MLFLOW, base), png))
    with optuna_dashboard(f"sqlite:///{Path(out).resolve()}/optuna.db") as base:
        png = shots / "optuna-dashboard.png"
        pages["optuna"] = (png, render(links["dashboard"].replace(PRINTED_DASHBOARD, base), png, size=(1600, 2600)))
    return pages


if __name__ == "__main__":
    out, shots = Path(sys.argv[1]), Path(sys.argv[2])
    for name, (png, _) in shoot_all(out, sys.stdin.read(), shots).items():
        print(f"{name}: {png}")
