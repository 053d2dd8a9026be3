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


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as file://, s3://, gs://."""
    loc = str(location)
    if is_uri(loc):
        return pafs.FileSystem.from_uri(loc)
    return pafs.LocalFileSystem(), str(Path(loc).expanduser().resolve())


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
    """Raise OSError early if ``location`` cannot be created or written."""
    _atomic_write(join(location, ".write-probe"), b"ok")
    fs, path = resolve(join(location, ".write-probe"))
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
