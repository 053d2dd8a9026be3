"""Ensembles: greedy selection with replacement, and an Ensemble that exports like one model."""

from collections import Counter

import numpy as np
import onnxruntime as ort
import pytest
import torch

from xray_ray.metrics import roc_auc
from xray_ray.model.cnn import build_model
from xray_ray.ship import export
from xray_ray.ship.ensemble import Ensemble, from_config, greedy_select


def _members():
    torch.manual_seed(0)
    return [
        build_model("tiny", image_size=32),
        build_model("tiny", image_size=24),
        build_model(image_size=32, blocks=2, double_conv=False, width=4, fc=(), head="gap", standardize=True),
    ]


def test_ensemble_output_is_the_weighted_mean_probability():
    members = [m.eval() for m in _members()]
    ens = Ensemble(members, [2, 1, 1], ["a", "b", "c"]).eval()
    x = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        small = torch.nn.functional.interpolate(x, size=[24, 24], mode="bilinear", align_corners=False)
        want = (2 * torch.sigmoid(members[0](x)) + torch.sigmoid(members[1](small)) + torch.sigmoid(members[2](x))) / 4
        got = torch.sigmoid(ens(x))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert ens.config.image_size == 32 and ens.config.weights == (0.5, 0.25, 0.25)
    assert ens.primary is members[0]


def test_ensemble_exports_under_the_single_model_contract(tmp_path):
    ens = Ensemble(_members(), [1, 1, 2], ["a", "b", "c"]).eval()
    export.export_onnx(ens, tmp_path / export.ONNX_NAME)
    export.export_torchscript(ens, tmp_path / export.TORCHSCRIPT_NAME)
    assert export.check_agreement(tmp_path, n=16) < 1e-4
    session = ort.InferenceSession(str(tmp_path / export.ONNX_NAME), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.shape[1:], out.name) == ("image", [1, 32, 32], "prob_pneumonia")
    x = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    (p,) = session.run(None, {"image": x})
    with torch.no_grad():
        np.testing.assert_allclose(p, torch.sigmoid(ens(torch.from_numpy(x))).numpy(), atol=1e-5)


def test_ensemble_round_trips_through_its_config_and_safetensors(tmp_path):
    ens = Ensemble(_members(), [1, 2, 3], ["a", "b", "c"]).eval()
    export.save_weights(ens, tmp_path / "w.safetensors")
    again = export.load_weights(from_config(ens.config.to_dict()), tmp_path / "w.safetensors").eval()
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x), ens(x))
    assert [m["trial_id"] for m in ens.config.to_dict()["members"]] == ["a", "b", "c"]


def test_greedy_selection_adds_what_helps_and_repeats_the_best():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    noise = {n: rng.normal(0, 1, 400) for n in "abcd"}
    # a and b are good with independent errors (their mean is better than either); c is weak; d copies a
    cands = {
        "a": {"val": y + 0.9 * noise["a"]},
        "b": {"val": y + 0.9 * noise["b"]},
        "c": {"val": y + 3.0 * noise["c"]},
        "d": {"val": y + 0.9 * noise["a"]},
    }
    chosen = greedy_select(cands, lambda p: roc_auc(y, p["val"]), rounds=6)
    assert isinstance(chosen, Counter) and chosen["a"] + chosen["d"] >= 1 and chosen["b"] >= 1
    assert chosen["c"] == 0
    mean = sum(cands[k]["val"] * n for k, n in chosen.items()) / sum(chosen.values())
    assert roc_auc(y, mean) > max(roc_auc(y, cands[k]["val"]) for k in "ab")


def test_greedy_selection_stops_when_every_addition_hurts_and_minimises_losses():
    y = np.array([0, 1] * 50)
    cands = {"good": {"val": y * 0.8 + 0.1}, "bad": {"val": 1 - (y * 0.8 + 0.1)}}
    chosen = greedy_select(cands, lambda p: float(np.mean((p["val"] - y) ** 2)), rounds=5, mode="min")
    assert chosen == Counter({"good": 5})  # ties (adding itself) continue; "bad" never joins
    with pytest.raises(ValueError):
        greedy_select({}, lambda p: 0.0, rounds=1)
