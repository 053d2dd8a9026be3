"""Exports of K > 2 classes: ONNX and TorchScript output `probs` [N, K] (softmax rows), the class names in
the graphs' metadata; two classes other than NORMAL / PNEUMONIA keep one probability, named for what it is."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from xray_ray.model.cnn import build_model
from xray_ray.ship.ensemble import Ensemble
from xray_ray.ship.export import check_agreement, export_onnx, export_torchscript, output_of, save_weights

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated upstream

SUBTYPES = ("NORMAL", "BACTERIA", "VIRUS")


def _spread(model: torch.nn.Module) -> torch.nn.Module:
    """Larger last-layer weights, so an untrained model's probabilities differ between images and classes."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(30)
    return model.eval()


def _images(n: int, size: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 1, size, size)) * rng.uniform(0.05, 1.0, (n, 1, 1, 1))
    return (pixels.astype(np.uint8) / 255).astype(np.float32)


def _exported(model, tmp_path, classes):
    export_onnx(model, tmp_path / "model.onnx", classes=classes)
    export_torchscript(model, tmp_path / "model.pt", classes)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    return session, torch.jit.load(str(tmp_path / "model.pt"))


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_a_three_class_export_gives_probability_rows_that_agree(tmp_path, preset):
    torch.manual_seed(0)
    model = _spread(build_model(preset, num_classes=3, image_size=32))
    session, scripted = _exported(model, tmp_path, SUBTYPES)
    (out,) = session.get_outputs()
    assert out.name == "probs" and out.shape[1] == 3
    x = _images(6, 32)
    (from_onnx,) = session.run(["probs"], {"image": x})
    with torch.no_grad():
        from_script = scripted(torch.from_numpy(x)).numpy()
        expected = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    assert from_onnx.shape == from_script.shape == (6, 3)
    assert np.abs(from_onnx - from_script).max() < 1e-4 and np.abs(from_script - expected).max() < 1e-5
    assert np.allclose(from_onnx.sum(axis=1), 1, atol=1e-5)
    assert np.ptp(from_onnx[:, 0]) > 1e-3  # not a constant output that would agree trivially
    assert check_agreement(tmp_path) < 1e-4
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert json.loads(meta["classes"]) == list(SUBTYPES)
    assert json.loads(meta["xray_ray"])["output"] == "probs"
    assert json.loads(meta["xray_ray"])["classes"] == list(SUBTYPES)


def test_a_three_class_ensemble_exports_the_weighted_mean_of_its_members_softmax(tmp_path):
    torch.manual_seed(1)
    members = [_spread(build_model("tiny", num_classes=3, image_size=s)) for s in (32, 24)]
    ens = Ensemble(members, [2, 1], ["a", "b"]).eval()
    x = torch.from_numpy(_images(5, 32))
    with torch.no_grad():
        small = torch.nn.functional.interpolate(x, size=[24, 24], mode="bilinear", align_corners=False)
        mean = (2 * torch.softmax(members[0](x), 1) + torch.softmax(members[1](small), 1)) / 3
        assert torch.allclose(torch.softmax(ens(x), dim=1), mean, atol=1e-6)
    session, scripted = _exported(ens, tmp_path, SUBTYPES)
    (from_onnx,) = session.run(["probs"], {"image": x.numpy()})
    assert np.abs(from_onnx - mean.numpy()).max() < 1e-4
    save_weights(ens, tmp_path / "weights.safetensors", SUBTYPES)
    assert ens.config.to_dict()["num_classes"] == 3


def test_two_classes_other_than_normal_and_pneumonia_name_their_positive_output(tmp_path):
    classes = ("NORMAL", "TUBERCULOSIS")
    assert output_of(classes)[0] == "prob_positive" and "TUBERCULOSIS" in output_of(classes)[1]
    assert output_of(("NORMAL", "PNEUMONIA"))[0] == "prob_pneumonia"
    session, _ = _exported(_spread(build_model("tiny", image_size=32)), tmp_path, classes)
    (out,) = session.get_outputs()
    assert out.name == "prob_positive" and len(out.shape) == 1
