"""A corpus of hostile files, run through predict and evaluate as a user would (subprocesses): the
documented exit status, one line per file, no traceback, and a peak memory under 1 GB."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from conftest import png_with_size, run_measured
from xray_ray.data.phantoms import render

GB = 1 << 30


def _sparse(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)  # takes no disk space; reading it whole would take `size` bytes of memory


GOOD = {  # class folder -> good images under odd names (they must be predicted, names intact)
    "NORMAL": ["plain.jpeg", "with spaces.jpeg", "ünïcødé 肺.jpeg"],
    "PNEUMONIA": ["person1_bacteria_1.jpeg", "new\nline.jpeg", "<script>alert(1)<!--.png"],
}
# name -> (how to make it in a folder, what predict says, what evaluate says)
BAD = {
    "fifo.jpeg": (lambda p: os.mkfifo(p), "not a regular file (a FIFO", "not a regular file"),
    "device.jpeg": (
        lambda p: p.symlink_to("/dev/zero"),
        "not a regular file (a character device)",
        "symlink pointing outside the data folder",
    ),
    "loop.jpeg": (lambda p: p.symlink_to(p.name), "symlink loop", "symlink loop"),
    "dangling.jpeg": (lambda p: p.symlink_to(p.parent / "gone.jpeg"), "broken symlink", "broken symlink"),
    "huge.jpeg": (
        lambda p: _sparse(p, 4 * GB),
        "file too large (4096 MB, the limit is 64 MB",
        "file too large (4096 MB, the limit is 64 MB",
    ),
    "empty.jpeg": (lambda p: p.write_bytes(b""), "empty file (0 bytes)", "empty file (0 bytes)"),
    "truncated.jpeg": (None, "corrupt or truncated image", "corrupt or truncated image"),
    "text.jpeg": (
        lambda p: p.write_text("<html>not an image</html>\n" * 40),
        "not a readable image",
        "not a readable image",
    ),
    "bomb.png": (
        lambda p: p.write_bytes(png_with_size(40_000, 40_000)),
        "image too large to decode safely",
        "image too large to decode safely",
    ),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """<root>/test/<CLASS>/: good images under odd names, and every kind of bad file in NORMAL/."""
    root = tmp_path_factory.mktemp("hostile") / "chest_xray"
    i = 0
    for cls, names in GOOD.items():
        folder = root / "test" / cls
        folder.mkdir(parents=True)
        for name in names:
            Image.fromarray(render(7, i, int(cls == "PNEUMONIA"), size=64)).save(
                folder / name, "PNG" if name.endswith(".png") else "JPEG"
            )
            i += 1
    bad = root / "test" / "NORMAL"
    for name, (make, _, _) in BAD.items():
        if make is None:  # truncated: a third of a good JPEG
            data = (bad / "plain.jpeg").read_bytes()
            (bad / name).write_bytes(data[: len(data) // 3])
        else:
            make(bad / name)
    return root


def _paths(root: Path) -> dict[str, str]:
    """Full path -> name of every entry in the corpus."""
    return {str(p): p.name for p in sorted((root / "test").glob("*/*"))}


def test_predict_on_the_hostile_corpus(tiny_model, corpus):
    res, peak = run_measured("-m", "xray_ray", "predict", "--model", str(tiny_model), str(corpus), timeout=180)
    assert res.returncode == 1, res.stderr  # documented: 1 when some files failed
    assert "Traceback" not in res.stderr
    assert peak < GB, f"peak RSS {peak / 2**20:.0f} MB"
    out = res.stdout.splitlines()
    rows = [json.loads(line) for line in out]
    expected = _paths(corpus)
    assert len(out) == len(expected) and sorted(r["path"] for r in rows) == sorted(expected)  # one line each
    by_name = {expected[r["path"]]: r for r in rows}
    for _cls, names in GOOD.items():
        for name in names:
            assert 0 <= by_name[name]["prob_pneumonia"] <= 1 and by_name[name]["label"] in ("NORMAL", "PNEUMONIA")
    for name, (_, says, _) in BAD.items():
        assert set(by_name[name]) == {"path", "error"} and by_name[name]["error"].startswith(says), by_name[name]


def test_evaluate_on_the_hostile_corpus(tiny_model, corpus):
    text, peak_text = run_measured(
        "-m",
        "xray_ray",
        "evaluate",
        "--model",
        str(tiny_model),
        "--data",
        str(corpus),
        "--split",
        "test",
        "--n-boot",
        "20",
        timeout=180,
    )
    res, peak = run_measured(
        "-m",
        "xray_ray",
        "evaluate",
        "--model",
        str(tiny_model),
        "--data",
        str(corpus),
        "--split",
        "test",
        "--n-boot",
        "20",
        "--json",
        timeout=180,
    )
    for r, p in ((text, peak_text), (res, peak)):
        assert r.returncode == 0, r.stderr  # documented: skipped files are listed, never fatal
        assert "Traceback" not in r.stderr
        assert p < GB, f"peak RSS {p / 2**20:.0f} MB"
    result = json.loads(res.stdout)
    assert result["metrics"]["n"] == sum(map(len, GOOD.values()))
    skipped = {s["path"]: s["reason"] for s in result["skipped_files"]}
    assert set(skipped) == {f"test/NORMAL/{name}" for name in BAD} and result["skipped"] == len(BAD)
    for name, (_, _, says) in BAD.items():
        assert skipped[f"test/NORMAL/{name}"].startswith(says), (name, skipped[f"test/NORMAL/{name}"])
    listed = [line for line in text.stdout.splitlines() if line.startswith("skipped ")]
    assert len(listed) == len(BAD)  # one line per skipped file
    for name, (_, _, says) in BAD.items():
        assert sum(line.startswith(f'skipped "test/NORMAL/{name}": {says}') for line in listed) == 1, name
