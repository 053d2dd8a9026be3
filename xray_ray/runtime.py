"""Run an exported model with onnxruntime only: no torch, so predict and evaluate start fast anywhere.

An exported model is a folder holding `model.onnx` and its card `model.json` (see winner.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import onnxruntime as ort

from xray_ray import CLASSES
from xray_ray.errors import UserError
from xray_ray.images import ImageError, load_gray

# Mirrors export.CONTRACT_VERSION; duplicated because export.py imports torch (a test keeps them equal).
CONTRACT_VERSION = 1
CARD_FILE = "model.json"
ONNX_FILE = "model.onnx"
PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin", ".joblib", ".h5", ".keras"}


@dataclass
class ExportedModel:
    """An exported classifier: the ONNX session plus the card's input contract and threshold."""

    model_dir: Path
    card: dict
    session: ort.InferenceSession = field(repr=False)

    @property
    def image_size(self) -> int:
        """Side S of the square grayscale input [N, 1, S, S]."""
        return int(self.card["input"]["size"])

    @property
    def threshold(self) -> float:
        """Probability at or above which an image is called PNEUMONIA (chosen on validation)."""
        return float(self.card["threshold"]["value"])

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities of PNEUMONIA [N] for float32 images [N, 1, S, S] scaled to [0, 1]."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        s = self.image_size
        if x.ndim != 4 or x.shape[1:] != (1, s, s):
            raise ValueError(f"expected images of shape [N, 1, {s}, {s}], got {list(x.shape)}")
        if len(x) == 0:
            return np.zeros(0, dtype=np.float32)
        name = self.session.get_inputs()[0].name
        (probs,) = self.session.run(None, {name: x})
        return np.asarray(probs, dtype=np.float32).reshape(len(x))

    def label(self, prob: float) -> str:
        """Class name for one probability at the card's threshold."""
        return CLASSES[int(prob >= self.threshold)]

    def predict_files(self, paths: Iterable[str | Path], batch_size: int = 64,
                      threads: int | None = None) -> Iterator[dict]:
        """Yield, in input order, {path, prob_pneumonia, label} or {path, error} for each image file.

        Files are read and decoded one batch at a time (on a few threads: PIL releases the GIL), so any
        number of files streams through in bounded memory.
        """
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}.")
        threads = threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for chunk in _chunks(paths, batch_size):
                yield from self._flush(list(pool.map(self._load, chunk)))

    def _load(self, path: str | Path) -> dict:
        try:
            data = Path(path).read_bytes()
            return {"path": str(path), "pixels": load_gray(data, self.image_size)}
        except ImageError as e:
            return {"path": str(path), "error": str(e) or "not a readable image"}
        except IsADirectoryError:
            return {"path": str(path), "error": "is a folder, not an image file"}
        except FileNotFoundError:
            return {"path": str(path), "error": "no such file"}
        except OSError as e:
            return {"path": str(path), "error": e.strerror or str(e)}

    def _flush(self, pending: list[dict]) -> Iterator[dict]:
        good = [r for r in pending if "pixels" in r]
        if good:
            x = np.stack([r.pop("pixels") for r in good]).astype(np.float32)[:, None] / 255.0
            for r, p in zip(good, self.predict(x)):
                r["prob_pneumonia"] = float(p)
                r["label"] = self.label(float(p))
        yield from pending


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


def _why_not_a_folder(path: Path) -> str:
    if path.name in (CARD_FILE, ONNX_FILE):
        return f"{path} is one file of a model folder; pass its folder {path.parent} instead."
    try:
        with path.open("rb") as f:
            head = f.read(2)
    except OSError:
        head = b""
    # Pickle protocol 2+ starts with 0x80; torch.save writes a zip ("PK") of pickles.
    if path.suffix.lower() in PICKLE_SUFFIXES or head[:1] == b"\x80" or head == b"PK":
        return (f"{path} looks like a pickle or checkpoint file, which is never loaded because unpickling "
                "runs code; pass an exported model folder holding model.json and model.onnx.")
    return f"{path} is a file, not a model folder; pass the folder that holds model.json and model.onnx."


def load_exported(model_dir: str | Path) -> ExportedModel:
    """Load and validate an exported model folder (model.json + model.onnx)."""
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise UserError(f"model folder {model_dir} does not exist; pass the folder that holds model.json and "
                        "model.onnx.")
    if not model_dir.is_dir():
        raise UserError(_why_not_a_folder(model_dir))
    card_path, onnx_path = model_dir / CARD_FILE, model_dir / ONNX_FILE
    if not card_path.is_file() or not onnx_path.is_file():
        raise UserError(f"{model_dir} is not a model folder: it needs both {CARD_FILE} and {ONNX_FILE}.")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{card_path} is not a JSON model card; re-export the model with xray_ray.") from None
    if not isinstance(card, dict):
        raise UserError(f"{card_path} is not a JSON model card; re-export the model with xray_ray.")
    version = card.get("contract_version")
    if version != CONTRACT_VERSION:
        raise UserError(
            f"model contract version {version} is not supported (this xray_ray reads version {CONTRACT_VERSION}); "
            "re-export the model with this version."
        )
    try:
        int(card["input"]["size"]), float(card["threshold"]["value"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{card_path} lacks the input size or threshold; re-export the model with xray_ray.") from None
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for every kind of bad file
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"{onnx_path} could not be loaded by onnxruntime ({reason}); re-export the model.") from None
    shape = session.get_inputs()[0].shape
    size = int(card["input"]["size"])
    if len(shape) != 4 or shape[1:] != [1, size, size]:
        raise UserError(f"{onnx_path} takes input {shape}, not the [N, 1, {size}, {size}] its card promises; "
                        "re-export the model.")
    return ExportedModel(model_dir=model_dir, card=card, session=session)
