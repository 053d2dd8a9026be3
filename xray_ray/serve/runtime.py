"""Run an exported model with onnxruntime only: no torch, so predict and evaluate start fast anywhere.

An exported model is a folder holding `model.onnx` and its card `model.json` (see winner.py).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import onnxruntime as ort

from xray_ray import CLASSES
from xray_ray.common import DEFAULT_MAX_FILE_MB, read_regular_file
from xray_ray.data.images import ImageError, load_gray
from xray_ray.errors import UserError

# Mirrors export.CONTRACT_VERSION; duplicated because export.py imports torch (a test keeps them equal).
CONTRACT_VERSION = 1
CARD_FILE = "model.json"
ONNX_FILE = "model.onnx"
VAL_SCORES_FILE = "val_scores.json"  # validation's labels and scores (exports since the site check)
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

    def predict_files(
        self,
        paths: Iterable[str | Path],
        batch_size: int = 64,
        threads: int | None = None,
        max_bytes: int | None = DEFAULT_MAX_FILE_MB << 20,
    ) -> Iterator[dict]:
        """Yield, in input order, {path, prob_pneumonia, label} or {path, error} for each image file.

        Files are read and decoded one batch at a time (on a few threads: PIL releases the GIL), so any
        number of files streams through in bounded memory. Only regular files are read (a FIFO, device or
        socket is an error line, never opened for a blocking read), and files over `max_bytes` are refused
        by their size before a byte is read.
        """
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}.")
        threads = threads or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for chunk in _chunks(paths, batch_size):
                yield from self._flush(list(pool.map(lambda p: self._load(p, max_bytes), chunk)))

    def _load(self, path: str | Path, max_bytes: int | None = DEFAULT_MAX_FILE_MB << 20) -> dict:
        try:
            data = read_regular_file(path, max_bytes)
            return {"path": str(path), "pixels": load_gray(data, self.image_size)}
        except ImageError as e:
            return {"path": str(path), "error": str(e) or "not a readable image"}
        except OSError as e:
            return {"path": str(path), "error": file_error(path, e)}

    def _flush(self, pending: list[dict]) -> Iterator[dict]:
        good = [r for r in pending if "pixels" in r]
        if good:
            x = np.stack([r.pop("pixels") for r in good]).astype(np.float32)[:, None] / 255.0
            for r, p in zip(good, self.predict(x)):
                r["prob_pneumonia"] = float(p)
                r["label"] = self.label(float(p))
        yield from pending


def file_error(path: str | Path, e: OSError) -> str:
    """Why a file could not be read, in a few words."""
    if e.errno == errno.ENOENT:
        return "broken symlink (its target is missing)" if os.path.islink(path) else "no such file"
    if e.errno == errno.ELOOP:
        return "symlink loop"
    if e.errno == errno.EISDIR or os.path.isdir(path):
        return "is a folder, not an image file"
    return e.strerror or str(e) or type(e).__name__


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
        return (
            f"{path} looks like a pickle or checkpoint file, which is never loaded because unpickling "
            "runs code; pass an exported model folder holding model.json and model.onnx."
        )
    return f"{path} is a file, not a model folder; pass the folder that holds model.json and model.onnx."


MAX_IMAGE_SIZE = 4096  # no model of this family takes a larger side; a bigger card value is an error
INPUT_NAME, OUTPUT_NAME = "image", "prob_pneumonia"  # the graph's contract (export.py writes these names)
_FIX = "re-export the model with xray_ray"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_card(card: object, where: str | Path = CARD_FILE) -> dict:
    """Validate a model card (model.json) as predict, evaluate and the export read it; returns it.

    Every field the code reads must be there or absent as allowed, and of the right type: the contract
    version, the input size (a positive int), the threshold (a finite number in [0, 1], not a bool), and,
    when present, the classes, the output name, the data seed, the split settings, the fingerprints, the
    trial id and the sha256 of model.onnx. Raises UserError with one sentence naming the bad field.
    """
    if not isinstance(card, dict):
        raise UserError(f"{where} is not a JSON model card; {_FIX}.")
    version = card.get("contract_version")
    if not _is_int(version) or version != CONTRACT_VERSION:
        raise UserError(
            f"model contract version {version!r} is not supported (this xray_ray reads version "
            f"{CONTRACT_VERSION}); re-export the model with this version."
        )
    _check_contract(card, where)
    if card.get("data") is not None:
        _check_data(card["data"], where)
    if card.get("files") is not None:
        _check_files(card["files"], where)
    return card


def _bad(where: str | Path, field: str, need: str, value: object) -> UserError:
    """The one sentence for a card field of the wrong kind: which field, what it must be, what it is."""
    shown = repr(value)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return UserError(f"{where}: {field} must be {need}, not {shown}; {_FIX}.")


def _check_contract(card: dict, where: str | Path) -> None:
    """The input, threshold, classes, output and trial id of a card."""
    for section in ("input", "threshold"):
        if not isinstance(card.get(section), dict):
            raise _bad(where, section, "an object", card.get(section))
    size = card["input"].get("size")
    if not _is_int(size) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise _bad(where, "input.size", f"a whole number from 1 to {MAX_IMAGE_SIZE}", size)
    channels = card["input"].get("channels", 1)
    if not _is_int(channels) or channels != 1:
        raise _bad(where, "input.channels", "1 (grayscale)", channels)
    t = card["threshold"].get("value")
    if not _is_number(t) or not math.isfinite(t) or not 0 <= t <= 1:
        raise _bad(where, "threshold.value", "a finite number from 0 to 1", t)
    if "classes" in card and card["classes"] != list(CLASSES):
        raise _bad(where, "classes", f"{list(CLASSES)}", card["classes"])
    output = card.get("output")
    if output is not None and (not isinstance(output, dict) or output.get("name") != OUTPUT_NAME):
        raise _bad(where, "output.name", f"'{OUTPUT_NAME}'", output.get("name") if isinstance(output, dict) else output)
    if card.get("trial_id") is not None and not isinstance(card["trial_id"], str):
        raise _bad(where, "trial_id", "a string", card["trial_id"])


def _check_data(data: object, where: str | Path) -> None:
    """The card's data section: its seed, split settings and fingerprints."""
    if not isinstance(data, dict):
        raise _bad(where, "data", "an object", data)
    seed = data.get("seed")
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise _bad(where, "data.seed", "a whole number of 0 or more", seed)
    if data.get("split") is not None:
        _check_split(data["split"], where)
    prints = data.get("fingerprints")
    if prints is not None and (not isinstance(prints, dict) or not all(isinstance(v, str) for v in prints.values())):
        raise _bad(where, "data.fingerprints", "an object of strings", prints)


def _check_split(split: object, where: str | Path) -> None:
    """The split settings the data was split with: seed, fractions, smallest given val."""
    if not isinstance(split, dict):
        raise _bad(where, "data.split", "an object", split)
    if "seed" in split and (not _is_int(split["seed"]) or split["seed"] < 0):
        raise _bad(where, "data.split.seed", "a whole number of 0 or more", split["seed"])
    for key in ("val_fraction", "test_fraction"):
        v = split.get(key)
        if key in split and (not _is_number(v) or not math.isfinite(v) or not 0 <= v < 1):
            raise _bad(where, f"data.split.{key}", "a number from 0 to below 1", v)
    v = split.get("min_val_images")
    if "min_val_images" in split and (not _is_int(v) or v < 0):
        raise _bad(where, "data.split.min_val_images", "a whole number of 0 or more", v)


def _check_files(files: object, where: str | Path) -> None:
    """The card's file hashes: model.onnx's, when given, is a sha256 in hex."""
    digest = files.get(ONNX_FILE) if isinstance(files, dict) else files
    if not isinstance(files, dict) or (
        digest is not None
        and not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest))
    ):
        raise _bad(where, f"files.{ONNX_FILE}", "a sha256 in hex", digest)


def check_graph(session: ort.InferenceSession, size: int, where: str | Path = ONNX_FILE) -> None:
    """The ONNX graph's inputs and outputs against the contract: one input 'image', float32 [N, 1, S, S]
    with S the card's size, and one output 'prob_pneumonia', float32 [N]. UserError otherwise."""

    def refuse(what: str) -> UserError:
        return UserError(
            f"{where} {what}, but the contract is input '{INPUT_NAME}' float32 [N, 1, {size}, {size}] "
            f"and output '{OUTPUT_NAME}' float32 [N]; re-export the model."
        )

    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise refuse(f"has inputs {[i.name for i in inputs]}")
    if inputs[0].type != "tensor(float)":
        raise refuse(f"takes {inputs[0].type}")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1:] != [1, size, size] or (_is_int(shape[0]) and shape[0] < 1):
        raise UserError(
            f"{where} takes input {shape}, not the [N, 1, {size}, {size}] its card promises; re-export the model."
        )
    if len(outputs) != 1 or outputs[0].name != OUTPUT_NAME:
        raise refuse(f"has outputs {[o.name for o in outputs]}")
    if outputs[0].type != "tensor(float)":
        raise refuse(f"returns {outputs[0].type}")
    if len(outputs[0].shape) != 1:
        raise refuse(f"returns shape {list(outputs[0].shape)}")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_exported(model_dir: str | Path, *, allow_modified: bool = False) -> ExportedModel:
    """Load and validate an exported model folder (model.json + model.onnx).

    The card goes through `check_card`, the graph through `check_graph`, and model.onnx must have the
    sha256 the card records (when it records one) unless `allow_modified`.
    """
    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise UserError(
            f"model folder {model_dir} does not exist; pass the folder that holds model.json and model.onnx."
        )
    if not model_dir.is_dir():
        raise UserError(_why_not_a_folder(model_dir))
    card_path, onnx_path = model_dir / CARD_FILE, model_dir / ONNX_FILE
    if not card_path.is_file() or not onnx_path.is_file():
        raise UserError(f"{model_dir} is not a model folder: it needs both {CARD_FILE} and {ONNX_FILE}.")
    try:
        card = json.loads(read_regular_file(card_path, MAX_CARD_BYTES).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, OSError, ValueError):
        raise UserError(f"{card_path} is not a JSON model card; {_FIX}.") from None
    check_card(card, card_path)
    size = card["input"]["size"]
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for every kind of bad file
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"{onnx_path} could not be loaded by onnxruntime ({reason}); re-export the model.") from None
    check_graph(session, size, onnx_path)
    recorded = (card.get("files") or {}).get(ONNX_FILE)
    if recorded is not None and not allow_modified and sha256_file(onnx_path) != recorded:
        raise UserError(
            f"{onnx_path} is not the file its model card records (sha256 differs); re-export the "
            "model, or pass --allow-modified-model if you changed it on purpose."
        )
    return ExportedModel(model_dir=model_dir, card=card, session=session)


MAX_CARD_BYTES = 16 << 20  # a card is a few tens of kB
