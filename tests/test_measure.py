"""sit_core.measure and sit_core.benchmark: counts against hand computations, records complete and
sane, models and torch state left as found. No timing assertions: speed claims live in the benchmark."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from sit_core import benchmark
from sit_core.measure import (
    SpeedRecord, compare, count_macs, count_params, macs_by_module, measure_speed, module_macs,
    module_time_share,
)

REPO = Path(__file__).resolve().parents[1]


def tiny_convnet(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(width, 10))


class SelfAttention(nn.Module):
    """Attention over the H rows of the image: exercises the CPU SDPA kernel's MAC formula."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, x):  # (B, C, H, W): tokens = H, dim = C * W split over heads
        b, c, h, w = x.shape
        q = x.permute(0, 2, 1, 3).reshape(b, h, self.heads, -1).transpose(1, 2)  # (B, heads, H, d)
        return F.scaled_dot_product_attention(q, q, q)


# --- counting --------------------------------------------------------------------------------

def test_count_macs_deit_small_matches_paper():
    model = timm.create_model("deit_small_patch16_224", pretrained=False)
    assert count_macs(model, 224) / 1e9 == pytest.approx(4.6, rel=0.03)
    assert count_params(model) / 1e6 == pytest.approx(22.05, rel=0.01)


def test_count_macs_single_linear_is_in_times_out_times_batch():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10))
    assert count_macs(model, 4) == 48 * 10
    assert count_macs(model, 4, batch=5) == 48 * 10 * 5


def test_count_macs_conv_and_cpu_attention():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, 8) == 8 * 8 * 8 * 3 * 9  # out pixels * out ch * in ch * kernel
    # torch's counter misses the CPU SDPA kernel on its own; two matmuls of L*L*d per head.
    b, heads, c, h, w = 2, 2, 3, 6, 4
    d = c * w // heads
    assert count_macs(SelfAttention(heads), (h, w), batch=b) == 2 * b * heads * h * h * d


def test_macs_breakdown_sums_and_module_macs():
    model = tiny_convnet()
    per = macs_by_module(model, 8)
    assert per[""] == count_macs(model, 8)
    assert per["0"] + per["4"] == per[""]
    assert module_macs(model, nn.Linear, 8) == 8 * 10
    assert module_macs(model, nn.MultiheadAttention, 8) == 0


def test_counting_restores_train_mode():
    model = tiny_convnet().train()
    model[0].eval()  # a mixed state must survive too
    count_macs(model, 8)
    assert model.training and not model[0].training and model[4].training


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


def test_compare_columns_and_ratios():
    models = {"base": tiny_convnet(16), "small": tiny_convnet(8), "tiny": tiny_convnet(4)}
    threads_before = torch.get_num_threads()
    df = compare(models, "base", batch_size=2, img_size=8, warmup=1, iters=2, rounds=2, threads=1,
                 baseline_of={"tiny": "small"})
    assert torch.get_num_threads() == threads_before
    for col in ["name", "params_m", "gmacs", "img_s", "p50_ms", "p90_ms", "speedup", "flops_speedup",
                "efficiency"]:
        assert col in df.columns
    rows = df.set_index("name")
    assert rows.loc["base", "speedup"] == 1.0 and rows.loc["base", "flops_speedup"] == 1.0
    assert rows.loc["tiny", "baseline"] == "small"
    macs = {n: count_macs(m, 8) for n, m in models.items()}
    assert rows.loc["small", "flops_speedup"] == pytest.approx(macs["base"] / macs["small"])
    assert rows.loc["tiny", "flops_speedup"] == pytest.approx(macs["small"] / macs["tiny"])
    for n in models:
        r = rows.loc[n]
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["flops_speedup"])
        rec = df.attrs["records"][n]
        assert rec.samples == 4 and rec.rounds == 2 and rec.threads == 1
        assert models[n].training
    with pytest.raises(KeyError):
        compare(models, "missing", batch_size=1, img_size=8)


# --- benchmark -------------------------------------------------------------------------------

def test_benchmark_help_and_quick_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.parse_args(["--help"])
    assert e.value.code == 0
    assert "FLOP-matched" in capsys.readouterr().out
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
