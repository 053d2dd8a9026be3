"""Exports agree with the model: ONNX (fresh onnxruntime session) vs TorchScript vs eager; weights
round-trip through safetensors exactly; pickles are refused."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from xray_ray.errors import UserError
from xray_ray.model.cnn import CNN, build_model
from xray_ray.ship.export import (
    CONTRACT_VERSION,
    ProbabilityModel,
    check_agreement,
    export_onnx,
    export_torchscript,
    load_config,
    load_model,
    load_weights,
    save_config,
    save_weights,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated upstream

CASES = [("tiny", 32), ("small", 64), ("seed", 64)]


def _trained_looking(preset: str, size: int, seed: int = 0) -> CNN:
    """A model whose BatchNorm affine and running statistics are not the identity (so exports must carry
    them) and whose outputs spread over (0, 1) (so agreement within 1e-4 means something)."""
    torch.manual_seed(seed)
    model = build_model(preset, image_size=size)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.uniform_(-0.2, 0.2)
        norm.momentum = None  # running statistics = plain average over the calibration batches
    with torch.no_grad():
        model(torch.from_numpy(_images(16, size, seed=100)))
        model.classifier[-1].weight.mul_(20)
    for norm in norms:
        norm.momentum = 0.1
    return model  # still in train mode: exporting must not depend on, or change, that


def _images(n: int, size: int, seed: int = 1) -> np.ndarray:
    """uint8/255 noise at a different brightness per image, so an untrained model's outputs differ."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 1, size, size)) * rng.uniform(0.05, 1.0, (n, 1, 1, 1))
    return (pixels.astype(np.uint8) / 255).astype(np.float32)


@pytest.mark.parametrize("preset, size", CASES)
def test_onnx_and_torchscript_agree_with_the_model(tmp_path, preset, size):
    model = _trained_looking(preset, size)
    export_onnx(model, tmp_path / "model.onnx")
    export_torchscript(model, tmp_path / "model.pt")
    assert model.training  # the caller's model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.pt"]  # no external data

    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    model.eval()
    for n in (1, 5):
        x = _images(n, size, seed=n)
        (from_onnx,) = session.run(["prob_pneumonia"], {"image": x})
        with torch.no_grad():
            from_script = scripted(torch.from_numpy(x)).numpy()
            expected = torch.sigmoid(model(torch.from_numpy(x))).numpy()
            assert np.array_equal(ProbabilityModel(model)(torch.from_numpy(x)).numpy(), expected)
        assert from_onnx.shape == from_script.shape == (n,)
        assert from_onnx.dtype == np.float32
        assert np.abs(from_onnx - from_script).max() < 1e-4
        assert np.abs(from_script - expected).max() < 1e-5
        assert ((expected > 0) & (expected < 1)).all()
    assert np.ptp(expected) > 1e-3  # not a near-constant output that would agree trivially
    assert check_agreement(tmp_path) < 1e-4
    assert check_agreement(tmp_path / "model.onnx", tmp_path / "model.pt", n=3, seed=5) < 1e-4


def test_onnx_graph_signature_and_metadata(tmp_path):
    model = _trained_looking("tiny", 40)
    path = tmp_path / "tiny.onnx"
    export_onnx(model, path)
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    meta = {p.key: p.value for p in proto.metadata_props}
    card = json.loads(meta["xray_ray"])
    assert card["contract_version"] == CONTRACT_VERSION and meta["contract_version"] == str(CONTRACT_VERSION)
    assert card["input_contract"] == model.input_contract() and card["config"]["image_size"] == 40

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "image" and inp.type == "tensor(float)"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [1, 40, 40]
    assert out.name == "prob_pneumonia" and out.type == "tensor(float)"
    assert len(out.shape) == 1 and out.shape[0] == inp.shape[0]
    with pytest.raises(Exception, match="dimensions"):  # a wrong size is refused, not silently resized
        session.run(None, {"image": _images(2, 32)})


def test_torchscript_carries_the_contract(tmp_path):
    model = _trained_looking("tiny", 32)
    export_torchscript(model, tmp_path / "model.pt")
    extra = {"xray_ray.json": ""}
    torch.jit.load(str(tmp_path / "model.pt"), _extra_files=extra)
    card = json.loads(extra["xray_ray.json"])
    assert card["input_contract"]["size"] == 32 and card["output"] == "prob_pneumonia"


@pytest.mark.parametrize("preset, size", CASES)
def test_safetensors_round_trip_is_exact(tmp_path, preset, size):
    model = _trained_looking(preset, size, seed=0).eval()
    save_weights(model, tmp_path / "weights.safetensors")
    other = _trained_looking(preset, size, seed=1).eval()
    x = torch.from_numpy(_images(3, size))
    with torch.no_grad():
        assert not torch.equal(other(x), model(x))
        assert load_weights(other, tmp_path / "weights.safetensors") is other
        assert torch.equal(other(x), model(x))


def test_load_model_from_a_best_folder(tmp_path):
    model = _trained_looking("small", 32).eval()
    trial = {**model.config.to_dict(), "lr": np.float64(3e-4), "batch_size": 32, "optimizer": "adamw"}
    save_config(trial, tmp_path / "config.json")
    save_weights(model, tmp_path / "weights.safetensors")
    assert load_config(tmp_path / "config.json")["lr"] == 3e-4
    loaded = load_model(tmp_path)
    assert not loaded.training and loaded.config == model.config
    x = torch.from_numpy(_images(4, 32))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_pickles_and_other_non_safetensors_files_are_refused(tmp_path):
    model = build_model("tiny")
    pickled = tmp_path / "weights.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, pickled)
    with pytest.raises(UserError, match="not a safetensors file"):
        load_weights(model, pickled)
    raw = tmp_path / "raw.safetensors"
    torch.save(model.state_dict(), raw)  # a pickle, whatever its name says
    with pytest.raises(UserError, match="not a safetensors file"):
        load_weights(model, raw)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match="not a safetensors file"):
        load_weights(model, garbage)
    with pytest.raises(UserError, match="does not exist"):
        load_weights(model, tmp_path / "missing.safetensors")


def test_weights_of_another_architecture_are_refused(tmp_path):
    save_weights(build_model("tiny"), tmp_path / "weights.safetensors")
    with pytest.raises(UserError, match="do not fit"):
        load_weights(build_model("small"), tmp_path / "weights.safetensors")
    save_config({"blocks": 2, "width": 4}, tmp_path / "config.json")  # a config that disagrees
    with pytest.raises(UserError, match="do not fit"):
        load_model(tmp_path)
    with pytest.raises(UserError, match="config.json"):
        load_model(tmp_path / "nowhere")
