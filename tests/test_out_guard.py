"""A full or read-only --out: found before Ray starts and during the sweep, reported clearly."""
from __future__ import annotations

import errno
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from sweeps import out_guard

ROOT = Path(__file__).resolve().parents[1]


def test_a_writable_directory_with_room_has_no_problem(tmp_path):
    assert out_guard.problem(str(tmp_path), headroom=0) is None
    assert not list(tmp_path.iterdir())  # the write probe leaves nothing behind


def test_too_little_free_space_names_the_figures(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    found = out_guard.problem(str(tmp_path), headroom=free + 2**30)
    assert found and "MiB free" in found and out_guard.HEADROOM_ENV in found


def test_a_directory_that_cannot_be_written_is_named_with_the_os_reason(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    found = out_guard.problem(str(not_a_dir), headroom=0)
    assert found and found.startswith(f"cannot write to {not_a_dir}")


def test_headroom_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(out_guard.HEADROOM_ENV, "1.5")
    assert out_guard.headroom_bytes() == int(1.5 * 2**20)
    monkeypatch.setenv(out_guard.HEADROOM_ENV, "lots")
    with pytest.raises(ValueError, match="not a number"):
        out_guard.headroom_bytes()


def test_disk_errors_are_found_anywhere_in_the_chain():
    def raised(outer, inner):
        try:
            try:
                raise inner
            except Exception as e:
                raise outer from e
        except Exception as e:
            return e

    full = OSError(errno.ENOSPC, "No space left on device", "/out/ray/ckpt.pt")
    assert out_guard.disk_error(raised(RuntimeError("trial failed"), full)) == \
        "No space left on device: /out/ray/ckpt.pt"
    sqlite_full = sqlite3.OperationalError("database or disk is full")
    assert out_guard.disk_error(raised(RuntimeError("(sqlite3.OperationalError) ..."), sqlite_full)) == \
        "database or disk is full"
    assert out_guard.disk_error(OSError(errno.EROFS, "Read-only file system")) == "Read-only file system"
    assert out_guard.disk_error(raised(RuntimeError("x"), ValueError("y"))) is None
    assert out_guard.disk_error(OSError(errno.ENOENT, "No such file")) is None


def test_the_guard_stops_the_sweep_once_a_directory_fills(tmp_path, monkeypatch):
    stopped = []
    monkeypatch.setattr(out_guard, "stop", stopped.append)
    guard = out_guard.OutGuard([str(tmp_path)], every_s=0.0)
    monkeypatch.setenv(out_guard.HEADROOM_ENV, "0")
    guard.on_step_begin(0, [])
    assert stopped == []
    monkeypatch.setenv(out_guard.HEADROOM_ENV, str(shutil.disk_usage(tmp_path).free // 2**20 + 1024))
    guard.on_step_begin(1, [])
    assert len(stopped) == 1 and "MiB free" in stopped[0]


def test_a_sweep_on_a_full_out_refuses_before_ray_starts(tmp_path):
    """Exit 75 (try again later) with the reason and what to do; no Ray, no teacher, no files."""
    out = tmp_path / "out"
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    env = {"PATH": "/usr/bin:/bin", out_guard.HEADROOM_ENV: str(free_mb + 1024), "SIT_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "sweeps/pareto.py", "--smoke-test", "--out", str(out)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == out_guard.EXIT_CODE, result.stderr[-2000:]
    assert "MiB free" in result.stderr and "--resume" in result.stderr and "Traceback" not in result.stderr
    assert "ray" not in result.stdout.lower() and not out.exists()


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only filesystem: a small tmpfs mounted read-only where this user may mount (root on
    this machine), else /sys, which no process may create files in."""
    target = tmp_path / "ro"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
                             capture_output=True).returncode == 0
    try:
        yield str(target) if mounted else "/sys"
    finally:
        if mounted:
            subprocess.run(["umount", str(target)], check=True)


def test_a_read_only_directory_is_refused_with_the_os_reason(read_only_dir):
    found = out_guard.problem(read_only_dir, headroom=0)
    assert found and found.startswith(f"cannot write to {read_only_dir} (")
    assert "Read-only file system" in found or "Permission denied" in found
