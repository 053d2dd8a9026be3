"""`python -m xray_ray.data inspect`: counts, duplicates, skipped files, the split; clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xray_ray.data.inspect import main
from xray_ray.data.sources import load_source

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "xray_ray.data", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
    )


def test_inspect_json_reports_counts_duplicates_skips_and_split(kaggle_dir, capsys):
    (kaggle_dir / "train" / "NORMAL" / "IM-0009-0001.jpeg").write_bytes(
        (kaggle_dir / "train" / "NORMAL" / "IM-0004-0001.jpeg").read_bytes()
    )  # a byte-identical copy
    (kaggle_dir / "train" / "NORMAL" / "IM-0010-0001.jpeg").write_bytes(b"")
    assert main(["inspect", str(kaggle_dir), "--json", "--seed", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["by_split"]["train"] == {"NORMAL": 9, "PNEUMONIA": 12, "total": 21}
    assert report["by_split"]["val"]["total"] == 4 and report["by_split"]["test"]["total"] == 6
    assert report["duplicates"]["groups"] == 1
    assert report["duplicates"]["list"] == [["train/NORMAL/IM-0004-0001.jpeg", "train/NORMAL/IM-0009-0001.jpeg"]]
    assert report["skipped"] == [{"path": "train/NORMAL/IM-0010-0001.jpeg", "reason": "empty file (0 bytes)"}]
    assert report["patients"] == len(load_source(str(kaggle_dir)).df["patient"].unique())
    split = report["split"]
    assert split["seed"] == 3 and split["duplicate_groups"] == 1
    assert split["val_source"] == "carved from train" and split["test_source"] == "given test"
    assert set(split["counts"]) == {"train", "val", "test", "extra_val"}


def test_inspect_text_runs_as_a_module(kaggle_dir):
    res = run_cli("inspect", str(kaggle_dir))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "byte-identical duplicate groups: 0" in out and "skipped files: 0" in out
    assert "extra_val" in out and "patients" in out
    train_line = next(line for line in out.splitlines() if line.strip().startswith("train"))
    assert train_line.split()[1:4] == ["8", "12", "20"]


def test_inspect_synthetic_text(capsys):
    assert main(["inspect", "synthetic:100", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "synthetic" in out and "split (seed 1" in out


@pytest.mark.parametrize(
    "args, match",
    [
        (["inspect", "/definitely/not/here"], "does not exist"),
        (["inspect", "synthetic:3"], "N >= 20"),
        (["inspect", "synthetic", "--val-fraction", "2"], "val_fraction"),
    ],
)
def test_user_errors_exit_2_with_one_line_and_no_traceback(args, match):
    res = run_cli(*args)
    assert res.returncode == 2
    assert res.stderr.startswith("error: ") and match in res.stderr
    assert "Traceback" not in res.stderr and res.stderr.count("\n") == 1


@pytest.mark.slow  # scans and hashes the 5,232 real images
@pytest.mark.realdata
def test_inspect_the_real_data(real_data):
    res = run_cli("inspect", str(real_data), "--json", timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["by_split"]["train"] == {"NORMAL": 1341, "PNEUMONIA": 3875, "total": 5216}
    assert report["by_split"]["val"] == {"NORMAL": 8, "PNEUMONIA": 8, "total": 16}
    assert report["skipped"] == []
    dups = report["duplicates"]
    # measured on this copy: 24 sets of byte-identical files, 50 files, each set one patient's
    assert dups["groups"] == 24 and dups["images"] == 50
    patient = {u: load_patient(u) for group in dups["list"] for u in group}
    assert all(len({patient[u] for u in group}) == 1 for group in dups["list"])
    split = report["split"]
    assert split["leakage"] == [] and split["counts"]["extra_val"]["total"] == 16
    assert abs(split["counts"]["val"]["total"] - 522) < 20


def load_patient(uid: str) -> str:
    from xray_ray.data.splits import patient_from_name

    return patient_from_name(uid)


def test_inspect_accepts_a_folder_with_test_but_no_train(make_kaggle_tree, tmp_path, capsys):
    from conftest import KAGGLE_FILES

    root = make_kaggle_tree(tmp_path / "hospital", {k: v for k, v in KAGGLE_FILES.items() if k[0] == "test"})
    assert main(["inspect", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["by_split"] == {"test": {"NORMAL": 3, "PNEUMONIA": 3, "total": 6}}
    assert report["split"] is None and report["images"] == 6
    assert main(["inspect", str(root)]) == 0
    out = capsys.readouterr().out
    assert "split: none; the data has no train images" in out and "test" in out
