"""The end of a sweep, on a constructed trial table: the confirmation's measurements land in the table,
the front is recomputed on them, a candidate measured no faster than its teacher is never exported
(not as part of the front, not as the knee, not under a budget), cards carry the measured values,
the standalone export reads the same from MLflow's columns, and the plot draws both latencies."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import tiny_job
from search_spaces import apply_point, point_from
from sit_core.card import read_card
from sit_core.schedule import SlimSchedule
from sit_core.speed import record
from sweeps import pareto_front, results
from sweeps.export import export_cards, measured_tags, pick_rows
from sweeps.pareto_front import Constraints

OBJECTIVES = {"top1": "max", "latency_ms": "min"}


def speed_record(ms: float):
    """A SpeedRecord of 6 samples around `ms` (p50 = ms, IQR 0.5 ms)."""
    samples = [(ms + d) / 1e3 for d in (-1.0, -0.25, -0.25, 0.25, 0.25, 1.0)]
    return record(samples, warmup=1, rounds=6, batch_size=16, img_size=28, in_chans=1, device=torch.device("cpu"),
                  dtype=torch.float32, threads=1)


def trial_table(tmp_path) -> pd.DataFrame:
    """a: accurate and predicted slow; b: predicted fastest but measured slower than the teacher;
    c: dominated by b by far (not confirmed); d: failed."""
    job = tiny_job()
    rows = []
    for n, (name, schedule, top1, predicted) in enumerate([("a", "1@0.8", 80.0, 10.0), ("b", "1,2@0.4", 75.0, 6.0),
                                                           ("c", "2@0.8", 60.0, 9.0), ("d", "1@0.5", 90.0, 1.0)]):
        config = point_from(SlimSchedule.parse(schedule), lr=1e-3)
        ckpt = tmp_path / f"ckpt_{name}"
        ckpt.mkdir()
        torch.save(apply_point(job, config).model.build().state_dict(), ckpt / "model.pt")
        rows.append({"trial_id": name, "trial_number": n, "config": config, "label": results.label(config, n),
                     "top1": top1, "test_top1": top1, "latency_ms": predicted, "gmacs": 0.01, "params_m": 0.1,
                     "epoch": 2, "full_epochs": 2, "full_budget": True, "status": "failed" if name == "d" else "ok",
                     "run_id": f"run-{name}", "checkpoint": str(ckpt)})
    table = results.mark(pd.DataFrame(rows), OBJECTIVES, Constraints())
    return table


def test_confirmation_writes_measurements_and_recomputes_the_front(tmp_path):
    table = trial_table(tmp_path)
    assert table.set_index("trial_id")["pareto"].to_dict() == {"a": True, "b": True, "c": False, "d": False}
    chosen = results.to_confirm(table, OBJECTIVES, 0.05)
    assert chosen.tolist() == [True, True, False, False]  # the front; c is far from it, d failed

    teacher = speed_record(12.0)
    done = results.confirmed(table, {0: speed_record(11.0), 1: speed_record(13.0)}, teacher, OBJECTIVES, Constraints())
    by = done.set_index("trial_id")
    assert by.loc["a", "latency_measured_ms"] == pytest.approx(11.0)
    assert by.loc["a", "latency_iqr_ms"] == pytest.approx(0.5)
    assert by.loc["a", "speedup_measured"] == pytest.approx(12 / 11)
    assert by.loc["a", "teacher_latency_measured_ms"] == pytest.approx(12.0)
    assert by.loc["a", "speed.rounds"] == 6 and "interleaved" in by.loc["a", "speed.protocol"]
    assert pd.isna(by.loc["c", "latency_measured_ms"])
    # b was predicted fastest but measured slower than the teacher: infeasible, off the front
    assert by.loc["b", "speedup_measured"] < 1 and not by.loc["b", "feasible"]
    assert by["pareto_predicted"].to_dict() == {"a": True, "b": True, "c": False, "d": False}
    assert by["pareto"].to_dict() == {"a": True, "b": False, "c": False, "d": False}
    assert by.loc["c", "feasible"]  # judged on its predicted latency; not measured, so not on the front


def test_a_candidate_slower_than_its_teacher_is_never_exported(tmp_path):
    table = trial_table(tmp_path)
    teacher = speed_record(12.0)
    done = results.confirmed(table, {0: speed_record(11.0), 1: speed_record(13.0)}, teacher, OBJECTIVES, Constraints())
    for pick in ("front", "knee", "budget:100"):
        assert pick_rows(done, pick, OBJECTIVES)["trial_id"].tolist() == ["a"], pick
    with pytest.raises(ValueError, match="no feasible trial with latency_measured_ms <= 10.5; fastest feasible: 11"):
        pick_rows(done, "budget:10.5", OBJECTIVES)  # b's predicted 6 ms does not count: it measured 13
    # everything slower than the teacher: nothing to export at all
    slow = results.confirmed(table, {0: speed_record(12.0), 1: speed_record(13.0)}, teacher, OBJECTIVES, Constraints())
    assert not slow["pareto"].any()
    with pytest.raises(ValueError, match="no feasible full-budget trial"):
        pick_rows(slow, "front", OBJECTIVES)


def test_cards_carry_the_measured_latency(tmp_path):
    table = trial_table(tmp_path)
    done = results.confirmed(table, {0: speed_record(11.0), 1: speed_record(13.0)}, speed_record(12.0), OBJECTIVES,
                             Constraints())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the cards name the trials' runs: real ones (no model logged)
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    done["run_id"] = [client.create_run(exp).info.run_id for _ in range(len(done))]
    paths = export_cards(pick_rows(done, "front", OBJECTIVES), str(tmp_path / "cards"), tiny_job(),
                         {"tracking_uri": uri, "experiment": "e", "parent_run_id": "p"})
    assert [p.stem for p in paths] == ["tsm-0"]
    card = read_card(paths[0])
    m = card["metrics"]
    assert m["latency_ms"] == pytest.approx(10.0)                 # what the search saw
    assert m["latency_measured_ms"] == pytest.approx(11.0)        # what the confirmation measured
    assert m["latency_p25_ms"] < m["latency_measured_ms"] < m["latency_p75_ms"]
    assert m["speedup_measured"] == pytest.approx(12 / 11) and m["teacher_latency_measured_ms"] == pytest.approx(12)
    assert card["speed"]["rounds"] == 6 and "interleaved" in card["speed"]["protocol"]
    # what the registry's versions are tagged with (their logged card predates the confirmation)
    tags = measured_tags(done)
    assert float(tags[done.loc[0, "run_id"]]["sit.latency_measured_ms"]) == pytest.approx(11.0)
    assert float(tags[done.loc[0, "run_id"]]["sit.speedup_measured"]) == pytest.approx(12 / 11, rel=1e-5)
    assert tags[done.loc[2, "run_id"]] == {}  # not confirmed: nothing measured to tag


def test_the_standalone_export_reads_the_confirmation_back_from_mlflow(tmp_path):
    """`results.from_mlflow` on the columns MLflow returns: the same front and protocol."""
    done = results.confirmed(trial_table(tmp_path), {0: speed_record(11.0), 1: speed_record(13.0)}, speed_record(12.0),
                             OBJECTIVES, Constraints())
    runs = pd.DataFrame({
        "run_id": done["run_id"], "tags.sit.trial_id": done["trial_id"], "status": ["FINISHED"] * 3 + ["FAILED"],
        "tags.sit.point": [json.dumps(c) for c in done["config"]], "tags.sit.trial_number": done["trial_number"],
        "tags.sit.checkpoint": done["checkpoint"],
        "tags.sit.speed": [json.dumps({f: (None if pd.isna(r[f"speed.{f}"]) else r[f"speed.{f}"])
                                       for f in results.SPEED_FIELDS}) if pd.notna(r["latency_measured_ms"]) else None
                           for _, r in done.iterrows()],
        **{f"metrics.{c}": done[c] for c in ("top1", "latency_ms", "latency_measured_ms", "latency_iqr_ms",
                                             "speedup_measured", "epoch", "full_epochs")}})
    table = results.from_mlflow(runs, OBJECTIVES, Constraints())
    assert table.set_index("trial_id")["pareto"].to_dict() == {"a": True, "b": False, "c": False, "d": False}
    assert "interleaved" in table.set_index("trial_id").loc["a", "speed.protocol"]


def test_the_plot_shows_predicted_and_measured_latency(tmp_path):
    done = results.confirmed(trial_table(tmp_path), {0: speed_record(11.0), 1: speed_record(13.0)}, speed_record(12.0),
                             OBJECTIVES, Constraints())
    png = pareto_front.plot_pareto(done, {"top1": "max", "latency_measured_ms": "min"}, tmp_path / "p.png",
                                   x="latency_measured_ms", label_col="label",
                                   x_spread=("latency_p25_ms", "latency_p75_ms"), x_predicted="latency_ms",
                                   reference_point={"top1": 85.0, "latency_measured_ms": 12.0, "label": "teacher"})
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
