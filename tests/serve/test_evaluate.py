"""`xray-ray evaluate`: an exported model scored on any data source, with onnxruntime."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import REAL_DATA, run_module
from xray_ray.data.images import load_gray
from xray_ray.data.phantoms import render
from xray_ray.data.prepare import prepare
from xray_ray.data.sources import load_source
from xray_ray.data.splits import assign_splits
from xray_ray.metrics import binary_metrics
from xray_ray.model.cnn import build_model
from xray_ray.serve import evaluate
from xray_ray.serve.runtime import load_exported
from xray_ray.ship.winner import finalize

SIZE = 32


def cli(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
    return run_module("", *args, code=code) if code else run_module("xray_ray", "evaluate", *args)


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny CNN finalized on synthetic data split as a search splits it; (model folder, card)."""
    torch.manual_seed(0)
    df, split_info = assign_splits(load_source("synthetic:60", seed=3).df, seed=3, val_fraction=0.2, test_fraction=0.2)
    splits = prepare(df, SIZE, tmp_path_factory.mktemp("cache")).splits
    out = tmp_path_factory.mktemp("model")
    info = {"seed": 3, "data": {"spec": "synthetic:60", "splits": split_info}}
    card = finalize(out, build_model("tiny", image_size=SIZE), splits, info, pd.DataFrame(), pd.DataFrame(), n_boot=20)
    return out, card


@pytest.fixture(scope="module")
def model_dir(searched) -> Path:
    return searched[0]


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory) -> Path:
    """A small folder in the Kaggle layout with Kermany-style names, two images per patient, one corrupt."""
    root = tmp_path_factory.mktemp("kaggle") / "chest_xray"
    i = 0
    for split, n in (("train", 8), ("test", 12)):
        for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for k in range(n // 2):
                patient = 100 * (split == "test") + k // 2
                name = f"person{patient}_bacteria_{k}.jpeg" if label else f"IM-{patient:04d}-{k:04d}.jpeg"
                Image.fromarray(render(5, i, label)).save(folder / name, quality=92)
                i += 1
    good = (root / "test" / "NORMAL" / "IM-0100-0000.jpeg").read_bytes()
    (root / "test" / "NORMAL" / "IM-0199-0001.jpeg").write_bytes(good[:200])
    return root


def test_evaluate_prints_a_metrics_table_for_a_folder(model_dir, kaggle):
    res = cli("--model", str(model_dir), "--data", str(kaggle), "--split", "test", "--n-boot", "50")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "12 images (6 PNEUMONIA, 6 NORMAL" in out and "1 skipped" in out
    model = load_exported(model_dir)
    assert f"threshold {model.threshold:.4f}" in out and "threshold 0.5" in out
    for metric in ("roc_auc", "pr_auc", "recall (sens.)", "specificity", "accuracy", "brier", "ece"):
        assert metric in out
    assert "[" in out.split("accuracy", 1)[1].splitlines()[0]  # value [lo, hi]


def test_evaluate_json_matches_scoring_the_files_directly(model_dir, kaggle, capsys):
    assert (
        evaluate.main(["--model", str(model_dir), "--data", str(kaggle), "--split", "test", "--json", "--n-boot", "50"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    model = load_exported(model_dir)
    files = sorted(p for p in (kaggle / "test").rglob("*.jpeg") if p.name != "IM-0199-0001.jpeg")
    x = np.stack([load_gray(p.read_bytes(), SIZE) for p in files]).astype(np.float32)[:, None] / 255
    y = np.array([int(p.parent.name == "PNEUMONIA") for p in files])
    expected = binary_metrics(y, model.predict(x), model.threshold)
    got = result["metrics"]["at_threshold"]
    assert {k: got[k] for k in ("tp", "fp", "tn", "fn")} == {k: expected[k] for k in ("tp", "fp", "tn", "fn")}
    assert got["brier"] == pytest.approx(expected["brier"], abs=1e-6)
    assert result["metrics"]["n"] == 12 and result["metrics"]["patients"] == 6
    assert result["threshold"] == model.threshold and result["split_column"] == "orig_split"
    assert set(result["metrics"]["at_0.5"]["ci"]) >= {"accuracy", "roc_auc", "recall", "specificity"}


def test_a_missing_split_names_the_ones_there_are(model_dir, kaggle):
    res = cli("--model", str(model_dir), "--data", str(kaggle), "--split", "val")
    assert res.returncode == 2 and res.stdout == "" and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: the data has no 'val' split, only test, train")
    res = cli("--model", str(kaggle), "--data", str(kaggle))
    assert res.returncode == 2 and "not a model folder" in res.stderr and "Traceback" not in res.stderr


def test_resplit_reproduces_the_cards_test_numbers(searched, capsys):
    model_dir, card = searched
    assert evaluate.main(["--model", str(model_dir), "--data", "synthetic:60", "--split", "test"]) == 2
    assert "only train" in capsys.readouterr().err  # synthetic data has one given split
    assert (
        evaluate.main(
            [
                "--model",
                str(model_dir),
                "--data",
                "synthetic:60",
                "--split",
                "test",
                "--resplit",
                "--json",
                "--n-boot",
                "20",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["seed"] == 3 and result["split_column"] == "split" and result["same_images_as_search"] is True
    assert captured.err == ""
    for key in ("n", "patients", "prevalence", "counts"):
        assert result["metrics"][key] == card["metrics"]["test"][key]
    for t in ("at_threshold", "at_0.5"):
        got, want = result["metrics"][t], card["metrics"]["test"][t]
        for k in ("tp", "fp", "tn", "fn"):
            assert got[k] == want[k]
        for k in ("roc_auc", "brier", "ece"):
            assert got[k] == pytest.approx(want[k], abs=1e-6)


def test_changed_data_is_flagged(model_dir, capsys):
    """Other synthetic images under the same uids (another seed): evaluate warns that they differ."""
    assert (
        evaluate.main(
            [
                "--model",
                str(model_dir),
                "--data",
                "synthetic:60",
                "--split",
                "test",
                "--resplit",
                "--seed",
                "4",
                "--n-boot",
                "10",
            ]
        )
        == 0
    )
    assert "not the images the search scored" in capsys.readouterr().err


def test_evaluate_runs_without_torch(model_dir, kaggle):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from xray_ray.serve import evaluate\n"
        "rc = evaluate.main(sys.argv[1:])\n"
        "assert sys.modules['torch'] is None\n"
        "sys.exit(rc)\n"
    )
    res = cli("--model", str(model_dir), "--data", str(kaggle), "--split", "all", "--json", "--n-boot", "10", code=code)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["metrics"]["n"] == 20


@pytest.mark.realdata
@pytest.mark.skipif(not (REAL_DATA / "val").is_dir(), reason=f"real chest X-rays not found at {REAL_DATA}")
def test_evaluate_on_real_chest_xrays(model_dir, tmp_path, capsys):
    # Only the official val images (original sizes), copied into a Kaggle layout of their own, so the
    # test does not hash and decode the 5216 train images.
    shutil.copytree(REAL_DATA / "val", tmp_path / "val")
    assert (
        evaluate.main(
            ["--model", str(model_dir), "--data", str(tmp_path), "--split", "val", "--json", "--n-boot", "100"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    m = result["metrics"]
    assert m["n"] == 16 and m["counts"] == {"NORMAL": 8, "PNEUMONIA": 8} and result["skipped"] == 0
    assert m["at_threshold"]["tp"] + m["at_threshold"]["fn"] == 8
    assert 0 <= m["at_0.5"]["roc_auc"] <= 1


# ---------------------------------------------------------------- reliability II (issue 15)


def test_every_skipped_file_is_named_with_its_reason(model_dir, kaggle, tmp_path, capsys):
    data = tmp_path / "chest_xray"
    shutil.copytree(kaggle, data)
    os.mkfifo(data / "test" / "NORMAL" / "x.jpeg")
    with (data / "test" / "PNEUMONIA" / "big.jpeg").open("wb") as f:
        f.truncate(200 << 20)  # sparse: the size cap refuses it unread
    (data / "test" / "PNEUMONIA" / "notes.txt").write_text("x")
    expected = {
        "test/NORMAL/IM-0199-0001.jpeg": "corrupt or truncated image",
        "test/NORMAL/x.jpeg": "not a regular file",
        "test/PNEUMONIA/big.jpeg": "file too large (200 MB, the limit is 64 MB)",
        "test/PNEUMONIA/notes.txt": "not an image file",
    }
    assert (
        evaluate.main(["--model", str(model_dir), "--data", str(data), "--split", "test", "--json", "--n-boot", "10"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    got = {s["path"]: s["reason"] for s in result["skipped_files"]}
    assert set(got) == set(expected) and result["skipped"] == len(expected)
    assert all(got[p].startswith(expected[p]) for p in expected), got
    assert evaluate.main(["--model", str(model_dir), "--data", str(data), "--split", "test", "--n-boot", "10"]) == 0
    out = capsys.readouterr().out
    assert f"{len(expected)} skipped" in out
    listed = [line for line in out.splitlines() if line.startswith("skipped ")]
    assert len(listed) == len(expected)
    for path, reason in expected.items():
        assert any(line.startswith(f'skipped "{path}": {reason}') for line in listed), (path, listed)
