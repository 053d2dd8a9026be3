"""Result files, written in one place and atomically, to any filesystem pyarrow understands.

``<results>/<name>/``: trials.parquet, epochs.parquet, run.json, best/, tune/ (Ray Tune's experiment).
Each file is written to a temporary name and renamed, so a crash never leaves a half-written table.
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from xray_ray.common import json_safe, write_bytes_fs


def is_uri(path: str) -> bool:
    return "://" in str(path)


def node_local(location: str | os.PathLike) -> bool:
    """True for a plain path or a file:// URI: storage each node of a cluster sees on its own disk."""
    loc = str(location)
    return not is_uri(loc) or loc.lower().startswith("file://")


def resolve(location: str | os.PathLike, patient: bool = True) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as file://, s3://, gs://.

    A remote filesystem is `patient` (see PatientStorage) unless told otherwise: an outage of the storage
    makes its calls wait and retry instead of failing the run.
    """
    loc = str(location)
    if is_uri(loc):
        fs, path = pafs.FileSystem.from_uri(loc)
        if patient and not isinstance(fs, pafs.LocalFileSystem):
            fs = pafs.PyFileSystem(PatientStorage(synchronous(fs), storage_patience()))
        return fs, path
    return pafs.LocalFileSystem(), str(Path(loc).expanduser().resolve())


PATIENCE_ENV = "XRAY_RAY_STORAGE_PATIENCE_S"
DEFAULT_PATIENCE_S = 300.0  # how long a remote storage may stay unreachable before the call fails
# what the S3 client (curl) says when the endpoint is away, or busy: worth waiting for, unlike NotFound
TRANSIENT = (
    "NETWORK_CONNECTION",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "THROTTLING",
    "REQUEST_TIMEOUT",
    "INTERNAL_FAILURE",
    "curlCode",
    "Could not connect",
    "Connection refused",
    "Connection reset",
)


def synchronous(fs: pafs.FileSystem) -> pafs.FileSystem:
    """S3 without background writes: an upload runs in the thread that closes the file. PatientStorage closes
    files from Arrow's I/O threads (pyarrow.fs.copy_files), and a background upload queued behind them on
    the same pool would never run."""
    if isinstance(fs, pafs.S3FileSystem):
        rebuild, (kwargs,) = fs.__reduce__()
        return rebuild({**kwargs, "background_writes": False})
    return fs


def storage_patience() -> float:
    """Seconds a remote storage may stay unreachable (XRAY_RAY_STORAGE_PATIENCE_S, default 300)."""
    raw = os.environ.get(PATIENCE_ENV, "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_PATIENCE_S
    except ValueError:
        return DEFAULT_PATIENCE_S


def transient(error: BaseException) -> bool:
    """Whether a storage error says the endpoint was unreachable or busy (a retry may succeed)."""
    return isinstance(error, OSError) and any(m in str(error) for m in TRANSIENT)


class PatientStorage(pafs.FileSystemHandler):
    """A remote filesystem (S3 and the like) whose calls ride out an outage of up to `patience` seconds.

    pyarrow's own S3 retries give up after a few seconds, and Tune hands its filesystem to every trial
    by pickle, which drops a custom retry strategy; this handler travels whole (wrapped in a PyFileSystem)
    to the trials, so their checkpoint uploads wait for the storage as the driver's syncing does. A call
    that fails with a network error (see TRANSIENT) is tried again with backoff until the storage answers
    or `patience` has passed; any other error (NotFound, AccessDenied) is raised at once. A file is written
    from a local spool in one go when its stream closes, and read whole when opened, so a retry never
    leaves half a file: an upload is all or nothing. The price: a file read is held in memory, and a file
    written is spooled in memory up to 64 MB and in a temporary file beyond (checkpoints and tables, not
    multi-GB objects).
    """

    def __init__(self, fs: pafs.FileSystem, patience: float):
        self.fs, self.patience = fs, float(patience)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatientStorage) and self.fs.equals(other.fs)

    def __hash__(self) -> int:
        return hash(self.fs.type_name)

    def patiently(self, fn, *args, **kwargs):
        deadline, delay = None, 1.0
        while True:
            try:
                return fn(*args, **kwargs)
            except OSError as e:
                if not transient(e):
                    raise
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.patience
                    if self.patience > 0:
                        said = str(e).split("; Details")[0]
                        print(
                            f"[xray_ray] the {self.fs.type_name} storage does not answer ({said}); "
                            f"waiting for it up to {self.patience:.0f} s",
                            file=sys.stderr,
                            flush=True,
                        )
                if now >= deadline:
                    raise
                time.sleep(min(delay, max(0.0, deadline - now)))
                delay = min(delay * 2, 10.0)

    # the FileSystemHandler interface, each call through patiently()
    def get_type_name(self) -> str:
        return self.fs.type_name  # "s3": what URIs of this storage begin with

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def equals(self, other) -> bool:
        return self == other

    def get_file_info(self, paths):
        return self.patiently(self.fs.get_file_info, paths)

    def get_file_info_selector(self, selector):
        return self.patiently(self.fs.get_file_info, selector)

    def create_dir(self, path, recursive):
        self.patiently(self.fs.create_dir, path, recursive=recursive)

    def delete_dir(self, path):
        self.patiently(self.fs.delete_dir, path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.patiently(self.fs.delete_dir_contents, path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.patiently(self.fs.delete_dir_contents, "/", accept_root_dir=True)

    def delete_file(self, path):
        self.patiently(self.fs.delete_file, path)

    def move(self, src, dest):
        self.patiently(self.fs.move, src, dest)

    def copy_file(self, src, dest):
        self.patiently(self.fs.copy_file, src, dest)

    def _read(self, path) -> pa.Buffer:
        def read():
            with self.fs.open_input_stream(path) as f:
                return f.read_buffer()

        return self.patiently(read)

    def open_input_stream(self, path):
        return pa.BufferReader(self._read(path))

    def open_input_file(self, path):
        return pa.BufferReader(self._read(path))

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_Upload(self, path, metadata), mode="w")

    def open_append_stream(self, path, metadata):
        raise OSError(f"appending to {path} is not supported on remote storage")


class _Upload(io.RawIOBase):
    """A write stream that spools locally and uploads the whole file, patiently, when closed."""

    def __init__(self, storage: PatientStorage, path: str, metadata):
        super().__init__()
        self.storage, self.path, self.metadata = storage, path, metadata
        self.spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.spool.write(data)

    def tell(self) -> int:
        return self.spool.tell()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.storage.patiently(self._upload)
        finally:
            self.spool.close()
            super().close()

    def _upload(self) -> None:
        self.spool.seek(0)
        with self.storage.fs.open_output_stream(self.path, metadata=self.metadata) as out:
            while chunk := self.spool.read(8 << 20):
                out.write(chunk)


def join(base: str, *parts: str) -> str:
    """Join URI or path parts with '/' (pyarrow filesystems use '/' everywhere)."""
    out = str(base).rstrip("/")
    for p in parts:
        out += "/" + str(p).strip("/")
    return out


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _atomic_write(location: str, data: bytes) -> None:
    fs, path = resolve(location)
    write_bytes_fs(fs, path, data)  # disk full, quota, interrupted: neither a partial file nor a temp file


def write_json(obj: Any, location: str) -> None:
    """Strict JSON (NaN/inf as null, numpy values as numbers), written atomically."""
    _atomic_write(location, (json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n").encode())


def read_json(location: str) -> Any:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def write_parquet(df: pd.DataFrame, location: str, metadata: Mapping[str, Any] | None = None) -> None:
    """Write a table atomically; ``metadata`` (config, versions) travels inside the Parquet file."""
    table = pa.Table.from_pandas(df, preserve_index=False)
    if metadata:
        meta = dict(table.schema.metadata or {})
        meta[b"xray_ray"] = json.dumps(json_safe(metadata), allow_nan=False).encode()
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    _atomic_write(location, buf.getvalue())


def read_parquet(location: str) -> pd.DataFrame:
    fs, path = resolve(location)
    return pq.read_table(path, filesystem=fs).to_pandas()


def probe_writable(location: str) -> None:
    """Raise OSError early if ``location`` cannot be created or written (at once: no waiting for a storage
    that does not answer when the run starts)."""
    fs, path = resolve(join(location, ".write-probe"), patient=False)
    write_bytes_fs(fs, path, b"ok")
    fs.delete_file(path)


def versions() -> dict[str, str]:
    """Versions of the libraries that produced an output."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in (
        "xray_ray",
        "torch",
        "torchvision",
        "ray",
        "optuna",
        "numpy",
        "pandas",
        "pyarrow",
        "pillow",
        "onnx",
        "onnxruntime",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """The commit of the checkout the package runs from, with '+dirty' when it has changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(  # noqa: S603  (a fixed argv; git from PATH, as a user runs it)
            ["git", "-C", str(root), "rev-parse", "HEAD"],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(  # noqa: S603  (a fixed argv; git from PATH, as a user runs it)
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],  # noqa: S607
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def command_line() -> list[str]:
    return [sys.executable.rsplit("/", 1)[-1], *sys.argv]
