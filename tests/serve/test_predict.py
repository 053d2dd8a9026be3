"""`xray-ray predict`: files and folders in, one JSON line (or table row) per image out."""

import csv
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import REAL_DATA, one_error_line, run_measured, run_module
from xray_ray.data.images import load_gray
from xray_ray.data.phantoms import render
from xray_ray.data.prepare import SplitArrays
from xray_ray.model.cnn import build_model
from xray_ray.serve import predict, runtime
from xray_ray.ship.winner import finalize

SIZE = 32


def cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    return run_module("", *args, code=code) if code else run_module("xray_ray", "predict", *args)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny CNN exported by finalize (untrained: these tests are about plumbing, not accuracy)."""
    torch.manual_seed(0)
    labels = np.array([0, 1] * 8, np.int64)
    val = SplitArrays(
        np.stack([render(1, i, int(y), size=SIZE) for i, y in enumerate(labels)]),
        labels,
        [f"v{i}" for i in range(16)],
        [f"p{i}" for i in range(16)],
    )
    out = tmp_path_factory.mktemp("model")
    finalize(out, build_model("tiny", image_size=SIZE), {"val": val}, {}, pd.DataFrame(), pd.DataFrame(), n_boot=20)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder of phantoms in several formats, a nested folder, a corrupt JPEG and files to ignore."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(render(2, 0, 1)).save(root / "b.png")
    Image.fromarray(render(2, 1, 0)).save(root / "a.jpeg", quality=90)
    Image.fromarray(render(2, 2, 1)).convert("RGB").save(root / "sub" / "c.JPG")
    Image.fromarray(render(2, 3, 0).astype(np.uint16) * 257).save(root / "sub" / "deeper" / "d16.png")
    good = (root / "a.jpeg").read_bytes()
    (root / "sub" / "broken.jpeg").write_bytes(good[: len(good) // 3])
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    return root


EXPECTED_ORDER = ["a.jpeg", "b.png", "sub/broken.jpeg", "sub/c.JPG", "sub/deeper/d16.png"]


def lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_folder_with_a_corrupt_file_reports_it_and_keeps_going(model_dir, images):
    res = cli("--model", str(model_dir), str(images), "--batch-size", "2")
    assert res.returncode == 1, res.stderr
    out = lines(res.stdout)
    assert [Path(r["path"]).relative_to(images).as_posix() for r in out] == EXPECTED_ORDER
    bad = out[2]
    assert set(bad) == {"path", "error"} and ("truncated" in bad["error"] or "corrupt" in bad["error"])
    model = runtime.load_exported(model_dir)
    for r in out[:2] + out[3:]:
        assert set(r) == {"path", "prob_pneumonia", "label"}
        pixels = load_gray(Path(r["path"]).read_bytes(), SIZE).astype(np.float32)[None, None] / 255
        assert r["prob_pneumonia"] == pytest.approx(float(model.predict(pixels)[0]), abs=1e-6)
        assert r["label"] == ("PNEUMONIA" if r["prob_pneumonia"] >= model.threshold else "NORMAL")
    assert "Traceback" not in res.stderr


def test_files_with_shell_characters_and_missing_ones(model_dir, images, tmp_path, capsys):
    odd = tmp_path / "x; echo pwned $(touch hacked) 'q'.png"
    odd.write_bytes((images / "b.png").read_bytes())
    assert predict.main(["--model", str(model_dir), str(odd)]) == 0
    (only,) = lines(capsys.readouterr().out)
    assert only["path"] == str(odd) and 0 <= only["prob_pneumonia"] <= 1
    assert not (Path.cwd() / "hacked").exists() and not (tmp_path / "hacked").exists()
    assert predict.main(["--model", str(model_dir), str(odd), str(tmp_path / "missing.png")]) == 1
    out = lines(capsys.readouterr().out)
    assert out[1] == {"path": str(tmp_path / "missing.png"), "error": "no such file"}


def test_refuses_a_pickle_or_a_folder_that_is_no_model(tmp_path, images):
    pickle = tmp_path / "model.pkl"
    pickle.write_bytes(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00.")
    for bad in (pickle, images, tmp_path / "nowhere"):
        res = cli("--model", str(bad), str(images))
        assert res.returncode == 2
        assert res.stdout == "" and "Traceback" not in res.stderr
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
        assert ("looks like a pickle" in res.stderr) == (bad == pickle)


def test_tables_are_written_atomically_with_a_summary(model_dir, images, tmp_path, capsys):
    out_csv, out_pq = tmp_path / "preds.csv", tmp_path / "preds.parquet"
    assert predict.main(["--model", str(model_dir), str(images), "--csv", str(out_csv), "--batch-size", "2"]) == 1
    summary = capsys.readouterr().out
    assert summary.count("\n") == 1 and "wrote 5 rows" in summary and "1 failed" in summary
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == [Path(p).name for p in EXPECTED_ORDER]
    assert rows[2]["error"] and not rows[2]["prob_pneumonia"] and rows[0]["label"] in ("NORMAL", "PNEUMONIA")
    assert predict.main(["--model", str(model_dir), str(images), "--parquet", str(out_pq)]) == 1
    table = pd.read_parquet(out_pq)
    assert list(table.columns) == ["path", "prob_pneumonia", "label", "error"] and len(table) == 5
    assert table["prob_pneumonia"].isna().tolist() == [False, False, True, False, False]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert predict.main(["--model", str(model_dir), str(images), "--csv", str(tmp_path / "no" / "x.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_runtime_and_predict_run_without_torch(model_dir, images):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
        "import numpy as np\n"
        "from xray_ray.serve import runtime, predict\n"
        "m = runtime.load_exported(sys.argv[1])\n"
        "p = m.predict(np.zeros((3, 1, m.image_size, m.image_size), np.float32))\n"
        "assert p.shape == (3,) and sys.modules['torch'] is None\n"
        "sys.exit(predict.main(['--model', sys.argv[1], sys.argv[2]]))\n"
    )
    res = cli(str(model_dir), str(images / "b.png"), code=code)
    assert res.returncode == 0, res.stderr
    assert lines(res.stdout)[0]["label"] in ("NORMAL", "PNEUMONIA")


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL_DATA / "val").is_dir(), reason=f"real chest X-rays not found at {REAL_DATA}")
def test_predict_on_real_chest_xrays(model_dir, tmp_path):
    res = cli("--model", str(model_dir), str(REAL_DATA / "val"), "--csv", str(tmp_path / "real.csv"))
    assert res.returncode == 0, res.stderr
    rows = pd.read_csv(tmp_path / "real.csv")
    assert len(rows) == 16 and rows["error"].isna().all()
    assert rows["prob_pneumonia"].between(0, 1).all()
    assert sorted({Path(p).parent.name for p in rows["path"]}) == ["NORMAL", "PNEUMONIA"]


# ---------------------------------------------------------------- reliability II (issue 15)


def test_a_symlink_planted_at_the_temporary_name_is_never_followed(model_dir, images, tmp_path, capsys):
    """The old temporary name was guessable (.pred.csv.tmp<pid>): a link planted there redirected the write."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "pred.csv"
    for name in (f".pred.csv.tmp{os.getpid()}", ".pred.csv.tmp-00000000"):
        (tmp_path / name).symlink_to(victim)
    assert predict.main(["--model", str(model_dir), str(images / "b.png"), "--csv", str(out)]) == 0
    assert victim.read_text() == "precious\n"
    assert not out.is_symlink() and next(csv.DictReader(out.open()))["label"] in ("NORMAL", "PNEUMONIA")


@pytest.mark.parametrize("kind", ["--csv", "--parquet"])
def test_an_unwritable_output_is_one_sentence_and_exit_2(model_dir, images, tmp_path, kind):
    res = cli("--model", str(model_dir), str(images / "b.png"), kind, "/sys/out.table")
    assert res.returncode == 2 and res.stdout == ""
    line = one_error_line(res.stderr)
    assert "cannot write /sys/out.table" in line and "writable place" in line


_FULL_DISK = """
import resource, signal, sys
from xray_ray.serve import predict
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))  # a disk that fills after 300 bytes
sys.exit(predict.main(sys.argv[1:]))
"""


def test_a_full_disk_while_writing_is_one_sentence_and_the_old_table_stays(model_dir, images, tmp_path):
    out = tmp_path / "pred.csv"
    out.write_text("old,table\n")
    res = cli("--model", str(model_dir), str(images), "--csv", str(out), code=_FULL_DISK)
    assert res.returncode == 2 and res.stdout == ""
    assert "cannot write" in one_error_line(res.stderr)
    assert out.read_text() == "old,table\n" and sorted(p.name for p in tmp_path.iterdir()) == ["pred.csv"]


def test_a_fifo_never_hangs_and_a_big_file_is_refused_before_it_is_read(model_dir, images, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "a.png").write_bytes((images / "b.png").read_bytes())
    os.mkfifo(folder / "x.jpeg")
    with (folder / "big.jpeg").open("wb") as f:  # 3 GB, sparse: reading it whole would take 3 GB of memory
        f.truncate(3 << 30)
    res = cli("--model", str(model_dir), str(folder), "--max-file-mb", "2")  # run_module: 120 s timeout
    assert res.returncode == 1 and "Traceback" not in res.stderr
    rows = {Path(r["path"]).name: r for r in lines(res.stdout)}
    assert set(rows) == {"a.png", "big.jpeg", "x.jpeg"} and "prob_pneumonia" in rows["a.png"]
    assert rows["x.jpeg"]["error"] == "not a regular file (a FIFO (named pipe))"
    assert rows["big.jpeg"]["error"].startswith("file too large (3072 MB, the limit is 2 MB")


def test_the_size_cap_is_checked_before_reading(model_dir, tmp_path):
    """Peak memory of the whole predict process stays far below the 3 GB file it was given."""
    big = tmp_path / "big.jpeg"
    with big.open("wb") as f:
        f.truncate(3 << 30)
    res, peak = run_measured("-m", "xray_ray", "predict", "--model", str(model_dir), str(big))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert lines(res.stdout)[0]["error"].startswith("file too large (3072 MB, the limit is 64 MB")
    assert peak < 1 << 30, f"peak RSS {peak / 2**20:.0f} MB"
