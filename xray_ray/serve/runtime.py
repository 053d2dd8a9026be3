"""Run an exported model with onnxruntime only: no torch, so predict and evaluate start fast anywhere.

An exported model is a folder holding `model.onnx` and its card `model.json` (see winner.py; what the card
must say, for two classes and for K > 2: card.py).
"""

from __future__ import annotations

import errno
import hashlib
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
from xray_ray.common import DEFAULT_MAX_FILE_MB, read_regular_file
from xray_ray.data.images import ImageError, load_gray
from xray_ray.errors import UserError
from xray_ray.serve.card import (  # noqa: F401 - the card's names stay importable from the runtime
    CARD_FILE,
    CONTRACT_VERSION,
    INPUT_NAME,
    MAX_IMAGE_SIZE,
    ONNX_FILE,
    OUTPUT_NAME,
    check_card,
    classes_of,
    output_name_of,
)

VAL_SCORES_FILE = "val_scores.json"  # validation's labels and scores (exports since the site check)
PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin", ".joblib", ".h5", ".keras"}
CLASSES_KEY = "classes"  # the graph's metadata_props entry naming the classes, a JSON list (K-class exports)


@dataclass
class ExportedModel:
    """An exported classifier: the ONNX session plus the card's input contract, classes and decision rule.

    Two classes: `probabilities` gives P(classes[1]) [N], called at the card's threshold. K > 2 classes:
    [N, K], one probability per class in the order of `classes`, and the label is the arg-max.
    """

    model_dir: Path
    card: dict
    session: ort.InferenceSession = field(repr=False)

    @property
    def image_size(self) -> int:
        """Side S of the square grayscale input [N, 1, S, S]."""
        return int(self.card["input"]["size"])

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names in the order of the model's output."""
        return classes_of(self.card)

    @property
    def k(self) -> int:
        """How many classes the model tells apart."""
        return len(self.classes)

    @property
    def output_name(self) -> str:
        """The name of the ONNX graph's one output."""
        return output_name_of(self.card)

    @property
    def threshold(self) -> float | None:
        """Two classes: the probability at or above which an image is called classes[1] (chosen on
        validation); None for K > 2 classes, which decide by the arg-max."""
        return float(self.card["threshold"]["value"]) if self.k == 2 else None

    @property
    def positive_class(self) -> str | None:
        """The class whose probability a two-class model outputs (classes[1]); None for K > 2."""
        return self.classes[1] if self.k == 2 else None

    @property
    def score_columns(self) -> tuple[str, ...]:
        """The probability columns predict writes per image: 'prob_pneumonia' for NORMAL/PNEUMONIA, the
        positive class's 'prob_<CLASS>' for another pair, and one 'prob_<CLASS>' per class for K > 2."""
        if self.classes == CLASSES:
            return (OUTPUT_NAME,)
        return tuple(f"prob_{c}" for c in (self.classes[1:] if self.k == 2 else self.classes))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """P(classes[1]) [N] (two classes) or each class's probability [N, K] (K > 2) for float32 images
        [N, 1, S, S] scaled to [0, 1]."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        s = self.image_size
        if x.ndim != 4 or x.shape[1:] != (1, s, s):
            raise ValueError(f"expected images of shape [N, 1, {s}, {s}], got {list(x.shape)}")
        shape = (len(x),) if self.k == 2 else (len(x), self.k)
        if len(x) == 0:
            return np.zeros(shape, dtype=np.float32)
        (probs,) = self.session.run(None, {INPUT_NAME: x})
        probs = np.asarray(probs, dtype=np.float32)
        if probs.shape != shape and (self.k > 2 or probs.size != len(x)):  # a symbolic dimension: known now
            raise UserError(
                f"{self.model_dir / ONNX_FILE} returned {list(probs.shape)} for {len(x)} images, not the "
                f"{['N', self.k] if self.k > 2 else ['N']} its card promises; re-export the model."
            )
        return probs.reshape(shape)

    predict = probabilities  # the name every caller used before K classes

    def label(self, prob: float) -> str:
        """Class name for one probability of classes[1] at the card's threshold (two classes only)."""
        if self.threshold is None:
            raise ValueError(f"a model of {self.k} classes decides by the arg-max; use labels()")
        return self.classes[int(prob >= self.threshold)]

    def labels(self, probs: np.ndarray) -> list[str]:
        """Class names for the output of `probabilities`: at the threshold (two classes) or the arg-max."""
        probs = np.asarray(probs)
        if self.k == 2:
            return [self.classes[int(p >= self.threshold)] for p in probs.reshape(-1)]
        return [self.classes[i] for i in probs.reshape(-1, self.k).argmax(axis=1)]

    def class_probabilities(self, probs: np.ndarray) -> np.ndarray:
        """Each class's probability [N, K] from the output of `probabilities` (two classes: 1 - p, p)."""
        probs = np.asarray(probs, dtype=np.float64)
        return np.stack([1 - probs, probs], axis=1) if self.k == 2 else probs.reshape(-1, self.k)

    def rows(self, probs: np.ndarray) -> list[dict]:
        """Per image, what predict writes beside its path: the probability columns and the label."""
        labels = self.labels(probs)
        if self.k == 2:
            (column,) = self.score_columns
            return [{column: float(p), "label": name} for p, name in zip(np.reshape(probs, -1), labels)]
        return [
            {"label": name, **{c: float(v) for c, v in zip(self.score_columns, row)}}
            for row, name in zip(np.reshape(probs, (-1, self.k)), labels)
        ]

    def predict_files(
        self,
        paths: Iterable[str | Path],
        batch_size: int = 64,
        threads: int | None = None,
        max_bytes: int | None = DEFAULT_MAX_FILE_MB << 20,
    ) -> Iterator[dict]:
        """Yield, in input order, {path, <score_columns>, label} or {path, error} for each image file.

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
            for r, values in zip(good, self.rows(self.probabilities(x))):
                r.update(values)
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


def check_graph(
    session: ort.InferenceSession,
    size: int,
    where: str | Path = ONNX_FILE,
    *,
    output: str = OUTPUT_NAME,
    classes: tuple[str, ...] = CLASSES,
) -> None:
    """The ONNX graph's inputs, outputs and class names against the card: one input 'image', float32
    [N, 1, S, S] with S the card's size; one output named as the card says, float32 [N] for two classes or
    [N, K] for K > 2; and, where the graph names its classes (metadata 'classes', a JSON list; every
    K-class export does), the card's classes in the card's order. UserError otherwise."""
    k = len(classes)
    promised = "[N]" if k == 2 else f"[N, {k}]"

    def refuse(what: str) -> UserError:
        return UserError(
            f"{where} {what}, but the contract is input '{INPUT_NAME}' float32 [N, 1, {size}, {size}] "
            f"and output '{output}' float32 {promised}; re-export the model."
        )

    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise refuse(f"has inputs {[i.name for i in inputs]}")
    if inputs[0].type != "tensor(float)":
        raise refuse(f"takes {inputs[0].type}")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1:] != [1, size, size] or (isinstance(shape[0], int) and shape[0] < 1):
        raise UserError(
            f"{where} takes input {shape}, not the [N, 1, {size}, {size}] its card promises; re-export the model."
        )
    if len(outputs) != 1 or outputs[0].name != output:
        raise refuse(f"has outputs {[o.name for o in outputs]}")
    if outputs[0].type != "tensor(float)":
        raise refuse(f"returns {outputs[0].type}")
    out_shape = list(outputs[0].shape)
    if len(out_shape) != (1 if k == 2 else 2) or (k > 2 and isinstance(out_shape[1], int) and out_shape[1] != k):
        raise refuse(f"returns shape {out_shape}")
    _check_graph_classes(session, classes, where)


def _check_graph_classes(session: ort.InferenceSession, classes: tuple[str, ...], where: str | Path) -> None:
    """The class names the graph carries in its metadata must be the card's, in the same order."""
    meta = session.get_modelmeta().custom_metadata_map.get(CLASSES_KEY)
    if meta is None:
        if len(classes) > 2:  # without them nothing ties the K columns to the card's names
            raise UserError(
                f"{where} does not name its classes in its metadata ('{CLASSES_KEY}'); re-export the model."
            )
        return
    try:
        named = json.loads(meta)
    except json.JSONDecodeError:
        named = meta
    if named != list(classes):
        shown = named if isinstance(named, list) else repr(str(named)[:40])
        raise UserError(
            f"{where} names its classes {shown} in its metadata but its card names {list(classes)}; "
            "re-export the model (a card and a graph of different exports do not belong together)."
        )


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
        raise UserError(f"{card_path} is not a JSON model card; re-export the model with xray_ray.") from None
    check_card(card, card_path)
    size = card["input"]["size"]
    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for every kind of bad file
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"{onnx_path} could not be loaded by onnxruntime ({reason}); re-export the model.") from None
    check_graph(session, size, onnx_path, output=output_name_of(card), classes=classes_of(card))
    recorded = (card.get("files") or {}).get(ONNX_FILE)
    if recorded is not None and not allow_modified and sha256_file(onnx_path) != recorded:
        raise UserError(
            f"{onnx_path} is not the file its model card records (sha256 differs); re-export the "
            "model, or pass --allow-modified-model if you changed it on purpose."
        )
    return ExportedModel(model_dir=model_dir, card=card, session=session)


MAX_CARD_BYTES = 16 << 20  # a card is a few tens of kB
