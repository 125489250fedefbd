"""Model cards: one chosen configuration on disk, enough to rebuild the model (the loop closes).

A card is a human-readable YAML file with the weights beside it:

    cards/tsm-12.yaml        format: sit-card/2, name, job (the whole DistillJob: model, loss, train,
    cards/tsm-12.pt          data, speed), metrics, speed, mlflow, weights, created

`write_card(...)` writes both, `load_card(path)` rebuilds the inference student and loads the
weights strictly after checking their sha256; `card_job(path)` gives back the job itself. The weights path is stored relative to the card,
so a card directory can be copied or moved as a whole. The `mlflow` field is plain text the caller
fills in (the run, the logged model, the registered model and its aliases).

`load_card("models:/<name>@<alias>")` (or `models:/<name>/<version>`, `models:/m-<id>`) loads a card
that a sweep logged with its MLflow model (the card and its weights are the model's extra files).
Only that URI scheme imports MLflow, lazily, inside the call: sit_core itself depends on PyTorch and
timm alone, and reading a card from disk never needs MLflow installed.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Union

import torch
import yaml
from torch import nn

from .config import DistillJob, ModelSpec
from .files import atomic_write, file_sha256

FORMAT = "sit-card/2"
REQUIRED = ("format", "name", "job", "metrics", "speed", "weights", "created")
MLFLOW_SCHEME = "models:/"   # a registered or logged MLflow model whose extra files hold the card
CARD_DIR_IN_MODEL = "extra_files"  # where mlflow.<flavor>.log_model(extra_files=[...]) puts them
# A name becomes the weights' file name: keep it a plain, portable file-name component.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

PathLike = Union[str, os.PathLike]


def write_card(path: PathLike, *, name: str, job: DistillJob,
               state_dict: Optional[Union[Mapping, nn.Module]] = None, weights_path: Optional[PathLike] = None,
               metrics: Mapping[str, Any], speed: Any, mlflow: Optional[Mapping] = None,
               extra: Optional[Mapping] = None) -> Path:
    """Write the card YAML at `path` (or `path/<name>.yaml` if `path` is a directory) and its weights.

    Give the inference student's weights as `state_dict` (saved as `<name>.pt`) or as an existing
    `weights_path` (copied to `<name><suffix>`; .pt/.pth/.bin or .safetensors). `speed` is a dict
    or a `speed.SpeedRecord`. `extra` is stored as is under `extra:`. Returns the card's path.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"card name {name!r} must be a plain file name: letters, digits, '.', '_', '-'")
    if (state_dict is None) == (weights_path is None):
        raise ValueError("give exactly one of state_dict or weights_path")
    if not isinstance(job, DistillJob):
        raise ValueError(f"job must be a DistillJob, got {type(job).__name__}")
    spec = job.model

    path = Path(path)
    card_path = path / f"{name}.yaml" if path.is_dir() else path

    # Everything is checked before anything is written, so a refused card leaves no files behind.
    if state_dict is not None:
        if isinstance(state_dict, nn.Module):
            state_dict = state_dict.state_dict()
        state = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state_dict.items()}
        weights_file = card_path.parent / f"{name}.pt"
    else:
        source = Path(weights_path)
        state = _read_weights(source)
        weights_file = card_path.parent / f"{name}{source.suffix or '.pt'}"
    _check_state(spec, state)

    card: dict[str, Any] = {"format": FORMAT, "name": name, "job": job.to_dict()}
    card["metrics"] = _metrics(metrics)
    card["speed"] = _speed(speed)
    if mlflow is not None:
        card["mlflow"] = _plain(dict(mlflow), "mlflow")
    if extra is not None:
        card["extra"] = _plain(dict(extra), "extra")
    card = _plain(card, "card")

    # Weights first, card last: a crash in between leaves orphan weights, never a card without them
    # (or, when rewriting a card, the old card over new weights, which its sha256 then rejects).
    card_path.parent.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        atomic_write(weights_file, lambda f: torch.save(state, f))
    elif source.resolve() != weights_file.resolve():
        atomic_write(weights_file, lambda f: _copy_into(source, f))
    card["weights"] = {"file": weights_file.name, "sha256": file_sha256(weights_file)}
    card["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")

    header = f"# SiT model card. Rebuild with: sit_core.load_card({card_path.name!r})\n"
    atomic_write(card_path, lambda f: f.write(
        (header + yaml.dump(card, Dumper=_CardDumper, sort_keys=False, allow_unicode=True)).encode()))
    return card_path


def read_card(path: PathLike) -> dict:
    """The card at `path` as a dict, after checking its format and required fields."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        card = yaml.safe_load(f)
    if not isinstance(card, dict):
        raise ValueError(f"{path} is not a SiT card: expected a YAML mapping, got {type(card).__name__}")
    fmt = card.get("format")
    if not isinstance(fmt, str) or not fmt.startswith("sit-card/"):
        raise ValueError(f"{path} is not a SiT card: format is {fmt!r}, expected {FORMAT!r}")
    if fmt != FORMAT:
        raise ValueError(f"{path} has card format {fmt!r}; this sit_core reads {FORMAT!r}")
    for key in REQUIRED:
        if key not in card or card[key] is None:
            raise ValueError(f"{path} is missing the required field {key!r}")
    for key, sub in (("job", ("model",)), ("weights", ("file", "sha256"))):
        if not isinstance(card[key], dict):
            raise ValueError(f"{path}: field {key!r} must be a mapping, got {type(card[key]).__name__}")
        for s in sub:
            if s not in card[key]:
                raise ValueError(f"{path} is missing the required field '{key}.{s}'")
    if Path(card["weights"]["file"]).is_absolute():
        raise ValueError(f"{path}: weights.file must be relative to the card, got {card['weights']['file']!r}")
    return card


def card_job(path: PathLike) -> DistillJob:
    """The job the card's model was distilled with (architecture, schedule, loss, recipe, data, speed)."""
    return DistillJob.from_dict(read_card(path)["job"])


def load_card(path: PathLike, map_location: Any = "cpu", tracking_uri: Optional[str] = None) -> nn.Module:
    """Rebuild the card's inference student and load its weights strictly; returned in eval mode.

    `path` is a card file, or an MLflow model URI (`models:/<name>@<alias>`, `models:/<name>/<version>`,
    `models:/m-<id>`) whose extra files hold the card; `tracking_uri` is then the MLflow store
    (default: MLflow's own, e.g. `$MLFLOW_TRACKING_URI`).
    """
    if str(path).startswith(MLFLOW_SCHEME):
        with tempfile.TemporaryDirectory(prefix="sit-card-") as tmp:
            return load_card(_download_card(str(path), tmp, tracking_uri), map_location)
    path = Path(path)
    card = read_card(path)
    weights_file = path.parent / card["weights"]["file"]
    if not weights_file.is_file():
        where = card.get("mlflow", {}).get("model_uri")
        raise FileNotFoundError(f"weights file {weights_file} named by card {path} does not exist"
                                + (f" (the complete card is in MLflow: load_card({where!r}))" if where else ""))
    # Hash before unpickling/parsing anything: a swapped or truncated file never reaches the model.
    if file_sha256(weights_file) != card["weights"]["sha256"]:
        raise ValueError(f"weights file {weights_file} does not match the card's sha256 "
                         f"({card['weights']['sha256'][:12]}...): it was changed or belongs to another card")
    state = _read_weights(weights_file, map_location)
    # pretrained=False: every weight comes from the card, never from a download.
    model = DistillJob.from_dict(card["job"]).model.build(pretrained=False)
    model.load_state_dict(state, strict=True)
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model.eval()


def _download_card(model_uri: str, into: str, tracking_uri: Optional[str]) -> Path:
    """The card file of an MLflow model, downloaded with its weights into `into`.

    The URI is resolved with a client on `tracking_uri` (registry included): MLflow's own
    `download_artifacts("models:/...")` resolves names and aliases in the process-global registry.
    """
    try:
        from mlflow import MlflowClient  # only this URI scheme needs MLflow
        from mlflow.artifacts import download_artifacts
    except ImportError as e:
        raise ImportError(f"loading {model_uri!r} needs MLflow (pip install mlflow); a card file on disk does not") from e
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    ref = model_uri[len(MLFLOW_SCHEME):].strip("/")
    name, _, version = ref.partition("/")
    if "@" in name:  # models:/<name>@<alias>
        name, version = name.split("@", 1)[0], client.get_model_version_by_alias(*name.split("@", 1)).version
    if version:      # models:/<name>/<version>
        location = client.get_model_version_download_uri(name, version)
    else:            # models:/m-<id>, a logged model
        location = client.get_logged_model(name).artifact_location
    local = Path(download_artifacts(artifact_uri=f"{location.rstrip('/')}/{CARD_DIR_IN_MODEL}", dst_path=into,
                                    tracking_uri=tracking_uri))
    cards = sorted(local.glob("*.yaml"))
    if len(cards) != 1:
        raise ValueError(f"{model_uri} holds {len(cards)} cards in its {CARD_DIR_IN_MODEL}/ (expected one): "
                         "was it logged by a SiT sweep?")
    return cards[0]


def _check_state(spec: ModelSpec, state: Mapping) -> None:
    """Refuse training-only keys, and weights that would not load strictly into `spec.build()`."""
    rtsm = [k for k in state if "rtsm" in k.lower()]
    if rtsm:
        raise ValueError(f"the weights hold training-only RTSM keys ({rtsm[0]!r}, {len(rtsm)} in all): "
                         "save the inference student (distiller.student.state_dict())")
    # Meta device: the shapes without allocating or initialising a second copy of the model.
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in spec.build(pretrained=False).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the weights do not fit {spec.backbone} with schedule {spec.schedule}: "
                         f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    for k, shape in expected.items():
        if torch.is_tensor(state[k]) and tuple(state[k].shape) != shape:
            raise ValueError(f"the weights do not fit the spec: {k} has shape {tuple(state[k].shape)}, "
                             f"the model expects {shape}")


def _read_weights(path: Path, map_location: Any = "cpu") -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # timm depends on safetensors

        device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
        return load_file(str(path), device=device)
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
    return dict(state)


def _metrics(metrics: Mapping[str, Any]) -> dict:
    # Floats, so YAML shows plain numbers (not numpy/tensor objects); None stays "not measured".
    out = {}
    for k, v in dict(metrics).items():
        try:
            out[str(k)] = None if v is None else float(v)
        except (TypeError, ValueError):
            raise ValueError(f"metric {k!r}={v!r} is not a number") from None
    return out


def _speed(speed: Any) -> dict:
    """A speed record as a dict; a `speed.SpeedRecord` also contributes its protocol sentence."""
    if isinstance(speed, Mapping):
        return dict(speed)
    if hasattr(speed, "to_dict"):
        d = dict(speed.to_dict())
        if callable(getattr(speed, "protocol", None)):
            d.setdefault("protocol", speed.protocol())
        return d
    raise ValueError(f"speed must be a dict or a SpeedRecord, got {type(speed).__name__}")


def _plain(obj: Any, where: str) -> Any:
    """`obj` as YAML-safe builtins (tuples -> lists, numpy/torch scalars -> numbers, paths -> str)."""
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    for base in (bool, int, float, str):  # subclasses (torch.__version__, enums) would not dump
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalar
        return obj.item()
    raise ValueError(f"{where} = {obj!r} ({type(obj).__name__}) cannot be written to a YAML card")


class _CardDumper(yaml.SafeDumper):
    """safe_dump with block mappings but one-line lists (`positions: [3, 6, 9]`), for reading."""


_CardDumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))


def _copy_into(source: Path, f) -> None:
    with open(source, "rb") as src:
        shutil.copyfileobj(src, f)
