"""`python sweeps/pareto.py` refuses bad input up front: exit code 2, one error line on stderr, no
traceback, and nothing written (no --out directory, no MLflow database, no Ray started)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARETO = ROOT / "sweeps" / "pareto.py"

BAD = {
    "cpus-per-worker-0": (["--cpus-per-worker", "0"], "--cpus-per-worker 0.0 must be > 0"),
    "lr-tiny": (["--lr", "1e-9"], "min_lr=1e-05 must not exceed lr=1e-09"),
    "objectives-one": (["--objectives", "top1:max"], "objectives must include top1 and latency_ms"),
    "objectives-unknown": (["--objectives", "foo:min"], "objective 'foo' is not one of top1, latency_ms, gmacs"),
    "objectives-bad-mode": (["--objectives", "top1:up,latency_ms:min"], "top1:up must be max or min"),
    "reducers-unknown": (["--reducers", "tsm,prune"], "--reducers 'tsm,prune': choose from tsm, drop, merge"),
    "reducers-empty": (["--reducers", ","], "choose from tsm, drop, merge"),
    "export-unknown": (["--export", "middle"], "--export 'middle' must be front, knee or budget:<ms>"),
    "export-budget-nan": (["--export", "budget:abc"], "the budget must be a latency in ms > 0"),
    "max-latency-negative": (["--max-latency-ms", "-1"], "--max-latency-ms -1.0 must be > 0"),
    "min-top1-over-100": (["--min-top1", "150"], "--min-top1 150.0 must be a percentage in 0..100"),
    "data-missing": (["--data", "/nonexistent"], "directory /nonexistent does not exist"),
    "teacher-missing": (["--teacher-checkpoint", "/nonexistent/t.pt"], "/nonexistent/t.pt does not exist"),
    "resume-nothing": (["--resume"], "nothing to resume: no sweep 'pareto-fmnist-cpu-smoke'"),
    "name-quote": (["--name", "it's"], "--name \"it's\": use letters, digits"),
    "name-slash": (["--name", "a/b"], "--name 'a/b': use letters, digits"),
    "tracking-uri-dir": (["--tracking-uri", "/tmp/some-dir"], "is a directory (MLflow's file store)"),
    "speed-device": (["--speed-device", "gpu"], "speed device 'gpu' must be cpu or cuda"),
    "speed-dtype": (["--speed-dtype", "int8"], "speed dtype 'int8' must be float32, bfloat16 or float16"),
    "latency-resource-empty": (["--latency-resource", " "], "--latency-resource needs the name of a Ray resource"),
    "eta-one": (["--eta", "1"], "--eta 1 must be > 1"),
    "grace-past-budget": (["--grace", "2"], "--grace 2 leaves no rung below the 2 training epochs"),
}


def run_cli(args, cwd):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, str(PARETO), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def assert_nothing_written(tmp_path, out):
    assert not out.exists(), f"{out} was created"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"], list(tmp_path.iterdir())
    assert not any((tmp_path / "cwd").iterdir()), "files appeared in the working directory"


@pytest.fixture
def dirs(tmp_path):
    (tmp_path / "cwd").mkdir()
    return tmp_path, tmp_path / "out"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_in_process(case, dirs, capsys, monkeypatch):
    """main(argv): SystemExit(2) with one `pareto.py: error: ...` line, raised before anything is written."""
    sys.path.insert(0, str(ROOT))
    from sweeps import pareto

    tmp_path, out = dirs
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args, message = BAD[case]
    with pytest.raises(SystemExit) as exc:
        pareto.main(["--smoke-test", "--out", str(out), *args])
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("pareto.py: error: ") or lines[0].startswith(f"{Path(sys.argv[0]).name}: error: ")
    assert message in lines[0], lines[0]
    assert captured.out == ""
    assert_nothing_written(tmp_path, out)
    if "ray" in sys.modules:
        import ray
        assert not ray.is_initialized(), "Ray must not start for a bad command line"


@pytest.mark.parametrize("case", ["lr-tiny", "objectives-unknown", "reducers-unknown", "export-unknown",
                                  "data-missing", "resume-nothing", "name-quote"])
def test_bad_input_subprocess(case, dirs):
    """The real entry point: exit 2, exactly one stderr line, no traceback, nothing written."""
    tmp_path, out = dirs
    args, message = BAD[case]
    r = run_cli(["--smoke-test", "--out", str(out), *args], cwd=tmp_path / "cwd")
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pareto.py: error: ") and message in lines[0], lines[0]
    assert r.stdout == ""
    assert_nothing_written(tmp_path, out)


def test_resume_of_an_existing_sweep_is_required(dirs):
    """Starting over an existing sweep without --resume is refused (it would mix two sweeps)."""
    sys.path.insert(0, str(ROOT))
    from sweeps import pareto

    tmp_path, out = dirs
    (out / "ray" / "pareto-fmnist-cpu-smoke").mkdir(parents=True)
    with pytest.raises(SystemExit) as exc:
        pareto.main(["--smoke-test", "--out", str(out)])
    assert exc.value.code == 2
    assert sorted(p.name for p in out.iterdir()) == ["ray"]
    # ... and --resume finds it: the plan validates (run_sweep is not called here)
    plan = pareto.make_plan(pareto.build_parser().parse_args(["--smoke-test", "--out", str(out), "--resume"]))
    assert plan.resume and plan.name == "pareto-fmnist-cpu-smoke" and plan.trials == 3


@pytest.mark.parametrize("args, error", [(["--trials", "abc"], "argument --trials: 'abc' is not a whole number"),
                                         (["--trials", "0"], "argument --trials: 0 must be >= 1"),
                                         (["--concurrent", "0"], "argument --concurrent: 0 must be >= 1"),
                                         (["--workers", "0"], "argument --workers: 0 must be >= 1"),
                                         (["--lr", "nan"], "argument --lr: 'nan' is not a finite number"),
                                         (["--max-latency-ms", "inf"], "'inf' is not a finite number"),
                                         (["--min-top1", "nan"], "'nan' is not a finite number"),
                                         (["--sampler", "cmaes"], "argument --sampler: invalid choice: 'cmaes'"),
                                         (["--latency", "guess"], "argument --latency: invalid choice: 'guess'"),
                                         (["--scheduler", "asha"], "argument --scheduler: invalid choice: 'asha'"),
                                         (["--grace", "0"], "argument --grace: 0 must be >= 1"),
                                         (["--eta", "inf"], "argument --eta: 'inf' is not a finite number"),
                                         (["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
                                         (["--bogus"], "unrecognized arguments: --bogus")])
def test_argparse_errors(args, error, dirs, capsys, monkeypatch):
    """Errors argparse itself finds: exit 2, usage then one error line."""
    sys.path.insert(0, str(ROOT))
    from sweeps import pareto

    tmp_path, out = dirs
    monkeypatch.chdir(tmp_path / "cwd")
    with pytest.raises(SystemExit) as exc:
        pareto.main(["--smoke-test", "--out", str(out), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ")
    assert error in err.strip().splitlines()[-1]
    assert_nothing_written(tmp_path, out)


def test_help_documents_every_option(dirs):
    tmp_path, _ = dirs
    r = run_cli(["--help"], cwd=tmp_path / "cwd")
    assert r.returncode == 0, r.stderr
    text = r.stdout
    for option in ("--trials", "--concurrent", "--sampler", "--objectives", "--reducers", "--max-latency-ms",
                   "--min-top1", "--no-warm-start", "--resume", "--name", "--tracking-uri", "--out", "--export",
                   "--seed", "--smoke-test", "--preset", "--data", "--teacher-checkpoint", "--workers", "--gpu",
                   "--cpus-per-worker", "--address", "--config", "--print-config", "--scheduler", "--grace", "--eta"):
        assert option in text, option
    sys.path.insert(0, str(ROOT))
    from sweeps.pareto import build_parser
    for action in build_parser()._actions:  # every option has help text
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
            assert all(o in text for o in action.option_strings)
    assert "tpe" in text and "nsga2" in text and "gp" in text and "moasha" in text and "budget:" in text
    from sweeps.cli import SAMPLERS
    from sweeps.optuna_search import make_sampler
    assert [type(make_sampler(name, 0)).__name__ for name in SAMPLERS] == [
        "TPESampler", "NSGAIISampler", "RandomSampler", "GPSampler"], "every sampler offered can be built"
    assert not any((tmp_path / "cwd").iterdir())


def test_plan_defaults(dirs, monkeypatch):
    """What a plain `--smoke-test` run plans: 3 trials, TSM, top1 max / latency min, sqlite in --out."""
    sys.path.insert(0, str(ROOT))
    from sweeps import pareto

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tmp_path, out = dirs
    plan = pareto.make_plan(pareto.build_parser().parse_args(
        ["--smoke-test", "--out", str(out), "--reducers", " tsm , merge ", "--objectives", "top1,latency_ms,gmacs",
         "--export", "budget:12.5"]))
    assert plan.trials == 3 and plan.reducers == ("tsm", "merge") and plan.warm_start
    assert (plan.scheduler, plan.grace, plan.eta) == ("moasha", 1, 3.0)  # early stopping is on by default
    assert plan.objectives == {"top1": "max", "latency_ms": "min", "gmacs": "min"}
    assert plan.tracking_uri == f"sqlite:///{out.resolve()}/mlflow.db"
    assert plan.name == "pareto-fmnist-cpu-smoke" and plan.out == str(out.resolve())
    # latency: predicted from a table built on this node's CPU, with the smoke protocol
    assert plan.latency == "model" and plan.latency_resource is None and plan.smoke
    assert plan.job.speed.device == "cpu" and plan.record()["latency"] == "model"
    assert not out.exists()
    full = pareto.make_plan(pareto.build_parser().parse_args(["--out", str(out)]))
    assert full.trials == pareto.DEFAULT_TRIALS and full.name == "pareto-fmnist-cpu"
    from sweeps.sweep import make_scheduler
    assert make_scheduler(full).rungs.rungs == [1, 3]  # fmnist-cpu trains 4 epochs: decide after 1 and 3
    none = pareto.make_plan(pareto.build_parser().parse_args(["--out", str(out), "--scheduler", "none", "--grace", "9"]))
    assert make_scheduler(none) is None  # --grace is not checked when nothing schedules
    # early stopping starts more candidates in the same time; without it, fewer train to the end
    assert (full.trials, none.trials) == (pareto.DEFAULT_TRIALS, pareto.DEFAULT_TRIALS_FULL_BUDGET) == (16, 6)


def test_resume_of_a_sweep_killed_before_its_first_save_starts_it(tmp_path, capsys):
    """Killed while its teacher trained: `--out` holds the teacher's Ray Train run, no sweep yet."""
    sys.path.insert(0, str(ROOT))
    from sweeps import pareto

    (tmp_path / "out" / "ray" / "teacher-abc").mkdir(parents=True)
    _, plan = pareto.parse_or_exit(pareto.build_parser(), pareto.make_plan,
                                   ["--smoke-test", "--out", str(tmp_path / "out"), "--resume"])
    assert plan.resume is False
    assert "saved nothing" in capsys.readouterr().out
