"""The model card (model.json) as predict and evaluate read it: every field checked before a model is run.

A card names its classes in the order of the model's output (`classes`; absent: NORMAL, PNEUMONIA). Two
classes keep the binary machinery: one probability of classes[1], float32 [N], called at the card's
threshold; the output is 'prob_pneumonia' for NORMAL/PNEUMONIA (every model shipped before K classes) and
the card's `output.name` ('prob_positive' from the export) for another pair, whose `positive_class` is
classes[1]. K > 2 classes: `decision` "argmax", `threshold` null, output float32 [N, K] named by the card
('probs'), the probability of each class in the order of `classes`.
"""

from __future__ import annotations

import math
from pathlib import Path

from xray_ray import CLASSES
from xray_ray.errors import UserError

# Mirrors export.CONTRACT_VERSION; duplicated because export.py imports torch (a test keeps them equal).
CONTRACT_VERSION = 1
CARD_FILE = "model.json"
ONNX_FILE = "model.onnx"
MAX_IMAGE_SIZE = 4096  # no model of this family takes a larger side; a bigger card value is an error
MAX_CLASSES = 1000
INPUT_NAME, OUTPUT_NAME = "image", "prob_pneumonia"  # the binary graph's contract (export.py writes these)
POSITIVE_OUTPUT, PROBS_OUTPUT = "prob_positive", "probs"  # another pair's output; K > 2 classes' output
_FIX = "re-export the model with xray_ray"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_class_name(v: object) -> bool:
    """Upper-case, printable, no surrounding blanks: the names data discovery records and tables show."""
    return isinstance(v, str) and 0 < len(v) <= 100 and v == v.upper() == v.strip() and v.isprintable()


def classes_of(card: dict) -> tuple[str, ...]:
    """The classes of a checked card, in the order of the model's output (NORMAL, PNEUMONIA when absent)."""
    return tuple(card.get("classes") or CLASSES)


def output_name_of(card: dict) -> str:
    """The ONNX output a checked card promises: 'prob_pneumonia' for NORMAL/PNEUMONIA, else the card's name."""
    classes, output = classes_of(card), card.get("output") or {}
    if classes == CLASSES:
        return OUTPUT_NAME
    return output.get("name") or (POSITIVE_OUTPUT if len(classes) == 2 else PROBS_OUTPUT)


def check_card(card: object, where: str | Path = CARD_FILE) -> dict:
    """Validate a model card (model.json) as predict, evaluate and the export read it; returns it.

    Every field the code reads must be there or absent as allowed, and of the right type: the contract
    version, the input size (a positive int), the classes and how the model decides between them (two
    classes: a threshold, a finite number in [0, 1], not a bool; more: the arg-max, no threshold), the
    output, the data seed, the split settings, the fingerprints, the trial id and the sha256 of model.onnx.
    Raises UserError with one sentence naming the bad field.
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
    """The input, classes, decision, output and trial id of a card."""
    if not isinstance(card.get("input"), dict):
        raise _bad(where, "input", "an object", card.get("input"))
    size = card["input"].get("size")
    if not _is_int(size) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise _bad(where, "input.size", f"a whole number from 1 to {MAX_IMAGE_SIZE}", size)
    channels = card["input"].get("channels", 1)
    if not _is_int(channels) or channels != 1:
        raise _bad(where, "input.channels", "1 (grayscale)", channels)
    classes = card.get("classes", list(CLASSES))
    if (
        not isinstance(classes, list)
        or not 2 <= len(classes) <= MAX_CLASSES
        or not all(_is_class_name(c) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise _bad(where, "classes", "a list of 2 or more distinct upper-case class names", classes)
    if len(classes) == 2:
        _check_binary(card, classes, where)
    else:
        _check_argmax(card, len(classes), where)
    if card.get("trial_id") is not None and not isinstance(card["trial_id"], str):
        raise _bad(where, "trial_id", "a string", card["trial_id"])


def _check_binary(card: dict, classes: list[str], where: str | Path) -> None:
    """Two classes: the threshold on P(classes[1]), the positive class and the output's name."""
    if not isinstance(card.get("threshold"), dict):
        raise _bad(where, "threshold", "an object", card.get("threshold"))
    t = card["threshold"].get("value")
    if not _is_number(t) or not math.isfinite(t) or not 0 <= t <= 1:
        raise _bad(where, "threshold.value", "a finite number from 0 to 1", t)
    if "positive_class" in card and card["positive_class"] != classes[1]:
        raise _bad(where, "positive_class", f"the second of classes, {classes[1]!r},", card["positive_class"])
    output = card.get("output")
    if output is not None and not isinstance(output, dict):
        raise _bad(where, "output", "an object", output)
    name = (output or {}).get("name")
    if tuple(classes) == CLASSES and output is not None and name != OUTPUT_NAME:
        raise _bad(where, "output.name", f"'{OUTPUT_NAME}'", name)
    if output is not None and not (isinstance(name, str) and name.isidentifier()):
        raise _bad(where, "output.name", "the name of the model's output", name)


def _check_argmax(card: dict, k: int, where: str | Path) -> None:
    """K > 2 classes: the arg-max decision, no threshold, an output of K probabilities."""
    if card.get("decision") != "argmax":
        raise _bad(where, "decision", f"'argmax' for a model of {k} classes", card.get("decision"))
    if card.get("threshold") is not None:
        raise _bad(
            where, "threshold", f"null for a model of {k} classes (they decide by the arg-max)", card["threshold"]
        )
    output = card.get("output")
    if not isinstance(output, dict):
        raise _bad(where, "output", "an object", output)
    if not (isinstance(output.get("name"), str) and output["name"].isidentifier()):
        raise _bad(where, "output.name", "the name of the model's output", output.get("name"))
    shape = output.get("shape")
    if shape is not None and (not isinstance(shape, list) or len(shape) != 2 or shape[1] != k):
        raise _bad(where, "output.shape", f"['N', {k}] (one probability per class)", shape)


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
