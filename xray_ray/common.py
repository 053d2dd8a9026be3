"""Mechanics every module shares: atomic file writes, JSON-safe values, safe file reads, the CLI error line.

Kept free of torch, Ray and pyarrow at import time, so predict and evaluate stay light.

- ``atomic_file`` / ``write_bytes`` / ``write_text``: a private temporary file is created exclusively
  (``mkstemp``: ``O_CREAT | O_EXCL``, mode 0600, a random name; a symlink planted anywhere is never
  followed) in the target's own folder, written, flushed, fsynced and renamed over the target. A crash
  leaves the old file whole and at worst a ``.<name>.tmp-*`` file, which ``--resume`` removes.
- ``write_bytes_fs``: the same for a pyarrow filesystem (local paths go through ``write_bytes``; object
  stores get a temporary key and a move, each PUT being whole anyway).
- ``read_regular_file``: the bytes of a regular file, refusing FIFOs, devices and oversized files before
  reading anything.
- ``json_safe``: numpy scalars and arrays, tuples, sets and paths as plain JSON values, NaN/inf as null.
- ``cli``: runs a CLI body and turns a UserError into ``error: <one line>`` on stderr and exit status 2.
- ``replace_dir`` / ``restore_dir``: a finished folder swapped in for another so the target is whole at
  every moment (the re-export of best/), and the clean-up after a kill.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from xray_ray.errors import UserError

TMP_MARK = ".tmp-"  # every temporary file this project writes has it in its name: .<name>.tmp-<random>
FILE_MODE = 0o644  # results are meant to be read by the other users of a shared folder
DEFAULT_MAX_FILE_MB = 64  # predict/evaluate refuse bigger image files before reading them
# the metrics evaluate's table and the report's metrics table show, in their order
SHOWN_METRICS = ["roc_auc", "pr_auc", "recall", "specificity", "precision", "accuracy", "f1", "brier", "ece"]
SHOWN_METRICS += ["tp", "fp", "tn", "fn"]


def tmp_prefix(name: str) -> str:
    """Prefix of the temporary files written for `name` (shortened so the whole name stays legal)."""
    return f".{name[:180]}{TMP_MARK}"


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of this project's temporary files (current or older naming)."""
    return TMP_MARK in name


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike,
    mode: str = "wb",
    *,
    encoding: str | None = None,
    newline: str | None = None,
    perms: int = FILE_MODE,
) -> Iterator[IO]:
    """An open file object that becomes `path` only when the block ends without an exception.

    The temporary file is made by ``tempfile.mkstemp`` in the target's folder (exclusive, random name,
    never a symlink), flushed and fsynced before the rename. On any failure it is removed and the old
    `path`, if any, is left as it was.
    """
    if "w" not in mode:
        raise ValueError(f"atomic_file writes; mode must contain 'w', got {mode!r}")
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix(target.name), dir=target.parent)
    try:
        f = os.fdopen(fd, mode, encoding=encoding, newline=newline)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), perms)
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see atomic_file)."""
    with atomic_file(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically (see atomic_file)."""
    with atomic_file(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def write_bytes_fs(fs: Any, path: str, data: bytes) -> None:
    """Write `data` to `path` on a pyarrow filesystem atomically; parents are created."""
    import pyarrow.fs as pafs

    parent, _, name = path.rpartition("/")
    if isinstance(fs, pafs.LocalFileSystem):
        Path(parent or "/").mkdir(parents=True, exist_ok=True)
        write_bytes(path, data)
        return
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = (
        f"{parent}/{tmp_prefix(name)}{secrets.token_hex(4)}" if parent else f"{tmp_prefix(name)}{secrets.token_hex(4)}"
    )
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:  # quota, network, interrupted: leave neither a partial object nor a temporary one
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


def read_regular_file(path: str | os.PathLike, max_bytes: int | None) -> bytes:
    """The bytes of a regular file of at most `max_bytes`; OSError (with a short strerror) otherwise.

    Opened without blocking (a FIFO named like an image never hangs), checked on the open descriptor (a
    file swapped for a FIFO or device after a check is still caught), and refused by its size before a
    byte is read; at most `max_bytes` + 1 bytes are ever read.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    info = os.stat(path)  # follows a symlink the user gave; raises for loops and broken links
    if not stat.S_ISREG(info.st_mode):
        raise OSError(errno.EINVAL, _kind(info.st_mode))
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, _kind(info.st_mode))
        if max_bytes is not None and info.st_size > max_bytes:
            raise OSError(
                errno.EFBIG,
                f"file too large ({info.st_size / 2**20:.0f} MB, the limit is "
                f"{max_bytes / 2**20:g} MB; raise it with --max-file-mb)",
            )
        limit = math.inf if max_bytes is None else max_bytes + 1
        os.set_blocking(fd, True)
        chunks, got = [], 0
        while got < limit:
            chunk = os.read(fd, int(min(max(info.st_size - got + 1, 1 << 16), 1 << 24, limit - got)))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if max_bytes is not None and got > max_bytes:  # it grew after the check
            raise OSError(
                errno.EFBIG, f"file too large (over the {max_bytes / 2**20:g} MB limit; raise it with --max-file-mb)"
            )
        return b"".join(chunks)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, what in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return f"not a regular file ({what})"
    return "not a regular file"


def json_safe(value: Any, *, strict: bool = False) -> Any:
    """Copy with numpy scalars as Python numbers, tuples/sets/arrays as lists, paths as strings and NaN/inf
    as None (strict JSON). Other objects become their str(), or raise TypeError when `strict`."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, strict=strict) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v, strict=strict) for v in value]
    if type(value).__module__ == "numpy":
        if hasattr(value, "tolist"):  # ndarray or numpy scalar
            value = value.tolist()
            if isinstance(value, list):
                return [json_safe(v, strict=strict) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if strict:
        raise TypeError(f"value {value!r} of type {type(value).__name__} is not JSON-serialisable")
    return str(value)


def one_line(text: str) -> str:
    """`text` on one line: line breaks (say, in a file name) shown as \\n, not printed."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def add_model_file_flags(ap: Any) -> None:
    """predict's and evaluate's --max-file-mb and --allow-modified-model on the argparse parser `ap`."""
    ap.add_argument(
        "--max-file-mb",
        type=float,
        default=DEFAULT_MAX_FILE_MB,
        help=f"skip image files larger than this, before reading them (default {DEFAULT_MAX_FILE_MB})",
    )
    ap.add_argument(
        "--allow-modified-model",
        action="store_true",
        help="run a model.onnx whose sha256 differs from the one its model card records",
    )


def cli(body: Callable[[], int]) -> int:
    """Run a CLI body; a UserError becomes `error: <sentence>` on stderr and status 2, a closed pipe status 1."""
    try:
        return body()
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: stop quietly, as Unix tools do.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return 1


def _exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where it is unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # a libc older than glibc 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EXDEV):  # kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Put the finished folder `new` in the place of `target`, which is whole at every moment.

    Where the kernel and filesystem can swap two names atomically (Linux), one exchange makes `target` the
    new folder and `new` the old one, which is then deleted: a kill at any point leaves `target` old or new.
    Elsewhere the old folder is renamed aside (`<target>.old-<random>`), `new` renamed in and the old
    deleted; a kill between the two renames leaves no `target`, and ``restore_dir`` puts the old one back.
    """
    new, target = Path(new), Path(target)
    if not os.path.lexists(target):
        os.rename(new, target)
    elif _exchange(new, target):
        _fsync_dir(target.parent)
        shutil.rmtree(new, ignore_errors=True)  # the old folder, now under the new one's name
        return
    else:
        old = target.with_name(f"{target.name}.old-{secrets.token_hex(4)}")
        os.rename(target, old)
        os.rename(new, target)
        _fsync_dir(target.parent)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


def restore_dir(target: str | os.PathLike, is_whole: Callable[[Path], bool]) -> list[Path]:
    """Undo what a killed ``replace_dir`` left: if `target` is missing, the whole `<target>.old-*` (else
    the whole `<target>.new-*`) folder is renamed back to it; every other such folder is deleted.
    Returns the folders deleted."""
    target = Path(target)
    aside = sorted(p for p in target.parent.glob(f"{target.name}.old-*") if p.is_dir() and not p.is_symlink())
    built = sorted(p for p in target.parent.glob(f"{target.name}.new-*") if p.is_dir() and not p.is_symlink())
    if not os.path.lexists(target):
        back = next((p for p in [*aside, *built] if is_whole(p)), None)
        if back is not None:
            os.rename(back, target)
            _fsync_dir(target.parent)
    removed = [p for p in [*aside, *built] if p.exists()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


@contextlib.contextmanager
def env_set(**values: str) -> Iterator[None]:
    """Environment variables set for the block, restored after it."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
