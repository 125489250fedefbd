"""Where a sweep's outputs live: a local directory, a shared mount, or a URI (s3://, gs://, file://).

Ray Tune and Ray Train write checkpoints and results straight to `--out` through pyarrow
filesystems (they take URIs as they are). Everything else the sweep writes (tables, plots, cards,
sweep.json, and the SQLite stores of Optuna and MLflow) is made by libraries that want a local path
(pandas, matplotlib, MLflow, SQLite, `sit_core.card`), and SQLite must stay on a local disk: it locks
through the filesystem, which NFS/EFS and object stores do not do reliably. So those files are
written to a local directory on the driver and published to `--out` with pyarrow (`publish`); when
`--out` is itself a plain local directory, that directory is used and nothing is copied.

A multi-node cluster must see `--out` from every node (a trial resumes from its checkpoint on
whichever node it lands next). `check_shared_out` refuses a local directory it cannot verify.
"""
from __future__ import annotations

import os
import re
import sqlite3
import tempfile
import uuid
from pathlib import Path
from typing import Iterable, Optional

import pyarrow.fs as pafs

from sit_core.config import stable_hash
from sit_core.files import cache_dir

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Filesystems every node can mount: a local directory on one of these may be shared.
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "9p",
              "virtiofs", "efs", "wekafs", "fuse.s3fs", "fuse.gcsfuse", "fuse.juicefs", "fuse.sshfs",
              "fuse.glusterfs", "fuse.mountpoint-s3", "fuse.goofys", "fuse.rclone")
SQLITE_FILES = ("optuna.db", "mlflow.db")


def scheme(location: str) -> Optional[str]:
    m = _SCHEME.match(str(location))
    return m.group(1).lower() if m else None


def normalise(location: str) -> str:
    """A URI as given (no trailing slash); a path made absolute (Ray needs absolute storage paths)."""
    if scheme(location):
        return location.rstrip("/")
    return os.path.abspath(os.path.expanduser(location))


def local_path(location: str) -> Optional[str]:
    """The local path of a plain path or file:// URI; None for remote URIs."""
    s = scheme(location)
    if s is None:
        return location
    if s == "file":
        return "/" + location[len("file://"):].lstrip("/")
    return None


def join(base: str, *parts: str) -> str:
    if scheme(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it), as Ray's storage layer resolves it."""
    if scheme(location) is None:
        return pafs.LocalFileSystem(), location
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as e:  # noqa: BLE001  (pyarrow raises ArrowInvalid, OSError, ...)
        raise ValueError(f"cannot open {location}: {_first_line(e)}") from None


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot reach {location}: {_first_line(e)}") from None


def read_text(location: str) -> str:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def fetch(location: str, dest: str) -> str:
    """A local copy of the file at `location` (the file itself if it is local)."""
    path = local_path(location)
    if path is not None:
        return path
    fs, src = filesystem(location)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    pafs.copy_files(src, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def mount_type(path: str) -> Optional[str]:
    """The filesystem type of the mount holding `path` (from /proc/mounts; None where unreadable)."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    real = os.path.realpath(path)
    best = max((m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=None)
    return best[1].replace("\\040", " ") if best else None


def is_network_fs(fstype: Optional[str]) -> bool:
    return bool(fstype) and (fstype in NETWORK_FS or fstype.startswith("nfs"))


def is_local_disk(location: str) -> bool:
    """A plain path (or file:// URI) on this node's own disk, where SQLite can lock."""
    path = local_path(location)
    return path is not None and not is_network_fs(mount_type(existing_ancestor(path)))


def existing_ancestor(path: str) -> str:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return str(p)


def staging_dir(out: str, name: str) -> str:
    """Where the driver writes the sweep's local files: `out` itself if it is a local directory on this
    node's disk, else a directory in the cache named after `out` (the same one on every resume)."""
    if scheme(out) is None and is_local_disk(out):
        return out
    return str(cache_dir("sweeps", f"{name}-{stable_hash(out, 10)}"))


def publish(local_dir: str, out: str, names: Iterable[str]) -> list[str]:
    """Copy `names` (files or directories under `local_dir`) to `out`; SQLite files as consistent
    snapshots (sqlite3's backup API: a copy of a database in use may be torn). Returns what was copied."""
    if os.path.realpath(local_dir) == os.path.realpath(local_path(out) or "\0"):
        return []
    fs, base = filesystem(out)
    fs.create_dir(base, recursive=True)
    copied = []
    for name in names:
        src = os.path.join(local_dir, name)
        if not os.path.exists(src):
            continue
        dest = f"{base.rstrip('/')}/{name}"
        if name.endswith(".db"):
            with tempfile.TemporaryDirectory() as tmp:
                snap = os.path.join(tmp, name)
                with sqlite3.connect(src) as db, sqlite3.connect(snap) as copy:
                    db.backup(copy)
                pafs.copy_files(snap, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        else:
            if os.path.isdir(src):  # pyarrow copies a tree's files, not its directories
                fs.create_dir(dest, recursive=True)
            pafs.copy_files(src, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        copied.append(name)
    return copied


def restore_missing(out: str, local_dir: str, names: Iterable[str] = SQLITE_FILES) -> list[str]:
    """On resume: bring back local files a new driver node lacks from their last published copy."""
    if os.path.realpath(local_dir) == os.path.realpath(local_path(out) or "\0"):
        return []
    fs, base = filesystem(out)
    restored = []
    for name in names:
        dest = os.path.join(local_dir, name)
        src = f"{base.rstrip('/')}/{name}"
        if not os.path.exists(dest) and fs.get_file_info(src).type == pafs.FileType.File:
            pafs.copy_files(src, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            restored.append(name)
    return restored


def check_sqlite_url(url: str) -> str:
    """`--optuna-storage`: a database URL; SQLite only on a local disk."""
    s = scheme(url)
    if s is None or not re.match(r"^(sqlite|postgresql|mysql|oracle|mssql)(\+\w+)?$", s):
        raise ValueError(f"--optuna-storage {url!r} must be a database URL (sqlite:////abs/path.db, "
                         "postgresql://..., mysql://...)")
    if s.startswith("sqlite"):
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if not path or not os.path.isabs(path) or path == ":memory:":
            raise ValueError(f"--optuna-storage {url!r}: give an absolute file, sqlite:////abs/path/optuna.db")
        fstype = mount_type(existing_ancestor(path))
        if is_network_fs(fstype):
            raise ValueError(f"--optuna-storage {url!r} is on a network filesystem ({fstype}): SQLite locks "
                             "unreliably there; keep it on the driver's local disk or use a database server")
    return url


def shared_out_problem(out: str, *, alive: int, can_add_nodes: bool, confirmed: bool, fstype: Optional[str],
                       unseen: Iterable[str] = ()) -> Optional[str]:
    """Why `out` cannot serve this cluster, or None. Remote URIs are shared by nature; a local
    directory is shared when every live node sees a file the driver wrote there, and, when the
    autoscaler can add nodes (which no check can see yet), when it is a network mount or the user
    confirmed it (--shared-out)."""
    unseen = list(unseen)
    if local_path(out) is None or (alive <= 1 and not can_add_nodes):
        return None
    where = f"--out {out}"
    if unseen:
        return (f"{where} is not visible from {len(unseen)} of the cluster's {alive} nodes ({', '.join(unseen[:3])}): "
                "mount it on every node (NFS/EFS), or use an s3:// or gs:// URI")
    if can_add_nodes and not confirmed and not is_network_fs(fstype):
        return (f"{where} is on this node's {fstype or 'local'} disk, and the autoscaler can add nodes that will "
                "not see it: use shared storage (an NFS/EFS mount, s3://, gs://), or pass --shared-out if every "
                "node mounts it")
    return None


def check_shared_out(out: str, capacity, *, confirmed: bool = False, timeout_s: float = 120) -> None:
    """Raise ValueError (one line) when `out` is a local directory some node of the cluster cannot see."""
    path = local_path(out)
    can_add = capacity.autoscaling and any(not t.head and t.max_count > 0 for t in capacity.types)
    if path is None or (capacity.alive <= 1 and not can_add):
        return
    anchor = existing_ancestor(path)
    unseen = _nodes_not_seeing(anchor, timeout_s) if capacity.alive > 1 else []
    problem = shared_out_problem(out, alive=capacity.alive, can_add_nodes=can_add, confirmed=confirmed,
                                 fstype=mount_type(anchor), unseen=unseen)
    if problem:
        raise ValueError(problem)


def _nodes_not_seeing(directory: str, timeout_s: float) -> list[str]:
    """Live nodes on which a file the driver writes into `directory` does not appear (a zero-CPU task
    pinned to each node looks for it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = os.path.join(directory, f".sit-shared-check-{uuid.uuid4().hex}")
    try:
        Path(marker).write_text("")
    except OSError as e:
        raise ValueError(f"cannot write into {directory}: {e.strerror}") from None
    try:
        sees = ray.remote(num_cpus=0)(os.path.exists)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        refs = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(marker)
                for n in nodes]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        seen = {r.hex() for r in ready if ray.get(r)}
        return [n["NodeManagerAddress"] for n, r in zip(nodes, refs) if r.hex() not in seen]
    finally:
        os.unlink(marker)


def on_storage(storage_path: str, path: Optional[str]) -> Optional[str]:
    """A path Ray reports without its scheme (pyarrow's view) as a location on `storage_path`'s
    filesystem: unchanged locally, `s3://bucket/key` for an s3:// storage path."""
    if not path:
        return None
    scheme = storage_path.split("://", 1)[0] if "://" in storage_path else None
    return path if scheme in (None, "file") else f"{scheme}://{path.lstrip('/')}"


def checkpoint_location(checkpoint) -> Optional[str]:
    """A Ray checkpoint's location as a path or URI another process can open (Ray keeps the path
    without its scheme next to a pyarrow filesystem)."""
    if checkpoint is None:
        return None
    fs = checkpoint.filesystem
    if fs is None or isinstance(fs, pafs.LocalFileSystem):
        return checkpoint.path
    kind = {"gcs": "gs"}.get(fs.type_name, fs.type_name)
    return f"{kind}://{checkpoint.path.lstrip('/')}"
