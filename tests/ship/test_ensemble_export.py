"""An ensemble exported by finalize keeps the single-model contract: same graph I/O, ONNX and TorchScript
agree on real images, predict and evaluate read it unchanged, and its card lists the members."""

import json

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import REAL_DATA, run_module
from xray_ray.config import TrialConfig
from xray_ray.data.images import load_gray
from xray_ray.data.phantoms import render
from xray_ray.data.prepare import SplitArrays
from xray_ray.model.cnn import build_model
from xray_ray.model.robustness import SHIFTS, battery
from xray_ray.model.train import array_batches, make_loss, make_optimizer, train_one_epoch
from xray_ray.ship import export
from xray_ray.ship.ensemble import Ensemble
from xray_ray.ship.winner import finalize

SIZE = 32


def split(name, n, seed, size=SIZE):
    labels = np.array([i % 2 for i in range(n)], np.int64)
    images = np.stack([render(seed, i, int(y), size=size) for i, y in enumerate(labels)])
    return SplitArrays(images, labels, [f"{name}/{i}" for i in range(n)], [f"{name}-p{i // 2}" for i in range(n)])


def trained(size, seed, **sizes):
    torch.manual_seed(seed)
    model = build_model(image_size=size, blocks=2, double_conv=False, width=4, fc=(), head="gap", **sizes)
    cfg = TrialConfig(image_size=size, lr=3e-3)
    train = split("train", 48, 10 + seed, size)
    opt = make_optimizer(model, cfg)
    train_one_epoch(model, array_batches(train.images, train.labels, 16), opt, loss_fn=make_loss(cfg, 0.5))
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    members = [trained(SIZE, 1), trained(24, 2), trained(SIZE, 3, standardize=True)]
    ens = Ensemble(members, [2, 1, 1], ["t_a", "t_b", "t_c"]).eval()
    splits = {"val": split("val", 40, 2), "test": split("test", 40, 3)}
    best = tmp_path_factory.mktemp("run") / "best"
    best.mkdir()
    export.save_weights(ens, best / export.WEIGHTS_NAME)
    (best / export.CONFIG_NAME).write_text(json.dumps(ens.config.to_dict()))
    info = {"seed": 0, "winner": {"trial_id": "ensemble"}, "data": {"spec": "synthetic:80", "splits": {}}}
    picked = {"picked": {"t_a": 2, "t_b": 1, "t_c": 1}, "metric": "val_auc"}
    card = finalize(
        best,
        ens,
        splits,
        info,
        pd.DataFrame(),
        pd.DataFrame(),
        n_boot=20,
        battery=battery(splits["val"].images, splits["val"].labels),
        threshold_rule="shifted",
        ensemble=picked,
    )
    return best, card, ens


def test_the_card_lists_members_weights_and_robustness(exported):
    best, card, ens = exported
    members = card["model"]["members"]
    assert card["model"]["kind"] == "ensemble" and [m["trial_id"] for m in members] == ["t_a", "t_b", "t_c"]
    assert [m["weight"] for m in members] == pytest.approx([0.5, 0.25, 0.25])
    assert [m["config"]["image_size"] for m in members] == [SIZE, 24, SIZE]
    assert card["ensemble"]["picked"] == {"t_a": 2, "t_b": 1, "t_c": 1}
    assert set(card["robustness"]["shifts"]) == set(SHIFTS) and 0 <= card["robustness"]["rob_auc_min"] <= 1
    assert card["threshold"]["rule_name"] == "shifted" and "pooled" in card["threshold"]["method"]
    assert card["input"]["size"] == SIZE and card["export"]["max_abs_diff"] < 1e-4
    again = export.load_model(best)
    x = torch.rand(3, 1, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ens(x))


def _real_images(n=24):
    files = (
        sorted((REAL_DATA / "train" / "NORMAL").glob("*.jpeg"))[: n // 2]
        + sorted((REAL_DATA / "train" / "PNEUMONIA").glob("*.jpeg"))[: n // 2]
    )
    return files


@pytest.mark.realdata
def test_onnx_and_torchscript_agree_on_real_chest_xrays(exported, real_data):
    best, _, ens = exported
    x = np.stack([load_gray(f.read_bytes(), SIZE) for f in _real_images()]).astype(np.float32)[:, None] / 255.0
    session = ort.InferenceSession(str(best / export.ONNX_NAME), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape[1:], inp.type, out.name) == (
        "image",
        [1, SIZE, SIZE],
        "tensor(float)",
        "prob_pneumonia",
    )
    (p_onnx,) = session.run(None, {"image": x})
    scripted = torch.jit.load(str(best / export.TORCHSCRIPT_NAME))
    with torch.no_grad():
        p_ts = scripted(torch.from_numpy(x)).numpy()
        p_torch = torch.sigmoid(ens(torch.from_numpy(x))).numpy()
    assert p_onnx.shape == (len(x),)
    assert np.abs(p_onnx - p_ts).max() < 1e-4 and np.abs(p_onnx - p_torch).max() < 1e-4


def test_predict_and_evaluate_read_an_ensemble_unchanged(exported, tmp_path):
    best, card, _ = exported
    root = tmp_path / "chest_xray" / "test"
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        (root / cls).mkdir(parents=True)
        for k in range(4):
            name = f"person{k}_bacteria_{k}.jpeg" if label else f"IM-{k:04d}-0001.jpeg"
            Image.fromarray(render(7, 10 * label + k, label, size=64)).save(root / cls / name, quality=92)
    res = run_module("xray_ray", "predict", "--model", str(best), str(root))
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(rows) == 8 and all(0 <= r["prob_pneumonia"] <= 1 for r in rows)
    res = run_module(
        "xray_ray",
        "evaluate",
        "--model",
        str(best),
        "--data",
        str(tmp_path / "chest_xray"),
        "--split",
        "test",
        "--json",
    )
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout)["metrics"]
    assert m["n"] == 8 and m["counts"] == {"NORMAL": 4, "PNEUMONIA": 4}
    assert m["at_threshold"]["threshold"] == pytest.approx(card["threshold"]["value"])
