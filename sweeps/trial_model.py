"""A finished trial's student, packaged where the user looks for it: a card (the job, the measured
accuracy and speed, the weights) inside the trial's MLflow model, logged to the trial's run.

Runs in the sweep's driver (`TrialRunLogger` calls it when a trial finishes; the sweep calls it again
for finished trials that a killed driver never packaged), reading the trial's last checkpoint, so
trials need no MLflow access. Card and run point at each other: the card's `mlflow` section names
the run and the model it travels in; the run's tags `sit.model_uri` and `sit.card` name them back.
"""
from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import pandas as pd
import torch

from search_spaces import apply_point
from sit_core.card import write_card
from sit_core.config import DistillJob

from . import mlflow_models
from .train_loop import MODEL_FILE

MODEL_URI_TAG, CARD_TAG = "sit.model_uri", "sit.card"
# latency_ms: what the search saw (predicted, or probed per trial); latency_measured_ms and the rest: the
# sweep's end-to-end confirmation, interleaved with the teacher (its p50 beside them)
CARD_METRICS = ("top1", "test_top1", "latency_ms", "latency_measured_ms", "latency_iqr_ms", "latency_p25_ms",
                "latency_p75_ms", "speedup_measured", "teacher_latency_measured_ms", "speedup", "gmacs", "params_m")
EXAMPLE_BATCH = 2  # torch.export would fix a batch of 1 into the program


def card_name(job: DistillJob, number: int) -> str:
    return f"{job.model.schedule.reducer}-{int(number)}"


def card_fields(result: Mapping) -> tuple[dict, dict]:
    """(metrics, speed) for a card from a trial's last result or its table row; missing values are None."""
    metrics = {m: (None if pd.isna(result.get(m)) else float(result[m])) for m in CARD_METRICS if m in result}
    speed = dict(result.get("speed") or {}) if isinstance(result.get("speed"), Mapping) else {}
    speed |= {k.removeprefix("speed."): v for k, v in result.items() if k.startswith("speed.") and pd.notna(v)}
    return metrics, speed


def example_input(job: DistillJob, batch: int = EXAMPLE_BATCH) -> torch.Tensor:
    """A seeded input of the shape the model is fed (the job's data: channels, image size)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, job.data.in_chans, job.data.img_size, job.data.img_size, generator=generator)


class TrialPackager:
    """`packager(run_id, config, number, result, checkpoint_dir) -> tags` for one sweep."""

    def __init__(self, base_job: DistillJob, tracking_uri: str, mlflow_info: Mapping):
        self.base_job, self.uri, self.mlflow_info = base_job, tracking_uri, dict(mlflow_info)

    def __call__(self, run_id: str, config: Mapping, number: int, result: Mapping, checkpoint_dir) -> dict[str, str]:
        job = apply_point(self.base_job, dict(config))
        weights = Path(checkpoint_dir, MODEL_FILE)
        model = job.model.build(pretrained=False)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        name = card_name(job, number)
        metrics, speed = card_fields(result)
        with tempfile.TemporaryDirectory(prefix="sit-card-") as tmp:
            def write(model_uri: str) -> list[Path]:
                card = write_card(Path(tmp, f"{name}.yaml"), name=name, job=job, weights_path=weights, metrics=metrics,
                                  speed=speed, mlflow={**self.mlflow_info, "run_id": run_id, "model_uri": model_uri})
                return [card, card.with_name(f"{name}{weights.suffix}")]

            model_uri = mlflow_models.log_student(self.uri, run_id, model.eval(), example_input(job), write)
        return {MODEL_URI_TAG: model_uri, CARD_TAG: mlflow_models.card_uri(model_uri, name)}
