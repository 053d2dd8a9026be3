"""common.py: the one atomic-write helper (local and pyarrow filesystems), json_safe, the CLI error line,
reading only regular files, and the whole-folder swap behind re-export."""

from __future__ import annotations

import ast
import json
import math
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xray_ray import common
from xray_ray import results as R
from xray_ray.errors import UserError

PACKAGE = Path(__file__).resolve().parents[1] / "xray_ray"


def test_atomic_file_replaces_whole_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "t.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with common.atomic_file(target, "w", encoding="utf-8") as f:
            f.write("half of the new")
            raise RuntimeError("killed half-way")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]
    common.write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_the_temporary_file_is_private_exclusive_and_never_a_planted_symlink(tmp_path, monkeypatch):
    """mkstemp makes the temporary file (O_EXCL, a random name); every name an attacker could plant is a
    symlink to a victim, and the victim is never written."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    seen = []
    real = common.tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        seen.append((name, stat.S_IMODE(os.fstat(fd).st_mode), os.path.islink(name)))
        return fd, name

    monkeypatch.setattr(common.tempfile, "mkstemp", spy)
    for i in range(20):  # plant links at the names a guesser would try
        (tmp_path / f".out.bin.tmp-{i:08d}").symlink_to(victim)
        (tmp_path / f".out.bin.tmp{os.getpid() + i}").symlink_to(victim)
    common.write_bytes(tmp_path / "out.bin", b"data")
    assert victim.read_text() == "precious" and (tmp_path / "out.bin").read_bytes() == b"data"
    ((name, mode, was_link),) = seen
    assert Path(name).parent == tmp_path and Path(name).name.startswith(".out.bin.tmp-")
    assert mode == 0o600 and not was_link  # private while it is written; chmod 644 only when whole


def test_results_write_through_the_shared_helper_on_a_local_path(tmp_path, monkeypatch):
    calls = []
    real = common.atomic_file

    def spy(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(common, "atomic_file", spy)
    R.write_json({"x": float("nan"), "a": np.float32(1.5), "t": (1, 2)}, str(tmp_path / "run" / "run.json"))
    R.write_parquet(pd.DataFrame({"a": [1]}), f"file://{tmp_path}/run/trials.parquet", {"seed": np.int64(3)})
    assert calls == ["run.json", "trials.parquet"]
    assert json.loads((tmp_path / "run" / "run.json").read_text()) == {"x": None, "a": 1.5, "t": [1, 2]}


@pytest.fixture(scope="module")
def s3_bucket():
    """moto's S3 server on 127.0.0.1 with one bucket; yields (endpoint, bucket)."""
    pytest.importorskip("moto")
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    ).create_bucket(Bucket="rel")
    try:
        yield endpoint, "rel"
    finally:
        server.stop()


def test_results_still_write_to_s3(s3_bucket):
    import pyarrow.fs as pafs

    endpoint, bucket = s3_bucket
    fs = pafs.S3FileSystem(
        access_key="k", secret_key="s", endpoint_override=endpoint, scheme="http", region="us-east-1"
    )
    common.write_bytes_fs(fs, f"{bucket}/run/run.json", b'{"a": 1}')
    common.write_bytes_fs(fs, f"{bucket}/run/run.json", b'{"a": 2}')
    with fs.open_input_stream(f"{bucket}/run/run.json") as f:
        assert json.loads(f.read()) == {"a": 2}
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(f"{bucket}/run"))]
    assert names == ["run.json"]  # the temporary key was moved, not left behind


def test_json_safe():
    value = {
        "a": np.float64(math.nan),
        "b": [np.int64(2), (1, 2)],
        "c": np.arange(3),
        "d": Path("/x"),
        "e": math.inf,
        3: np.bool_(True),
    }
    assert common.json_safe(value) == {"a": None, "b": [2, [1, 2]], "c": [0, 1, 2], "d": "/x", "e": None, "3": True}
    json.dumps(common.json_safe(value), allow_nan=False)
    with pytest.raises(TypeError):
        common.json_safe({"x": object()}, strict=True)


def test_cli_prints_one_line_and_exits_2(capsys):
    def body() -> int:
        raise UserError("no file named 'a\nb.png'; check the path.")

    assert common.cli(body) == 2
    err = capsys.readouterr().err
    assert err == "error: no file named 'a\\nb.png'; check the path.\n"


def test_read_regular_file_refuses_fifos_devices_and_big_files_unread(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "zero").symlink_to("/dev/zero")
    with (tmp_path / "big").open("wb") as f:
        f.truncate(10 << 20)
    (tmp_path / "ok").write_bytes(b"12345")
    with pytest.raises(OSError, match="FIFO"):
        common.read_regular_file(tmp_path / "fifo", 1 << 20)
    with pytest.raises(OSError, match="character device"):
        common.read_regular_file(tmp_path / "zero", 1 << 20)
    with pytest.raises(OSError, match="file too large"):
        common.read_regular_file(tmp_path / "big", 1 << 20)
    assert common.read_regular_file(tmp_path / "ok", 5) == b"12345"


WRITERS = [
    "results.py",
    "ship/export.py",
    "ship/winner.py",
    "ship/report.py",
    "ship/pictures.py",
    "serve/predict.py",
    "data/prepare.py",
]


FORBIDDEN = (
    "os.replace",
    "os.rename",
    "tempfile.mkstemp",
    "tempfile.NamedTemporaryFile",
    "pa.OSFile",
    "fs.open_output_stream",
    "save_file",
    "onnx.save_model",
    "onnx.save",
    "shutil.copy",
    "shutil.copyfile",
)


@pytest.mark.parametrize("module", WRITERS)
def test_writers_have_no_atomic_write_of_their_own(module):
    """Every file these modules write goes through common: no rename, temporary file, write by path or
    open-for-writing of their own."""
    for node in ast.walk(ast.parse((PACKAGE / module).read_text())):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        where = f"{module}:{node.lineno}: {func}"
        assert func not in FORBIDDEN, where
        assert not func.endswith((".write_text", ".write_bytes", ".replace_file")), where  # Path methods
        if func == "open" or func.endswith(".open"):
            modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
            modes += [k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
            assert not any(set(str(m)) & set("wax+") for m in modes), where
        if func.endswith("savefig") or func.endswith("torch.jit.save") or func.endswith("ParquetWriter"):
            target = node.args[1] if func.endswith("jit.save") else node.args[0]
            assert isinstance(target, ast.Name) and target.id == "f", where  # the atomic_file's open file


def _whole(folder: Path) -> bool:
    return (folder / "card").is_file()


def test_replace_dir_swaps_a_folder_in_whole(tmp_path):
    old, new = tmp_path / "best", tmp_path / "best.new-1"
    old.mkdir()
    (old / "card").write_text("old")
    new.mkdir()
    (new / "card").write_text("new")
    common.replace_dir(new, old)
    assert (old / "card").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    fresh = tmp_path / "other"
    (tmp_path / "x.new-2").mkdir()
    common.replace_dir(tmp_path / "x.new-2", fresh)
    assert fresh.is_dir() and not (tmp_path / "x.new-2").exists()


def test_restore_dir_puts_the_old_folder_back_after_a_kill_between_renames(tmp_path):
    """Without an atomic exchange a kill between the two renames leaves best.old-* and best.new-* only."""
    aside, built = tmp_path / "best.old-aaaa", tmp_path / "best.new-bbbb"
    for folder, text in ((aside, "old"), (built, "new")):
        folder.mkdir()
        (folder / "card").write_text(text)
    half = tmp_path / "best.new-cccc"
    half.mkdir()  # an export killed while it was building
    removed = common.restore_dir(tmp_path / "best", _whole)
    assert (tmp_path / "best" / "card").read_text() == "old"
    assert sorted(p.name for p in removed) == ["best.new-bbbb", "best.new-cccc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
