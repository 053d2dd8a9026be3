"""The winner: threshold on validation, test scored after, exports that agree, card, pictures, report."""

import json
import math

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch

from xray_ray.config import TrialConfig
from xray_ray.data.phantoms import render
from xray_ray.data.prepare import SplitArrays
from xray_ray.errors import UserError
from xray_ray.metrics import roc_auc
from xray_ray.model.cnn import build_model
from xray_ray.model.train import array_batches, make_loss, make_optimizer, train_one_epoch
from xray_ray.serve import runtime
from xray_ray.ship import export, report
from xray_ray.ship.winner import finalize

SIZE = 32
PICTURES = [
    "confusion.png",
    "roc.png",
    "pr.png",
    "calibration.png",
    "learning_curves.png",
    "search_history.png",
    "saliency.png",
]


def make_split(name: str, n: int, seed: int, labels: np.ndarray | None = None) -> SplitArrays:
    labels = np.array([i % 2 for i in range(n)], np.int64) if labels is None else labels
    images = np.stack([render(seed, i, int(lab), size=SIZE) for i, lab in enumerate(labels)])
    return SplitArrays(images, labels, [f"{name}/{i:03d}" for i in range(n)], [f"{name}-p{i // 2}" for i in range(n)])


def search_tables() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Trials and epochs as a search writes them: one completed, one stopped by ASHA, one errored."""
    trials = pd.DataFrame(
        {
            "trial_id": ["t_a", "t_b", "t_c"],
            "status": ["completed", "stopped", "errored"],
            "epochs_run": [3, 1, 0],
            "best_val_auc": [0.9, 0.7, np.nan],
            "best_metric": [0.9, 0.7, np.nan],
            "wall_seconds": [3.5, 1.0, 0.2],
        }
    )
    epochs = pd.DataFrame(
        [
            {
                "trial_id": t,
                "epoch": e,
                "train_loss": 1 / e,
                "val_loss": 1.1 / e,
                "val_auc": 0.6 + 0.1 * e,
                "val_acc": 0.6,
                "lr": 1e-3,
                "seconds": 1.0,
                "images_per_s": 100.0,
            }
            for t, n in (("t_a", 3), ("t_b", 1))
            for e in range(1, n + 1)
        ]
    )
    return trials, epochs


def tiny_model(train: SplitArrays, steps: int = 2):
    torch.manual_seed(0)
    model = build_model("tiny", image_size=SIZE)
    cfg = TrialConfig(image_size=SIZE, lr=3e-3)
    opt = make_optimizer(model, cfg)
    for _ in range(steps):
        train_one_epoch(model, array_batches(train.images, train.labels, 32), opt, loss_fn=make_loss(cfg, 0.5))
    return model.eval()


RUN_INFO = {
    "seed": 7,
    "git_commit": "abc",
    "winner": {"trial_id": "t_a", "best_epoch": 3, "selection_metric": "val_auc", "selection_value": 0.9},
    "data": {
        "spec": "synthetic:200",
        "source": {"source": "synthetic"},
        "skipped": 0,
        "splits": {"method": "patient-grouped stratified", "seed": 7, "counts": {}},
    },
}


@pytest.fixture(scope="module")
def splits():
    return {
        "train": make_split("train", 64, 1),
        "val": make_split("val", 40, 2),
        "test": make_split("test", 40, 3),
        "extra_val": make_split("extra_val", 8, 4),
    }


@pytest.fixture(scope="module")
def winner(tmp_path_factory, splits):
    best = tmp_path_factory.mktemp("run") / "best"
    best.mkdir()
    (best / "config.json").write_text(
        json.dumps({**TrialConfig(image_size=SIZE).to_dict(), "trial_id": "t_a", "best_epoch": 3})
    )
    model = tiny_model(splits["train"])
    trials, epochs = search_tables()
    card = finalize(best, model, splits, RUN_INFO, trials, epochs, n_boot=200)
    return best, card, model


def test_finalize_writes_every_artifact(winner):
    best, card, _ = winner
    for name in ["model.onnx", "model.pt", "model.json", "weights.safetensors", "report.html", *PICTURES]:
        assert (best / name).is_file() and (best / name).stat().st_size > 0, name
    for name in PICTURES:
        assert (best / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert card["pictures"] == PICTURES
    assert not list(best.glob(".*")), "temporary files left behind"
    page = (best / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(PICTURES)  # self-contained: every picture embedded
    assert "t_a" in page and f"{card['threshold']['value']:.4f}" in page
    for split in ("val", "test", "extra_val"):
        assert f"<th>{split}<br>" in page
    assert "t_b" in page  # leaderboard


def test_model_card_has_the_contract_and_the_evidence(winner, splits):
    best, card, _ = winner
    on_disk = json.loads((best / "model.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert on_disk == card
    assert card["contract_version"] == export.CONTRACT_VERSION == runtime.CONTRACT_VERSION
    assert card["classes"] == ["NORMAL", "PNEUMONIA"]
    assert card["trial_id"] == card["trial"]["id"] == "t_a"
    inp = card["input"]
    assert (inp["name"], inp["size"], inp["channels"], inp["dtype"], inp["layout"]) == (
        "image",
        SIZE,
        1,
        "float32",
        "NCHW",
    )
    assert inp["scaling"] == "divide 8-bit grayscale by 255"
    assert inp["resize"] == f"whole image to {SIZE}x{SIZE}, bilinear, no crop"
    assert card["output"]["name"] == "prob_pneumonia"
    th = card["threshold"]
    assert th["split"] == "val" and th["target_sensitivity"] == 0.95 and "sensitivity" in th["method"]
    assert th["val_sensitivity"] >= 0.95 and 0 <= th["val_specificity"] <= 1
    assert card["model"] == build_model("tiny", image_size=SIZE).config.to_dict()
    assert card["trial"]["config"]["lr"] == TrialConfig().lr and card["trial"]["training_seconds"] == 3.5
    for split in ("val", "test", "extra_val"):
        m = card["metrics"][split]
        assert m["n"] == len(splits[split]) and m["patients"] == len(set(splits[split].patients))
        assert m["prevalence"] == pytest.approx(splits[split].labels.mean())
        assert m["at_threshold"]["threshold"] == th["value"] and m["at_0.5"]["threshold"] == 0.5
        for block in (m["at_threshold"], m["at_0.5"]):
            assert block["tp"] + block["fp"] + block["tn"] + block["fn"] == m["n"]
            lo, hi = block["ci"]["accuracy"]
            assert lo <= block["accuracy"] <= hi
    data = card["data"]
    assert data["seed"] == 7 and data["split_method"] == "patient-grouped stratified"
    assert data["counts"]["test"] == {"n": 40, "NORMAL": 20, "PNEUMONIA": 20, "patients": 20}
    for lib in ("torch", "ray", "onnx", "onnxruntime", "numpy", "python"):
        assert card["versions"][lib]
    assert card["export"]["max_abs_diff"] < 1e-4


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_onnx_agrees_with_torchscript_and_the_model(winner, splits):
    best, _, model = winner
    x = splits["test"].images.astype(np.float32)[:, None] / 255
    session = ort.InferenceSession(str(best / "model.onnx"), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(best / "model.pt"))
    with torch.no_grad():
        from_script = scripted(torch.from_numpy(x)).numpy()
        from_model = torch.sigmoid(model(torch.from_numpy(x))).numpy()
    for batch in (1, 7, len(x)):  # the batch dimension is dynamic
        (from_onnx,) = session.run(["prob_pneumonia"], {"image": x[:batch]})
        assert from_onnx.shape == (batch,)
        assert np.max(np.abs(from_onnx - from_script[:batch])) < 1e-4
    assert np.max(np.abs(from_script - from_model)) < 1e-5


def test_threshold_meets_the_sensitivity_target_on_validation(winner, splits):
    best, card, _ = winner
    model = runtime.load_exported(best)
    val = splits["val"]
    p = model.predict(val.images.astype(np.float32)[:, None] / 255)
    t = card["threshold"]["value"]
    assert model.threshold == t
    sens = np.mean(p[val.labels == 1] >= t)
    assert sens >= 0.95
    higher = p[(val.labels == 1) & (p > t)]
    if len(higher):  # it is the highest such threshold: the next positive score up misses the target
        assert np.mean(p[val.labels == 1] >= higher.min()) < 0.95


def test_threshold_ignores_the_test_split(tmp_path, splits, winner):
    """Flipping every test label changes test metrics, never the threshold: it comes from validation."""
    _, card, model = winner
    flipped = {
        **splits,
        "test": SplitArrays(
            splits["test"].images, 1 - splits["test"].labels, splits["test"].uids, splits["test"].patients
        ),
    }
    trials, epochs = search_tables()
    again = finalize(tmp_path, model, flipped, RUN_INFO, trials, epochs, n_boot=50)
    assert again["threshold"] == card["threshold"]
    assert again["metrics"]["test"]["at_threshold"]["tp"] == card["metrics"]["test"]["at_threshold"]["fp"]


def test_one_class_splits_do_not_crash(tmp_path, splits):
    """AUC is undefined with one class: the card says null, the plots still draw, threshold falls back."""
    ones = np.ones(12, np.int64)
    one_class = {"val": make_split("val", 12, 5, labels=0 * ones), "test": make_split("test", 12, 6, labels=ones)}
    model = tiny_model(splits["train"], steps=0)
    card = finalize(tmp_path, model, one_class, {}, pd.DataFrame(), pd.DataFrame(), n_boot=20)
    assert card["threshold"]["value"] == 0.5 and "one class" in card["threshold"]["method"]
    assert card["metrics"]["val"]["at_threshold"]["roc_auc"] is None
    assert card["metrics"]["test"]["at_threshold"]["roc_auc"] is None
    assert card["pictures"] == PICTURES
    assert card["trial_id"] is None and (tmp_path / "report.html").exists()


def test_grad_cam_highlights_and_leaves_no_hooks(winner, splits):
    _, _, model = winner
    x = torch.from_numpy(splits["test"].images[:4]).float().div(255).unsqueeze(1)
    grads = [None if q.grad is None else q.grad.clone() for q in model.parameters()]
    cams = report.grad_cam(model, x)
    assert cams.shape == (4, SIZE, SIZE) and np.all(cams >= 0) and np.all(cams <= 1 + 1e-6)
    assert np.all(cams.reshape(4, -1).max(axis=1) > 0.99)  # each map normalised to its peak
    assert all(not m._forward_hooks for m in model.modules())
    for before, q in zip(grads, model.parameters()):  # autograd.grad: the saliency never touches .grad
        assert (before is None and q.grad is None) or torch.equal(before, q.grad)
    assert not model.training


def test_roc_and_pr_curves_match_the_metrics():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    p = np.round(np.clip(rng.normal(0.4 + 0.2 * y, 0.2), 0, 1), 2)  # rounded: plenty of ties
    fpr, tpr = report.roc_curve(y, p)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, p), abs=1e-12)
    recall, precision = report.pr_curve(y, p)
    assert recall[-1] == 1 and precision[-1] == pytest.approx(y.mean())
    picks = report.pick_examples(y, p, 0.5, k=4)
    assert [c for _, c in picks] == [True] * 4 + [False] * 4
    assert all(((p[i] >= 0.5) == y[i]) == c for i, c in picks)


def test_runtime_refuses_what_is_not_a_model(tmp_path, winner):
    best, card, _ = winner
    with pytest.raises(UserError, match="does not exist"):
        runtime.load_exported(tmp_path / "nowhere")
    pickle = tmp_path / "model.pkl"
    pickle.write_bytes(b"\x80\x04\x95")
    with pytest.raises(UserError, match="looks like a pickle .* never loaded"):
        runtime.load_exported(pickle)
    with pytest.raises(UserError, match="pass its folder"):
        runtime.load_exported(best / "model.onnx")
    with pytest.raises(UserError, match="not a model folder"):
        runtime.load_exported(tmp_path)
    (tmp_path / "model.onnx").write_bytes((best / "model.onnx").read_bytes())
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(UserError, match="not a JSON model card"):
        runtime.load_exported(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({**card, "contract_version": 99}))
    with pytest.raises(UserError, match="contract version 99 is not supported"):
        runtime.load_exported(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({**card, "input": {**card["input"], "size": 64}}))
    with pytest.raises(UserError, match=r"not the \[N, 1, 64, 64\] its card promises"):
        runtime.load_exported(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps(card))
    (tmp_path / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(UserError, match="could not be loaded by onnxruntime"):
        runtime.load_exported(tmp_path)
    assert not math.isnan(runtime.load_exported(best).threshold)
