"""The pictures and report.html of a winner with three classes (arg-max decision, no threshold), built here from a
synthetic card and predictions the way ship/winner.py builds them (xray_ray.metrics' multiclass functions), with a
tiny three-output CNN for Grad-CAM; the report is then opened in headless Chromium (tests/browser.py).

Set XRAY_RAY_KCLASS_SCREENSHOT=path to keep a screenshot of the page's top.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from xray_ray.common import json_safe
from xray_ray.data.phantoms import render
from xray_ray.metrics import multiclass_bootstrap, multiclass_metrics, roc_auc
from xray_ray.ship import pictures, pictures_k, report, saliency

CLASSES = ("NORMAL", "BACTERIA", "VIRUS")
SIZE = 32
SPLITS = {"val": (60, 1), "test": (75, 2)}


def make_preds(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, probabilities [n, 3] that favour the true class, patients: two images each)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    logits = rng.normal(0, 1, (n, 3))
    logits[np.arange(n), y] += 1.6
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs, np.arange(n) // 2


def normal_vs_rest(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    sick, called = y != 0, probs.argmax(axis=1) != 0
    return {
        "sensitivity": float(called[sick].mean()),
        "specificity": float((~called[~sick]).mean()),
        "roc_auc": roc_auc(sick.astype(int), 1 - probs[:, 0]),
        "accuracy": float((called == sick).mean()),
    }


def make_card(preds: dict, patients: dict) -> dict:
    """A K-class model card as the contract (notes: kclass_contract) has it, through JSON as model.json is."""
    metrics = {
        s: {
            **multiclass_metrics(y, p, CLASSES),
            "ci": multiclass_bootstrap(y, p, CLASSES, groups=patients[s], n_boot=200),
            "normal_vs_rest": normal_vs_rest(y, p),
        }
        for s, (y, p) in preds.items()
    }
    counts = {
        s: {"n": len(y), **{c: int((y == i).sum()) for i, c in enumerate(CLASSES)}, "patients": len(set(patients[s]))}
        for s, (y, _) in preds.items()
    }
    card = {
        "created": "2026-01-01T00:00:00+00:00",
        "trial_id": "t_a",
        "classes": list(CLASSES),
        "input": {"name": "image", "size": SIZE, "shape": ["N", 1, SIZE, SIZE]},
        "output": {"name": "probs", "shape": ["N", 3], "dtype": "float32", "meaning": "probability of each class"},
        "threshold": None,
        "decision": {"rule": "argmax", "meaning": "the class with the highest probability"},
        "model": {"preset": "tiny"},
        "trial": {"id": "t_a", "selection_metric": "val_auc", "config": {"lr": 1e-3}},
        "metrics": metrics,
        "bootstrap": {"n_boot": 200, "unit": "patient", "alpha": 0.05, "seed": 0},
        "data": {"source": "synthetic", "counts": counts},
        "export": {"onnx": "model.onnx", "torchscript": "model.pt", "max_abs_diff": 1e-7, "tolerance": 1e-4},
        "versions": {"torch": torch.__version__},
    }
    return json.loads(json.dumps(json_safe(card)))


def tiny_model() -> nn.Module:
    """Three logits from one conv block: pictures._last_activation finds its ReLU."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )


def search_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    trials = pd.DataFrame(
        {
            "trial_id": ["t_a", "t_b"],
            "status": ["completed", "stopped"],
            "epochs_run": [3, 1],
            "best_val_auc": [0.9, 0.7],
        }
    )
    epochs = pd.DataFrame(
        [
            {"trial_id": t, "epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e, "val_auc": 0.6 + 0.1 * e}
            for t, n in (("t_a", 3), ("t_b", 1))
            for e in range(1, n + 1)
        ]
    )
    return trials, epochs


@pytest.fixture(scope="module")
def k_report(tmp_path_factory):
    """(folder, card, preds) of a three-class winner's pictures and report."""
    out = tmp_path_factory.mktemp("best3")
    made = {s: make_preds(n, seed) for s, (n, seed) in SPLITS.items()}
    preds = {s: (y, p) for s, (y, p, _) in made.items()}
    card = make_card(preds, {s: g for s, (_, _, g) in made.items()})
    y_test = preds["test"][0]
    images = np.stack([render(3, i, int(lab > 0), size=SIZE) for i, lab in enumerate(y_test)])
    trials, epochs = search_tables()
    card["pictures"] = pictures.write_pictures(
        out,
        model=tiny_model(),
        preds=preds,
        auc={s: m["macro_auc"] for s, m in card["metrics"].items()},
        threshold=None,
        test_images=images,
        trials=trials,
        epochs=epochs,
        winner="t_a",
        classes=CLASSES,
    )
    (out / "model.json").write_text(json.dumps(card))
    report.write_html(out, card, trials, card["pictures"])
    return out, card, preds


def test_every_picture_is_drawn_for_three_classes(k_report):
    out, card, _ = k_report
    assert card["pictures"] == list(pictures.PICTURES) == list(pictures_k.PICTURES_K)
    sizes = {}
    for name in card["pictures"]:
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            sizes[name] = im.size
    assert all(w > 300 and h > 200 for w, h in sizes.values()), sizes
    # two splits: ROC and PR side by side, one panel each; the confusion matrices 3 x 3 each, side by side
    assert sizes["roc.png"][0] > 1.6 * sizes["roc.png"][1], sizes
    assert sizes["confusion.png"][0] > 1.6 * sizes["confusion.png"][1], sizes


def test_one_vs_rest_figures_match_the_card_metrics(k_report):
    _, card, preds = k_report
    for split, (y, p) in preds.items():
        figures = pictures_k.one_vs_rest(y, p, CLASSES)
        for name, f in figures.items():
            expected = card["metrics"][split]["per_class"][name]
            assert f["auc"] == pytest.approx(expected["auc"], abs=1e-12)
            assert f["sensitivity"] == pytest.approx(expected["sensitivity"], abs=1e-12)
            assert 1 - f["fpr"] == pytest.approx(expected["specificity"], abs=1e-12)
            assert f["precision"] == pytest.approx(expected["precision"], abs=1e-12)
            fpr, tpr = pictures_k.roc_curve(f["y"], f["p"])  # the drawn curve encloses the AUC in its legend
            assert np.trapezoid(tpr, fpr) == pytest.approx(f["auc"], abs=1e-12)


def test_one_vs_rest_names_a_class_the_split_does_not_hold():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]])  # called 0, 0, 1, 0
    figures = pictures_k.one_vs_rest(y, p, CLASSES)
    assert np.isnan(figures["VIRUS"]["auc"]) and np.isnan(figures["VIRUS"]["sensitivity"])
    assert figures["NORMAL"]["auc"] == 1.0 and figures["NORMAL"]["precision"] == pytest.approx(2 / 3)
    assert figures["BACTERIA"]["sensitivity"] == 0.5 and figures["BACTERIA"]["fpr"] == 0


def test_write_pictures_wants_a_threshold_for_two_classes_only(tmp_path):
    y, p, _ = make_preds(12, 0)
    trials, epochs = search_tables()
    common = dict(model=tiny_model(), auc={}, test_images=None, trials=trials, epochs=epochs, winner=None)
    with pytest.raises(ValueError, match="3 classes take no threshold"):
        pictures.write_pictures(tmp_path, preds={"val": (y, p)}, threshold=0.5, classes=CLASSES, **common)
    with pytest.raises(ValueError, match="2 classes take a threshold"):
        pictures.write_pictures(tmp_path, preds={"val": (y % 2, p[:, 1])}, threshold=None, **common)
    assert not list(tmp_path.iterdir())


def test_grad_cam_explains_the_class_it_is_asked_about():
    model = tiny_model()
    x = torch.from_numpy(np.stack([render(1, i, i % 2, size=SIZE) for i in range(6)])).float().div(255).unsqueeze(1)
    called = model(x).argmax(dim=1).numpy()
    maps = {c: saliency.grad_cam(model, x, None, target=np.full(6, c)) for c in range(3)}
    assert all(m.shape == (6, SIZE, SIZE) and m.min() >= 0 and m.max() <= 1 + 1e-6 for m in maps.values())
    assert not np.allclose(maps[0], maps[1]) and not np.allclose(maps[1], maps[2])
    by_default = saliency.grad_cam(model, x, None)  # no target: the arg-max of the logits
    assert np.allclose(by_default, np.stack([maps[c][i] for i, c in enumerate(called)]))
    assert all(not m._forward_hooks for m in model.modules())


def test_pick_examples_mixes_the_classes_and_knows_right_from_wrong():
    y, p, _ = make_preds(60, 4)
    picks = saliency.pick_examples(y, p, None, k=3)
    assert [c for _, c in picks] == [True] * 3 + [False] * 3
    assert all((p[i].argmax() == y[i]) == c for i, c in picks)
    assert sorted(int(y[i]) for i, c in picks if c) == [0, 1, 2]  # one of each class before a second of any
    caption = pictures_k.saliency_caption(2, np.array([0.1, 0.7, 0.2]), False, None, CLASSES)
    assert caption == "WRONG true VIRUS\ncalled BACTERIA p=0.700"


def _text(fragment: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fragment)).strip()


def test_the_html_names_the_rule_every_class_the_counts_and_the_intervals(k_report):
    out, card, _ = k_report
    page = (out / "report.html").read_text()
    text = _text(page)
    assert "in output order: 0 = NORMAL, 1 = BACTERIA, 2 = VIRUS" in text
    assert "<b>argmax</b>: the class with the highest probability" in page
    assert "<h2>Threshold</h2>" not in page and "PNEUMONIA" not in page
    test = card["metrics"]["test"]
    lo, hi = test["ci"]["balanced_accuracy"]
    assert "balanced accuracy" in text and f"{test['balanced_accuracy']:.3f} [{lo:.3f}, {hi:.3f}]" in text
    lo, hi = test["ci"]["sensitivity__VIRUS"]
    assert f"{test['per_class']['VIRUS']['sensitivity']:.3f} [{lo:.3f}, {hi:.3f}]" in text
    assert f"log-loss {card['metrics']['val']['log_loss']:.3f} {test['log_loss']:.3f}" in text
    counts = card["data"]["counts"]["test"]
    assert f"test {counts['n']} {counts['NORMAL']} {counts['BACTERIA']} {counts['VIRUS']} {counts['patients']}" in text
    assert "NORMAL against the rest" in text


CONFUSION_JS = """JSON.stringify([...document.querySelectorAll('table.confusion')].map(t => ({
  caption: t.caption.textContent,
  head: [...t.rows[0].cells].map(c => c.textContent.trim()),
  rows: [...t.rows].slice(1).map(r => [...r.cells].map(c => c.textContent.trim())),
})))"""
ROWS_JS = """JSON.stringify([...document.querySelectorAll('table')].map(t => [...t.rows].map(
  r => [...r.cells].map(c => c.textContent.trim()))))"""


def _evaluate(browser, expression: str):
    result = browser.send("Runtime.evaluate", session=browser.session, expression=expression, returnByValue=True)
    return json.loads(result["result"]["value"])


def test_the_three_class_report_renders_in_a_browser(browser, k_report, tmp_path):
    out, card, _ = k_report
    facts = browser.open(out / "report.html", width=1160, height=1000)
    assert browser.errors() == [], browser.errors()
    assert facts["title"] == "xray_ray report"
    assert sorted(img["alt"] for img in facts["images"]) == sorted(p.name for p in out.glob("*.png"))
    assert all(img["complete"] and img["width"] > 0 for img in facts["images"]), facts["images"]
    assert {"Decision", "Metrics", "Pictures", "Data", "Leaderboard"} <= set(facts["headings"])
    assert "Threshold" not in facts["headings"]
    assert set(facts["metricRows"]) >= {"accuracy", "balanced accuracy", "macro F1", "macro AUC (one vs rest)"}
    # what a person reads in each confusion table: the class names and the card's counts, row by row
    tables = _evaluate(browser, CONFUSION_JS)
    assert [t["caption"] for t in tables] == [f"{s} (n={card['metrics'][s]['n']})" for s in card["metrics"]]
    for table, m in zip(tables, card["metrics"].values()):
        assert table["head"] == ["true \\ called", *CLASSES, "images"]
        for row, name, counts in zip(table["rows"], CLASSES, m["confusion"]):
            assert row[0] == name
            assert [int(cell.split()[0]) for cell in row[1:-1]] == counts
            assert int(row[-1]) == sum(counts) == m["per_class"][name]["n"]
    # the per-class table: a row per split and class, the interval beside each sensitivity
    per_class = next(t for t in _evaluate(browser, ROWS_JS) if t[0][:3] == ["split", "class", "images"])
    assert len(per_class) == 1 + len(CLASSES) * len(card["metrics"])
    lo, hi = card["metrics"]["val"]["ci"]["sensitivity__NORMAL"]
    assert per_class[1][:2] == ["val", "NORMAL"] and per_class[1][3].endswith(f"[{lo:.3f}, {hi:.3f}]")
    target = os.environ.get("XRAY_RAY_KCLASS_SCREENSHOT")
    shot = Path(target) if target else tmp_path / "report3.png"
    browser.screenshot(shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
