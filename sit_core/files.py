"""Files the project writes: where its cache lives, all-or-nothing writes, content hashes.

Every file another process may read while it is being written (teacher weights, cards, latency
tables, checkpoints) goes through `atomic_write`: a kill leaves the old file or the new one, never a
partial file that loads as valid.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

PathLike = Union[str, os.PathLike]
CACHE_ENV = "SIT_CACHE_DIR"


def cache_dir(*parts: str) -> Path:
    """`$SIT_CACHE_DIR/<parts>` (default `~/.cache/sit-pareto/<parts>`), created if missing."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sit-pareto").expanduser()
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(dest: PathLike, write: Callable, mode: int = 0o644) -> Path:
    """Write `dest` through `write(binary_file)` into a temporary sibling, fsync, then os.replace."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600; these files are meant to be shared
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


def atomic_write_text(dest: PathLike, text: str) -> Path:
    return atomic_write(dest, lambda f: f.write(text.encode()))


def file_sha256(path: PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
