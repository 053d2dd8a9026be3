"""Torch side of export: safetensors weights, TorchScript and ONNX graphs that output class probabilities.

A search's `best/` folder holds `config.json` (the trial's flat config) and `weights.safetensors`.
Weights are only ever read from safetensors, never from pickles. Both exported graphs take the
model's input contract as is (float32 [N, 1, S, S], uint8/255, normalisation inside) and return
sigmoid probabilities [N] of the second class (two classes: ``prob_pneumonia`` for NORMAL / PNEUMONIA,
``prob_positive`` for another pair), or softmax probabilities ``probs`` [N, K] for K > 2 classes; each
carries the contract (and the class names, in output order) as metadata.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from xray_ray import CLASSES
from xray_ray.common import atomic_file, json_safe, write_bytes, write_text
from xray_ray.errors import UserError
from xray_ray.model.cnn import CNN, CNNConfig, config_from_dict

CONTRACT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "weights.safetensors"
ONNX_NAME = "model.onnx"
TORCHSCRIPT_NAME = "model.pt"
INPUT_NAME = "image"
OUTPUT_NAME = "prob_pneumonia"
POSITIVE_OUTPUT_NAME = "prob_positive"  # two classes other than NORMAL / PNEUMONIA
PROBS_OUTPUT_NAME = "probs"  # K > 2 classes


def output_of(classes: Sequence[str]) -> tuple[str, str]:
    """(output name, what it means) of a model of these classes (in label order)."""
    classes = tuple(classes)
    if len(classes) > 2:
        return PROBS_OUTPUT_NAME, f"probability of each class per image, in the order {', '.join(classes)}"
    if classes == CLASSES:
        return OUTPUT_NAME, "probability of PNEUMONIA (class 1) per image"
    return POSITIVE_OUTPUT_NAME, f"probability of {classes[1]} (class 1, the positive class) per image"


def contract(model: CNN, classes: Sequence[str] = CLASSES) -> dict[str, Any]:
    """The metadata every export carries: contract version, input contract, model config, I/O names (and the
    class names, unless they are NORMAL / PNEUMONIA)."""
    name, meaning = output_of(classes)
    return {
        "contract_version": CONTRACT_VERSION,
        "input": INPUT_NAME,
        "output": name,
        "output_meaning": meaning,
        "input_contract": model.input_contract(),
        "config": model.config.to_dict(),
        **({"classes": list(classes)} if tuple(classes) != CLASSES else {}),
    }


def _target(path: str | os.PathLike) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def save_weights(model: CNN, path: str | os.PathLike, classes: Sequence[str] = CLASSES) -> None:
    """Write the model's state dict as safetensors (with the contract as string metadata)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": "pt", "xray_ray": json.dumps(contract(model, classes), sort_keys=True)}
    write_bytes(_target(path), save(state, metadata=metadata))


def load_weights(model: CNN, path: str | os.PathLike) -> CNN:
    """Load safetensors weights into `model` (in place, strict) and return it."""
    try:
        state = load_file(os.fspath(path), device="cpu")
    except FileNotFoundError:
        raise UserError(f"weights file {path} does not exist.") from None
    except (SafetensorError, OSError):
        raise UserError(
            f"{path} is not a safetensors file; weights are only read from .safetensors files, never pickles."
        ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError:
        raise UserError(
            f"the weights in {path} do not fit the model config; config.json and the weights must come "
            "from the same trial."
        ) from None
    return model


def save_config(config: Mapping[str, Any] | CNNConfig, path: str | os.PathLike) -> None:
    """Write a flat config dict (or a CNNConfig) as pretty, sorted JSON."""
    data = config.to_dict() if isinstance(config, CNNConfig) else dict(config)
    text = json.dumps(json_safe(data, strict=True), indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_text(_target(path), text)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a config.json written by save_config."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; point to a search's best/ folder.") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; rerun the search or restore the file.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object of config values.")
    return data


def load_model(best_dir: str | os.PathLike) -> CNN:
    """The CNN saved in `best_dir` (config.json + weights.safetensors), on CPU, in eval mode."""
    best = Path(best_dir)
    config = load_config(best / CONFIG_NAME)
    if config.get("kind") == "ensemble":
        from xray_ray.ship.ensemble import from_config

        return load_weights(from_config(config), best / WEIGHTS_NAME).eval()
    model = CNN(config_from_dict(config), int(config.get("num_classes", 2)))
    return load_weights(model, best / WEIGHTS_NAME).eval()


class ProbabilityModel(nn.Module):
    """Wraps a CNN: image float32 [N, 1, S, S] in [0, 1] -> P(second class) [N], or [N, K] for K > 2."""

    def __init__(self, cnn: CNN) -> None:
        super().__init__()
        self.cnn = cnn
        self.outputs = int(cnn.outputs)

    def forward(self, image: Tensor) -> Tensor:
        """Sigmoid of the CNN's logit, or softmax of its K logits."""
        logits = self.cnn(image)
        if self.outputs > 1:
            return torch.softmax(logits, dim=1)
        return torch.sigmoid(logits)


def _frozen_copy(model: CNN) -> ProbabilityModel:
    # A copy, so exporting never flips the caller's model out of train mode or off its device.
    return ProbabilityModel(copy.deepcopy(model).cpu().eval()).eval()


def _example(model: CNN, n: int = 2) -> Tensor:
    s = model.config.image_size
    return torch.rand(n, model.config.in_channels, s, s)


def export_torchscript(model: CNN, path: str | os.PathLike, classes: Sequence[str] = CLASSES) -> None:
    """Save a scripted ProbabilityModel (dynamic batch) with the contract as extra file `xray_ray.json`."""
    wrapped = _frozen_copy(model)
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream but still the format a plain libtorch/C++ user can load.
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(wrapped)
        extra = {"xray_ray.json": json.dumps(contract(model, classes), sort_keys=True)}
        with atomic_file(_target(path)) as f:
            torch.jit.save(scripted, f, _extra_files=extra)


def export_onnx(model: CNN, path: str | os.PathLike, opset: int = 17, classes: Sequence[str] = CLASSES) -> None:
    """Save a single-file ONNX graph: input "image" float32 [N,1,S,S] -> "prob_pneumonia" float32 [N] (or
    ``output_of(classes)``'s name: [N] for two classes, [N, K] for K > 2)."""
    import onnx  # imported here: only exporting needs it

    wrapped = _frozen_copy(model)
    output, _ = output_of(classes)
    # The TorchScript-based exporter, not the dynamo one: dynamo only implements opset >= 18 and its
    # down-conversion to 17 fails for the "gap" head (ReduceMean axes), while this one writes opset 17
    # natively for every head, and many times faster. It is deprecated upstream (torch is pinned).
    with tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        raw = os.path.join(scratch, "raw.onnx")
        torch.onnx.export(
            wrapped,
            (_example(model),),
            raw,
            input_names=[INPUT_NAME],
            output_names=[output],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "N"}, output: {0: "N"}},
        )
        proto = onnx.load(raw)
    proto.doc_string = f"xray_ray CNN: {output_of(classes)[1]}, for grayscale chest X-rays"
    if tuple(classes) == CLASSES:
        proto.doc_string = "xray_ray CNN: P(PNEUMONIA) for grayscale chest X-rays"
    for key, value in {
        "xray_ray": json.dumps(contract(model, classes), sort_keys=True),
        "contract_version": str(CONTRACT_VERSION),
        **({"classes": json.dumps(list(classes))} if tuple(classes) != CLASSES else {}),
    }.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    write_bytes(_target(path), proto.SerializeToString())  # one file: no external data


def _paths(model_dir_or_onnx: str | os.PathLike, torchscript: str | os.PathLike | None) -> tuple[Path, Path]:
    first = Path(model_dir_or_onnx)
    if first.is_dir():
        return first / ONNX_NAME, Path(torchscript) if torchscript else first / TORCHSCRIPT_NAME
    if torchscript is None:
        raise UserError(f"{first} is not a folder; give a model folder or the ONNX and TorchScript paths.")
    return first, Path(torchscript)


def check_agreement(
    model_dir_or_onnx: str | os.PathLike, torchscript: str | os.PathLike | None = None, *, n: int = 8, seed: int = 0
) -> float:
    """Max |ONNX (onnxruntime) - TorchScript| over `n` random uint8/255 images; a folder means its
    model.onnx and model.pt."""
    import onnxruntime as ort

    onnx_path, ts_path = _paths(model_dir_or_onnx, torchscript)
    for p in (onnx_path, ts_path):
        if not p.is_file():
            raise UserError(f"{p} does not exist; export the model first.")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    dims = session.get_inputs()[0].shape  # ["N", C, S, S]
    rng = np.random.default_rng(seed)
    image = (rng.integers(0, 256, size=(n, *dims[1:]), dtype=np.uint8) / np.float32(255)).astype(np.float32)
    (from_onnx,) = session.run([session.get_outputs()[0].name], {INPUT_NAME: image})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(ts_path), map_location="cpu")
    with torch.inference_mode():
        from_torch = scripted(torch.from_numpy(image)).numpy()
    return float(np.max(np.abs(from_onnx - from_torch))) if n else 0.0
