"""`python -m xray_ray.data inspect`: counts, duplicates, skipped files, the split; clean errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xray_ray.data.inspect import main
from xray_ray.data.sources import load_source
from xray_ray.data.splits import UNMATCHED

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


def test_inspect_k_classes_json_and_text(tmp_path, make_kaggle_tree, capsys):
    files = {
        ("train", "NORMAL"): ["IM-0001-0001.jpeg", "IM-0001-0002.jpeg", "IM-0002-0001.jpeg"],
        ("train", "PNEUMONIA"): ["person1_bacteria_1.jpeg", "person2_virus_2.jpeg"],
        ("train", "tb"): ["tb-1.jpeg", "tb-2.jpeg", "tb-3.jpeg", "tb-4.jpeg"],
        ("test", "TB"): ["tb-9.jpeg"],
    }
    root = make_kaggle_tree(tmp_path / "d", files)
    assert main(["inspect", str(root), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classes"] == ["NORMAL", "PNEUMONIA", "TB"]
    assert report["by_split"]["train"] == {"NORMAL": 3, "PNEUMONIA": 2, "TB": 4, "total": 9}
    assert report["patients_by_class"] == {"NORMAL": 2, "PNEUMONIA": 2, "TB": 5}
    split = report["split"]
    assert set(split["patients_by_class"]) == set(split["counts"])
    assert split["patients_by_class"]["test"] == {"NORMAL": 0, "PNEUMONIA": 0, "TB": 1}
    assert sum(p["TB"] for p in split["patients_by_class"].values()) == 5
    res = run_cli("inspect", str(root))
    assert res.returncode == 0, res.stderr
    assert "classes (3, labels 0..2): NORMAL, PNEUMONIA, TB" in res.stdout
    assert "patients: 9 (NORMAL 2, PNEUMONIA 2, TB 5)" in res.stdout and "patients per class:" in res.stdout
    header = next(line for line in res.stdout.splitlines() if line.split()[:3] == ["NORMAL", "PNEUMONIA", "TB"])
    assert header.split() == ["NORMAL", "PNEUMONIA", "TB", "total"]


def test_inspect_subtype_labels(kaggle_dir, capsys):
    assert main(["inspect", str(kaggle_dir), "--labels", "subtype", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["classes"] == ["NORMAL", "BACTERIA", "VIRUS"]
    assert report["by_split"]["train"] == {"NORMAL": 8, "BACTERIA": 8, "VIRUS": 4, "total": 20}
    assert report["patients_by_class"]["VIRUS"] == 6  # train 4, val 1, test 1: one image each
    res = run_cli("inspect", "synthetic:100", "--labels", "subtype")
    assert res.returncode == 2 and res.stderr.startswith("error: --labels subtype") and res.stderr.count("\n") == 1


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
    # every name parses; the seed-0 split as docs/results.md gives it (patient keys by series)
    assert report["source"]["patient_keys"]["patterns"] == {
        "personN_bacteria_M": 2538,
        "personN_virus_M": 1345,
        "NORMAL2-IM-XXXX-YYYY": 752,
        "IM-XXXX-YYYY": 597,
        UNMATCHED: 0,
    }
    assert report["patients"] == 3669
    split = report["split"]
    assert split["leakage"] == [] and split["counts"]["extra_val"]["total"] == 16
    assert {k: v["total"] for k, v in split["counts"].items()} == {
        "train": 4164,
        "val": 525,
        "test": 527,
        "extra_val": 16,
    }


def load_patient(uid: str) -> str:
    from xray_ray.data.splits import patient_from_name

    return patient_from_name(uid)


# named as the Kaggle download is: train and test share person numbers, never within one series
STANDARD_NAMES = {
    ("train", "NORMAL"): ["IM-0001-0001.jpeg", "IM-0002-0001.jpeg", "NORMAL2-IM-0001-0001.jpeg", "IM-0003-0001.jpeg"],
    ("train", "PNEUMONIA"): [
        "person1_bacteria_1.jpeg",
        "person1_bacteria_2.jpeg",
        "person2_virus_3.jpeg",
        "person3_bacteria_4.jpeg",
        "person4_virus_5.jpeg",
        "person5_bacteria_6.jpeg",
    ],
    ("test", "NORMAL"): ["NORMAL2-IM-0002-0001.jpeg", "IM-0009-0001.jpeg"],
    ("test", "PNEUMONIA"): ["person1_virus_7.jpeg", "person2_bacteria_8.jpeg", "person3_virus_9.jpeg"],
}


def test_the_standard_download_loses_no_train_image_to_a_false_leak(make_kaggle_tree, tmp_path, capsys):
    root = make_kaggle_tree(tmp_path / "chest_xray", STANDARD_NAMES)
    assert main(["inspect", str(root), "--json", "--min-val-images", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["split"]["leakage"] == [] and report["split"]["dropped"] == 0
    assert sum(c["total"] for k, c in report["split"]["counts"].items() if k != "test") == 10  # all of train
    assert report["source"]["patient_keys"]["patterns"]["personN_virus_M"] == 4


def test_a_real_leak_drops_exactly_the_train_images_of_it(make_kaggle_tree, tmp_path, capsys):
    files = {k: list(v) for k, v in STANDARD_NAMES.items()}
    files[("test", "PNEUMONIA")].append("person1_bacteria_30.jpeg")  # the same series and number as in train
    root = make_kaggle_tree(tmp_path / "chest_xray", files)
    # and the same bytes under another name: a copy of a train image in test
    shutil.copyfile(root / "train/PNEUMONIA/person4_virus_5.jpeg", root / "test/PNEUMONIA/person40_virus_99.jpeg")
    assert main(["inspect", str(root), "--json", "--min-val-images", "1"]) == 0
    split = json.loads(capsys.readouterr().out)["split"]
    dropped = sorted(u for leak in split["leakage"] for u in leak["dropped"])
    assert dropped == [
        "train/PNEUMONIA/person1_bacteria_1.jpeg",
        "train/PNEUMONIA/person1_bacteria_2.jpeg",
        "train/PNEUMONIA/person4_virus_5.jpeg",
    ]
    assert split["dropped"] == 3 and {leak["kept_split"] for leak in split["leakage"]} == {"test"}
    assert [leak["identical_bytes"] for leak in split["leakage"]].count(True) == 1


def test_inspect_shows_how_names_became_patient_keys(make_kaggle_tree, tmp_path, capsys):
    files = {k: list(v) for k, v in STANDARD_NAMES.items()}
    files[("train", "NORMAL")].append("scan_17.jpeg")
    root = make_kaggle_tree(tmp_path / "chest_xray", files)
    assert main(["inspect", str(root), "--min-val-images", "1"]) == 0
    out = capsys.readouterr().out
    assert "      4  personN_virus_M" in out and "      5  personN_bacteria_M" in out
    assert "matched by none, e.g. train/NORMAL/scan_17.jpeg" in out


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
