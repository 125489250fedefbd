"""sit_core.latency: the per-device latency model. What it adds up (checked on a constructed table),
that its harnesses time the same computation the model runs, that a table builds on tiny models
(ViT and LV-ViT, every reducer), and that stored tables are reused only when they match and are
whole. The one timing assertion is a loose factor, as the issue asks: evidence lives in
sweeps/latency_check.py, run on a quiet machine."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from sit_core import latency
from sit_core.config import ModelSpec, SpeedSpec
from sit_core.latency import LatencyTable, LatencyTableWarning, ensure_table, measure_models, token_grid
from sit_core.schedule import SlimSchedule

TINY_VIT = ModelSpec("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=3,
                                                  num_heads=2))           # 16 patch tokens, 3 blocks
TINY_LVVIT = ModelSpec("lvvit_tiny", dict(img_size=32, num_classes=3, embed_dim=64, depth=3, num_heads=2))  # 4 tokens
SPEED = SpeedSpec(batch_size=2, warmup=1, iters=2, threads=1)


QUICK = latency.QUICK  # a short protocol: the mechanics are under test here, not the numbers


@pytest.fixture(scope="module")
def tiny_table():
    return latency.build_table(TINY_VIT, SPEED, ("tsm", "drop", "drop+fuse", "merge"), log=lambda s: None,
                               protocol=latency.Protocol(warmup=1, rounds=3, iters=2))


# --------------------------------------------------------------------------- what the model adds up

def synthetic_table(depth=4, num_patches=16, prefix=1) -> LatencyTable:
    """Parts whose values say where they were read: attn n, attn_prop 100 + n, mlp 1000 + n, head 0.5 n,
    a reducer 10 000 x code + 10 n_in + keep (tsm 1, drop 2, drop+fuse 3, merge 4); whole models measured
    3 ms above their parts, but one 50 ms above (an outlier the median ignores)."""
    n = list(range(1, num_patches + 1))
    keeps = list(latency.KEEP_GRID)
    parts = {"stem": {"ms": 7.0},
             "attn": {"n": n, "ms": [float(v) for v in n]}, "attn_prop": {"n": n, "ms": [100.0 + v for v in n]},
             "mlp": {"n": n, "ms": [1000.0 + v for v in n]}, "head": {"n": n, "ms": [0.5 * v for v in n]}}
    for code, kind in enumerate(latency.REDUCERS, start=1):
        parts[kind] = {"n": n, "keep": keeps, "ms": [[10000.0 * code + 10 * a + k for k in keeps] for a in n]}
    fp = {"geometry": [depth, num_patches, prefix, 8], "backbone": "x", "kwargs": {}}
    table = LatencyTable(fp, parts, "synthetic", 0.0)
    whole = {"none": 3.0, "tsm:1,2@0.5": 3.0, "merge:2@0.5": 50.0}
    parts["calibration"] = {"schedules": list(whole), "ms": [sum(table._parts(SlimSchedule.parse(s)).values()) + extra
                                                             for s, extra in whole.items()]}
    return table


def hand(schedule: str, depth=4, num_patches=16) -> float:
    s = SlimSchedule.parse(schedule)
    kind = latency.reducer_kind(s)
    code = {"tsm": 1, "drop": 2, "drop+fuse": 3, "merge": 4}.get(kind)
    n_in, n_out = s.block_tokens(depth, num_patches), s.block_out_tokens(depth, num_patches)
    reducing = s.reducing_blocks(depth)
    total = 7.0 + 3.0 + 0.5 * n_out[-1]
    for i, (a, b) in enumerate(zip(n_in, n_out), start=1):
        total += (100 + a) if kind == "merge" and i > min(reducing) else a            # attention at the tokens in
        total += 1000 + (a if kind in (None, "tsm") else b)                            # MLP after an in-block reducer
        if i in reducing and (kind != "merge" or b < a):
            total += 10000 * code + 10 * a + b / a
    return total


@pytest.mark.parametrize("schedule", ["none", "tsm:1,2@0.5", "tsm:3@0.9", "drop:2,3@0.5", "drop:1,3@0.5+fuse",
                                      "merge:1,3@0.6", "merge:r3", "merge:r9", "tsm:1,2,3@0.7,0.6,0.5"])
def test_prediction_adds_the_parts_the_schedule_runs(schedule):
    table = synthetic_table()
    assert table.predict(schedule) == pytest.approx(hand(schedule))
    parts = table.breakdown(schedule)
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    assert parts["offset"] == pytest.approx(3.0)
    assert (parts["reducers"] > 0) == (schedule != "none")


def test_the_offset_is_the_median_over_whole_models_and_interpolation_is_linear():
    table = synthetic_table()
    assert table.offset_ms == pytest.approx(3.0)
    assert table.predict("none") == pytest.approx(table.teacher_ms)  # the teacher's own offset is the median
    sparse = synthetic_table()
    for name in ("attn", "mlp", "head", "attn_prop"):  # keep every 5th grid point: linear parts stay exact
        p = sparse.parts[name]
        p["n"], p["ms"] = p["n"][::5], p["ms"][::5]
    assert sparse._1d("attn", 7) == pytest.approx(7.0) and sparse._1d("mlp", 13) == pytest.approx(1013.0)
    assert sparse._2d("tsm", 9, 4) == pytest.approx(10000 + 90 + 4 / 9)


def test_unusable_queries_fail_with_one_line():
    table = synthetic_table()
    del table.parts["merge"]
    with pytest.raises(ValueError, match="has no 'merge' reducer"):
        table.predict("merge:1@0.5")
    with pytest.raises(ValueError, match="out of range"):
        table.predict("tsm:4@0.5")  # after the last block
    with pytest.raises(ValueError, match="latency model knows"):
        latency.parts_needed(["prune"])


def test_token_grids():
    assert token_grid(49) == list(range(1, 50))
    grid = token_grid(196)
    assert grid[0] == 1 and grid[-1] == 196 and len(grid) == latency.GRID_POINTS
    assert token_grid(49, 9, dense_up_to=0) == sorted(set(token_grid(49, 9, dense_up_to=0))) and len(token_grid(49, 9, 0)) == 9


# --------------------------------------------------------------------------- the harnesses time the model's own work

@pytest.mark.parametrize("spec", [TINY_VIT, TINY_LVVIT], ids=["vit", "lvvit"])
def test_the_two_halves_are_the_block(spec):
    model = spec.build().eval()
    block = model.blocks[1]
    attn_half, mlp_half = latency._halves(block)
    x = torch.randn(2, 5, model.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(mlp_half(attn_half(x)), block(x))


def test_reducer_harness_runs_the_models_reducer():
    """A drop block of a slimmed model equals: attention half, then SlimPoint with that attention's q and k
    replayed, then the MLP half: the harness feeds the reducer what the model would."""
    model = TINY_VIT.with_schedule("drop:2@0.5").build().eval()
    block = model.blocks[1]
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        expected = block(x)
        attn_half, mlp_half = latency._halves(block)
        h = attn_half(x)
        (q, k), = latency._attention_stats(block, {16: x}, torch.device("cpu"), torch.float32).values()
        slim = block.slim
        saved = slim._stats
        slim._stats = latency._ReplayedStats(block.attn, q, k)
        try:
            torch.testing.assert_close(mlp_half(slim(h)), expected)
        finally:
            slim._stats = saved


# --------------------------------------------------------------------------- building on tiny models

def test_table_builds_on_a_tiny_vit_with_every_reducer(tiny_table):
    t = tiny_table
    assert set(t.reducers) == set(latency.REDUCERS)
    assert {"calibration", "stem", "attn", "mlp", "head", "attn_prop"} <= set(t.parts)
    # the offset's whole models: the teacher and the FLOP-matched schedule moved to 3 blocks, per reducer
    assert t.parts["calibration"]["schedules"] == ["none", "tsm:1,2@0.7,0.7", "drop:1,2,3@0.7,0.7,0.7",
                                                   "drop:1,2,3@0.7,0.7,0.7+fuse", "merge:1,2,3@0.7,0.7,0.7"]
    assert t.parts["attn"]["n"] == list(range(1, 17)) and len(t.parts["attn"]["ms"]) == 16
    assert len(t.parts["tsm"]["ms"]) == len(t.parts["tsm"]["n"]) and len(t.parts["tsm"]["ms"][0]) == len(latency.KEEP_GRID)
    LatencyTable.from_dict(json.loads(json.dumps(t.to_dict())))  # valid, round-trips through JSON
    fp = t.fingerprint
    assert fp["backbone"] == TINY_VIT.backbone and fp["batch_size"] == 2 and fp["threads"] == 1
    assert fp["img_size"] == [16, 16] and fp["geometry"] == [3, 16, 1, 32] and fp["torch"] == torch.__version__
    assert "3 rounds interleaved" in t.protocol and "batch 2" in t.protocol and "median per part" in t.protocol
    assert t.build_s > 0
    c = t.parts["calibration"]
    gaps = sorted(ms - t.breakdown(s)["total"] + t.offset_ms for s, ms in zip(c["schedules"], c["ms"]))
    assert t.offset_ms == pytest.approx(gaps[2])  # the median of five whole models' (measured - parts)
    for schedule in ("tsm:1,2@0.5", "drop:1@0.5+fuse", "merge:1,2@0.5", "merge:r3"):
        assert t.predict(schedule) > 0
        assert t.predict_spec(TINY_VIT.with_schedule(schedule)) == t.predict(schedule)
    with pytest.raises(ValueError, match="this latency table is for"):
        t.predict_spec(TINY_LVVIT)


def test_table_builds_on_lvvit_blocks():
    t = latency.build_table(TINY_LVVIT, SPEED, ("tsm", "drop", "merge"), log=lambda s: None, protocol=QUICK)
    assert t.fingerprint["geometry"] == [3, 4, 1, 64]
    for schedule in ("tsm:1@0.5", "drop:2@0.5", "merge:1@0.5"):
        assert t.predict(schedule) > 0


def test_prediction_matches_measurement_within_a_loose_factor(tiny_table):
    specs = {s: TINY_VIT.with_schedule(s) for s in ("none", "tsm:1@0.5", "drop:2@0.5", "merge:1,2@0.5")}
    measured = measure_models(specs, SPEED, rounds=3, iters=3)
    for name, record in measured.items():
        ratio = tiny_table.predict(name) / record.p50_ms
        assert 1 / 3 < ratio < 3, (name, tiny_table.breakdown(name), record.p50_ms)


def test_measure_models_records_every_model_with_its_spread():
    records = measure_models({"teacher": TINY_VIT, "student": TINY_VIT.with_schedule("tsm:1@0.5")}, SPEED,
                             rounds=2, iters=2)
    assert list(records) == ["teacher", "student"]
    for r in records.values():
        assert r.samples == 4 and r.rounds == 2 and r.batch_size == 2 and r.threads == 1 and r.iqr_ms >= 0
    with pytest.raises(ValueError, match="one input shape"):
        measure_models({"a": TINY_VIT, "b": TINY_LVVIT}, SPEED)


# --------------------------------------------------------------------------- stored tables

def built(tmp_path, reducers=("tsm",), **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatencyTableWarning)  # a clean store gives no warning
        return ensure_table(TINY_VIT, SPEED, reducers, directory=tmp_path, log=lambda s: None, protocol=QUICK, **kw)


def test_a_matching_table_is_reused(tmp_path, monkeypatch):
    first = built(tmp_path)
    assert first.path and len(list(tmp_path.glob("*.json"))) == 1
    monkeypatch.setattr(latency, "build_table", lambda *a, **k: pytest.fail("a matching table was rebuilt"))
    again = built(tmp_path)
    assert again.parts == first.parts and again.build_s == first.build_s


def test_another_setting_gets_its_own_table(tmp_path):
    built(tmp_path)
    built(tmp_path, threads=2)
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_a_mismatched_fingerprint_is_rebuilt_with_a_warning(tmp_path):
    path = built(tmp_path).path
    stored = json.loads(open(path).read())
    stored["fingerprint"]["torch"] = "0.0.1"
    stored["build_s"] = -1.0
    open(path, "w").write(json.dumps(stored))
    with pytest.warns(LatencyTableWarning, match="differs in torch"):
        table = ensure_table(TINY_VIT, SPEED, ("tsm",), directory=tmp_path, log=lambda s: None, protocol=QUICK)
    assert table.fingerprint["torch"] == torch.__version__ and table.build_s > 0
    assert json.loads(open(path).read())["fingerprint"]["torch"] == torch.__version__  # the store is fixed too


@pytest.mark.parametrize("damage", ["truncated", "not json", "a part missing", "a negative time", "wrong format"])
def test_a_corrupt_or_partial_table_is_rebuilt_with_a_warning(tmp_path, damage):
    path = built(tmp_path).path
    text = open(path).read()
    stored = json.loads(text)
    if damage == "truncated":
        text = text[: len(text) // 2]
    elif damage == "not json":
        text = "\x00\x01garbage"
    else:
        if damage == "a part missing":
            del stored["parts"]["mlp"]
        elif damage == "a negative time":
            stored["parts"]["attn"]["ms"][3] = -1.0
        else:
            stored["format"] = "sit-latency/0"
        text = json.dumps(stored)
    open(path, "w").write(text)
    with pytest.warns(LatencyTableWarning, match="unusable"):
        table = ensure_table(TINY_VIT, SPEED, ("tsm",), directory=tmp_path, log=lambda s: None, protocol=QUICK)
    assert LatencyTable.load(path).parts == table.parts  # whole again on disk


def test_a_table_lacking_a_reducer_is_rebuilt_with_all_of_them(tmp_path):
    built(tmp_path, ("tsm",))
    lines = []
    table = ensure_table(TINY_VIT, SPEED, ("merge",), directory=tmp_path, log=lines.append, protocol=QUICK)
    assert set(table.reducers) == {"tsm", "merge"} and "attn_prop" in table.parts
    assert any("lacks" in line and "merge" in line for line in lines) and any("built in" in line for line in lines)
    assert any(f"round {QUICK.rounds}/{QUICK.rounds}" in line for line in lines)  # progress while it builds
