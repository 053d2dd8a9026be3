"""K > 2 classes end to end: one search on a folder of four classes of phantoms, the arg-max winner exported
(ONNX and TorchScript `probs` [N, K]), read back by predict, evaluate and batchnorm adaptation.

One search serves every test here (each end-to-end search costs half a minute on 2 cores); `synthetic:N:K`
is read in tests/data/test_labels.py and the K-class model trained in tests/model/test_multiclass.py."""

import json

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from xray_ray.data.images import load_gray
from xray_ray.data.phantoms import PHANTOM_CLASSES, render
from xray_ray.search.command import main
from xray_ray.serve.runtime import load_exported

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::FutureWarning")]

SPACE = {
    "name": "kclass",
    "space": {
        "image_size": 32,
        "epochs": 3,
        "blocks": 2,
        "double_conv": False,
        "width": {"type": "categorical", "choices": [8, 12]},
        "head": "gap",
        "fc": [],
        "lr": {"type": "float", "low": 2.0e-3, "high": 6.0e-3, "log": True},
        "batch_size": 32,
        "mixup": {"type": "categorical", "choices": [0.0, 0.4]},
        "sampler": "balanced",
        "vflip": 0.0,
    },
    "searcher": {"algorithm": "optuna", "num_samples": 3, "max_concurrent": 2, "seed": 0},
    "scheduler": {"algorithm": "asha", "grace_period": 1, "reduction_factor": 2},  # no metric: K > 2 -> val_auc
    "data": {"val_fraction": 0.2, "test_fraction": 0.2},
}


def _folder(root, classes, per_class=(36, 10, 10), size=48):
    """A Kaggle-layout folder of phantoms, one class folder per name (label i renders PHANTOM_CLASSES[i])."""
    i = 0
    for split, n in zip(("train", "val", "test"), per_class):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(n):
                Image.fromarray(render(3, i, label, size=size)).save(folder / f"IM-{i:04d}-0001.jpeg", quality=92)
                i += 1
    return root


def _search(tmp, data, *extra):
    space = tmp / "kclass.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    args = ["--data", data, "--space", str(space), "--results", str(tmp / "results"), "--cache", str(tmp / "cache")]
    assert main([*args, "--seed", "1", *extra]) == 0
    return tmp / "results" / "kclass"


CLASSES = list(PHANTOM_CLASSES[:4])


@pytest.fixture(scope="module")
def k_class_run(tmp_path_factory, module_ray):
    tmp = tmp_path_factory.mktemp("k4")
    return _search(tmp, str(_folder(tmp / "data", CLASSES)))


def test_a_four_class_search_compares_on_macro_auc_and_records_the_k_class_columns(k_class_run):
    run = json.loads((k_class_run / "run.json").read_text())
    assert run["data"]["classes"] == CLASSES
    assert run["space"]["scheduler"]["metric"] == "val_auc"  # the space names none: K > 2 compares on macro AUC
    trials = pd.read_parquet(k_class_run / "trials.parquet")
    epochs = pd.read_parquet(k_class_run / "epochs.parquet")
    for col in ("best_val_auc", "best_val_balanced_acc", "best_val_macro_f1", "best_val_loss"):
        assert trials[col].between(0, 10).all(), col
    assert epochs["val_balanced_acc"].between(0, 1).all() and epochs["val_macro_f1"].between(0, 1).all()
    assert trials["best_val_auc"].max() > 0.6  # learning: chance is 0.5 (the patterns are subtle at 32 px)


def test_the_four_class_winner_is_exported_with_its_classes_and_the_argmax_rule(k_class_run):
    best = k_class_run / "best"
    card = json.loads((best / "model.json").read_text())
    assert card["classes"] == CLASSES and card["decision"] == "argmax"
    assert card["threshold"] is None and card["output"] == {**card["output"], "name": "probs", "shape": ["N", 4]}
    test = card["metrics"]["test"]
    assert np.array(test["confusion"]).shape == (4, 4) and sum(map(sum, test["confusion"])) == test["n"]
    assert set(test["per_class"]) == set(CLASSES) and "normal_vs_rest" in test
    lo, hi = test["ci"]["macro_auc"]
    assert lo <= test["macro_auc"] <= hi
    model = load_exported(best)
    assert list(model.classes) == CLASSES
    assert card["export"]["max_abs_diff"] < 1e-4


def test_onnx_and_torchscript_agree_on_real_images(k_class_run, real_data):
    best = k_class_run / "best"
    files = sorted((real_data / "train" / "PNEUMONIA").glob("*.jpeg"))[:6]
    files += sorted((real_data / "train" / "NORMAL").glob("*.jpeg"))[:6]
    x = np.stack([load_gray(f.read_bytes(), 32) for f in files]).astype(np.float32)[:, None] / 255.0
    session = ort.InferenceSession(str(best / "model.onnx"), providers=["CPUExecutionProvider"])
    (p_onnx,) = session.run(["probs"], {"image": x})
    with torch.no_grad():
        p_ts = torch.jit.load(str(best / "model.pt"))(torch.from_numpy(x)).numpy()
    assert p_onnx.shape == (12, 4) and np.abs(p_onnx - p_ts).max() < 1e-4
    assert np.allclose(p_onnx.sum(axis=1), 1, atol=1e-5)


def test_predict_and_evaluate_read_four_classes(k_class_run, tmp_path, capsys):
    from xray_ray.serve.evaluate import main as evaluate_main
    from xray_ray.serve.predict import main as predict_main

    best = k_class_run / "best"
    folder = _folder(tmp_path / "site", CLASSES, per_class=(0, 0, 8))
    out = tmp_path / "predictions.csv"
    assert predict_main(["--model", str(best), str(folder / "test"), "--csv", str(out)]) == 0
    rows = pd.read_csv(out)
    assert len(rows) == 32 and set(rows["label"]) <= set(CLASSES)
    probs = rows[[f"prob_{c}" for c in CLASSES]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    capsys.readouterr()
    assert evaluate_main(["--model", str(best), "--data", str(folder), "--split", "test", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    text = json.dumps(figures)
    assert "balanced_accuracy" in text and "confusion" in text and "normal_vs_rest" in text
    assert evaluate_main(["--model", str(best), "--data", str(folder), "--split", "test"]) == 0
    table = capsys.readouterr().out
    assert all(c in table for c in CLASSES) and "balanced" in table.lower()


def test_batchnorm_adaptation_keeps_a_four_class_output(k_class_run, tmp_path):
    from xray_ray.ship.batchnorm import main as batchnorm_main

    site = _folder(tmp_path / "site", CLASSES, per_class=(0, 0, 34))
    out = tmp_path / "adapted"
    args = ["--model", str(k_class_run / "best"), "--images", str(site / "test"), "--batchnorm", "--out", str(out)]
    assert batchnorm_main(args) == 0
    model = load_exported(out)
    assert list(model.classes) == CLASSES and model.card["adaptation"]["images"] == 136
    (inp,) = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).get_outputs()
    assert inp.name == "probs" and inp.shape[1] == 4


def test_stability_refuses_a_k_class_run_in_one_sentence(k_class_run, capsys):
    from xray_ray.studies.stability import main as stability_main

    assert stability_main(["--run", str(k_class_run), "--seeds", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "two-class runs only" in err and len(err.splitlines()) == 1
