"""`python sweeps/distill.py`: bad input is one clear line and exit code 2, before Ray starts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "sweeps" / "distill.py"


def run_cli(*args, tmp_path, timeout=90):
    """The script as a user runs it, from another directory, with our own output and cache dirs
    (so that a regression that lets bad input through cannot touch ./runs or the real cache)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "SIT_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "runs"), *map(str, args)]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def assert_clean_usage_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line: no traceback, no Ray log noise
    assert lines[0].startswith("distill.py: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert proc.stdout == ""  # init_ray prints "started a local Ray instance" / "joined ..." first thing
    assert not (Path(proc.args[proc.args.index("--out") + 1])).exists()  # nothing ran: no output dir


@pytest.mark.parametrize("args, fragments", [
    (["--schedule", "9,3@0.5"], ["(9, 3)", "increasing"]),
    (["--schedule", "2,4@1.5"], ["1.5", "(0, 1]"]),
    (["--data", "/nonexistent"], ["/nonexistent", "does not exist"]),
    (["--lambda-token", "-1"], ["lambda_token=-1.0", ">= 0"]),
])
def test_bad_input_is_one_line_and_exit_2_before_ray_starts(args, fragments, tmp_path):
    assert_clean_usage_error(run_cli(*args, tmp_path=tmp_path), *fragments)


# The same checks in-process (a subprocess costs ~5 s of imports on 2 cores): `main(argv)` is what
# the script runs; `init_ray` is replaced so that input which slips through fails loudly, not trains.
@pytest.fixture
def main_in_process(monkeypatch, tmp_path, capsys):
    from sweeps import distill, runner

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for bad input")

    monkeypatch.setattr(runner, "init_ray", no_ray)
    monkeypatch.setenv("SIT_CACHE_DIR", str(tmp_path / "cache"))

    def call(*args):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            distill.main(["--out", str(tmp_path / "runs"), *map(str, args)])
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return call


@pytest.mark.parametrize("args, fragments", [
    (["--schedule", "2,4@0.5x"], ["2,4@0.5x"]),
    (["--schedule", "2,99@0.5"], ["99", "out of range"]),
    (["--reducer", "drop", "--schedule", "4,2@0.5"], ["(4, 2)"]),
    (["--max-failures", "-1"], ["--max-failures"]),
    (["--lambda-token", "-1"], ["lambda_token=-1.0"]),
    (["--tau", "0"], ["tau=0.0 must be > 0"]),
    (["--lr", "1e-9", "--schedule", "2,4@0.5"], ["min_lr=1e-05 must not exceed lr=1e-09"]),
    (["--teacher-checkpoint", "/nonexistent/teacher.pt"], ["/nonexistent/teacher.pt", "does not exist"]),
])
def test_more_bad_input_in_process(main_in_process, args, fragments):
    code, out, err = main_in_process(*args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], err  # prog is pytest's argv[0] in-process
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_argparse_errors_end_in_one_error_line(main_in_process):
    # argparse's own errors (unknown choice, not a number) print the usage block, then the error line.
    for args, fragment in ((["--preset", "nope"], "invalid choice: 'nope'"), (["--workers", "two"], "'two'"),
                           (["--workers", "0"], "0 must be >= 1"), (["--epochs", "0"], "0 must be >= 1"),
                           (["--train-subset", "0"], "0 must be >= 1"),
                           (["--lr", "nan"], "'nan' is not a finite number"),
                           (["--tau", "inf"], "'inf' is not a finite number"),
                           (["--cpus-per-worker=-inf"], "'-inf' is not a finite number")):
        code, out, err = main_in_process(*args)
        assert code == 2 and out == "" and "Traceback" not in err
        assert ": error: " in err.strip().splitlines()[-1] and fragment in err.strip().splitlines()[-1], err


def test_a_teacher_checkpoint_of_another_architecture_is_refused_before_ray_starts(main_in_process, tmp_path):
    from sit_core.presets import get_preset

    spec = get_preset("fmnist-cpu").model
    wrong = dict(spec.kwargs, embed_dim=48, num_heads=2)  # the smoke model's width, not the preset's
    torch.save(type(spec)(spec.backbone, wrong).build_teacher().state_dict(), tmp_path / "wrong.pt")
    torch.save({"head.weight": torch.zeros(10, 96)}, tmp_path / "partial.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    for name, fragments in (("wrong.pt", ["does not fit", "size mismatch"]),
                            ("partial.pt", ["does not fit", "missing"]),
                            ("text.pt", ["not a readable weights file"])):
        code, out, err = main_in_process("--teacher-checkpoint", tmp_path / name)
        lines = err.strip().splitlines()
        assert code == 2 and out == "" and len(lines) == 1, err
        for fragment in fragments:
            assert fragment in lines[0], (fragment, lines[0])


def test_help_exits_0_and_documents_the_flags(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--schedule", "--smoke-test", "--teacher-checkpoint", "--workers", "--out", "--name"):
        assert flag in proc.stdout, flag
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_smoke_test_runs_end_to_end_and_prints_a_summary(tmp_path):
    proc = run_cli("--smoke-test", "--name", "smoke", tmp_path=tmp_path, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = [ln for ln in proc.stdout.splitlines() if ln.startswith("done in ")]
    assert len(done) == 1, proc.stdout[-3000:]
    assert "val top-1" in done[0] and "test top-1" in done[0] and "weights: " in done[0]
    weights = Path(done[0].rsplit("weights: ", 1)[1].strip())
    assert weights.is_file() and weights.is_relative_to(tmp_path)
    assert "measured speed-up" in proc.stdout
    teachers = list((tmp_path / "cache" / "teachers").glob("*.pt"))
    assert len(teachers) == 1  # the teacher went to $SIT_CACHE_DIR, not ~/.cache
