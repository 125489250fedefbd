"""Deployable files of a picked model, each checked against the eager model's logits:

- ``pt2``: a ``torch.export`` program (``torch.export.load(f).module()(x)``: no SiT code needed);
- ``onnx``: ONNX through torch's dynamo exporter (needs ``onnxscript``), run back with
  ONNX Runtime for the check.

Both take any batch size (the batch dimension is dynamic) at the card's image size. The check runs
the exported file as loaded from disk on a seeded batch of ``CHECK_BATCH`` images and on a batch
of a different size; a difference beyond ``RTOL``/``ATOL`` (float32 re-association noise is ~1e-6)
raises ``ValueError`` and leaves no file behind.
"""
from __future__ import annotations

from pathlib import Path

import torch

FORMATS = ("pt2", "onnx")
RTOL, ATOL = 1e-4, 1e-4
CHECK_BATCH = 2


def export(model: torch.nn.Module, example: torch.Tensor, stem: str | Path, formats: tuple[str, ...]) -> dict:
    """Write ``<stem>.<format>`` for each format; returns ``{format: {"file", "max_abs_diff"}}``."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"formats {unknown}: choose from {', '.join(FORMATS)}")
    model = model.eval()
    out = {}
    for fmt in formats:
        path = Path(f"{stem}.{fmt}")
        try:
            run = (_pt2 if fmt == "pt2" else _onnx)(model, example, path)
            out[fmt] = {"file": path.name, "max_abs_diff": _check(model, run, example, path)}
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return out


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=4096)


def _pt2(model, example, path: Path):
    program = torch.export.export(model, (example,), dynamic_shapes=({0: _batch_dim()},))
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    return lambda x: loaded(x)


def _onnx(model, example, path: Path):
    import onnxruntime

    torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: _batch_dim()},), external_data=False, verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])


def _check(model, run, example: torch.Tensor, path: Path) -> float:
    generator = torch.Generator().manual_seed(1)
    other = torch.randn(example.shape[0] + 1, *example.shape[1:], generator=generator)
    worst = 0.0
    with torch.no_grad():
        for x in (example, other):
            want, got = model(x), run(x)
            if got.shape != want.shape or not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
                diff = (got - want).abs().max().item() if got.shape == want.shape else float("inf")
                raise ValueError(f"{path.name}: its logits differ from the PyTorch model's (batch {x.shape[0]}: "
                                 f"max |diff| {diff:.3g}, shapes {tuple(got.shape)} vs {tuple(want.shape)})")
            worst = max(worst, (got - want).abs().max().item())
    return worst
