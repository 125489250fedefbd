"""sit_core.speed and sit_core.benchmark: records complete and sane, the interleaving as documented, models
and torch state left as found. No timing assertions: speed claims live in the benchmark."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
from torch import nn

from sit_core import benchmark
from sit_core.speed import SpeedRecord, compare, interleaved, measure_speed, module_time_share, speedup
from test_flops import tiny_convnet

REPO = Path(__file__).resolve().parents[1]


# --- timing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_measure_speed_record_complete_and_state_restored(training):
    model = tiny_convnet().train(training)
    threads_before = torch.get_num_threads()
    rec = measure_speed(model, batch_size=3, img_size=16, warmup=1, iters=5, threads=1)
    assert isinstance(rec, SpeedRecord)
    d = rec.to_dict()
    for key, value in d.items():
        assert value is not None and value != "", key
    assert rec.batch_size == 3 and rec.img_size == (16, 16) and rec.threads == 1
    assert rec.samples == 5 and rec.warmup == 1 and rec.rounds == 1 and rec.dtype == "float32"
    assert rec.device == "cpu" and rec.torch_version == torch.__version__ and rec.timm_version == timm.__version__
    assert rec.img_s > 0 and rec.min_ms > 0 and rec.mean_ms > 0 and rec.std_ms >= 0
    assert rec.min_ms <= rec.p50_ms <= rec.p90_ms <= rec.p99_ms
    assert math.isclose(rec.img_s, 3 / (rec.mean_ms / 1e3), rel_tol=1e-9)
    assert torch.get_num_threads() == threads_before
    assert model.training == training
    line = rec.protocol()
    assert "\n" not in line and "batch 3" in line and "float32" in line and "1 threads" in line


def test_measure_speed_rejects_no_iterations():
    with pytest.raises(ValueError):
        measure_speed(tiny_convnet(), batch_size=1, img_size=8, iters=0)


def test_module_time_share_bounds():
    model = tiny_convnet().train()
    share = module_time_share(model, nn.Conv2d, batch_size=2, img_size=16, warmup=1, iters=2)
    assert 0.0 <= share <= 1.0
    assert module_time_share(model, nn.MultiheadAttention, batch_size=2, img_size=16) == 0.0
    assert model.training


def test_compare_returns_one_record_per_model_and_restores_state():
    models = {"base": tiny_convnet(16), "small": tiny_convnet(8), "tiny": tiny_convnet(4)}
    threads_before = torch.get_num_threads()
    records = compare(models, batch_size=2, img_size=8, warmup=1, iters=2, rounds=2, threads=1)
    assert torch.get_num_threads() == threads_before
    assert isinstance(records, dict) and list(records) == list(models)
    for n, rec in records.items():
        assert isinstance(rec, SpeedRecord)
        assert rec.samples == 4 and rec.rounds == 2 and rec.warmup == 1 and rec.threads == 1
        assert rec.p25_ms <= rec.p50_ms <= rec.p75_ms and rec.iqr_ms >= 0
        assert "2 rounds interleaved" in rec.protocol() and "x 2 timed iters" in rec.protocol()
        assert models[n].training
    assert speedup(records, "base", "base") == 1.0
    assert speedup(records, "tiny", "small") == pytest.approx(records["tiny"].img_s / records["small"].img_s)


def test_interleaved_order_warmup_and_rotation():
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    rounds_seen = []
    samples = interleaved(fns, device=torch.device("cpu"), dtype=torch.float32, warmup=2, iters=3, rounds=3,
                          progress=lambda r, total: rounds_seen.append((r, total)))
    assert {n: len(s) for n, s in samples.items()} == {"a": 9, "b": 9, "c": 9}  # rounds x iters
    assert calls[:6] == ["a", "a", "b", "b", "c", "c"]          # warm-up, discarded
    body = calls[6:]
    assert len(body) == 3 * 3 * 3                               # each round: 3 timed per callable
    firsts = [body[i * 9] for i in range(3)]
    assert firsts == ["a", "b", "c"]                            # who goes first rotates
    assert rounds_seen == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(ValueError):
        interleaved(fns, device=torch.device("cpu"), dtype=torch.float32, warmup=0, iters=1, rounds=0)


# --- benchmark -------------------------------------------------------------------------------

def test_benchmark_help_and_quick_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.parse_args(["--help"])
    assert e.value.code == 0
    assert "at one schedule (blocks 3, 6, 9 keep 0.7)" in capsys.readouterr().out
    args = benchmark.parse_args(["--quick", "--iters", "4"])
    assert args.batch == benchmark.QUICK["batch"] and args.iters == 4
    assert benchmark.parse_args([]).batch == benchmark.BATCH


def test_benchmark_target_verdict():
    def table(speedup, flops_speedup):
        return pd.DataFrame([
            {"name": "DeiT-S", "baseline": "DeiT-S", "speedup": 1.0, "flops_speedup": 1.0, "efficiency": 1.0},
            {"name": "SiT-DeiT-S", "baseline": "DeiT-S", "speedup": speedup, "flops_speedup": flops_speedup,
             "efficiency": speedup / flops_speedup},
        ])
    line, holds = benchmark.target_line(table(1.45, 1.6), batch=64, dtype="float32")
    assert holds is True and "HOLDS" in line and "indicative" not in line
    line, holds = benchmark.target_line(table(1.4, 1.6), batch=8, dtype="float32")
    assert holds is False and "DOES NOT HOLD" in line and "indicative" in line
    _, holds = benchmark.target_line(table(1.0, 1.0).iloc[:1], batch=64, dtype="float32")
    assert holds is None


@pytest.mark.slow
def test_benchmark_quick_runs_end_to_end(tmp_path):
    csv = tmp_path / "speed.csv"
    proc = subprocess.run([sys.executable, "-m", "sit_core.benchmark", "--quick", "--csv", str(csv)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for needle in ["DeiT-S", "SiT-DeiT-S", "Drop-DeiT-S", "Merge-DeiT-S", "SiT-DeiT-T",
                   "TSM share", "Protocol:", "Target ("]:
        assert needle in out, needle
    df = pd.read_csv(csv)
    assert set(benchmark.MODELS) == set(df["name"])
    assert (df.loc[df["name"] == df["baseline"], "speedup"] == 1.0).all()
