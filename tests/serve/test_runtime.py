"""runtime.load_exported: one check of the model card and the ONNX graph, shared by predict, evaluate and the
export's read-back; a bad card or graph is one sentence and exit 2 in both tools, never a label or a traceback."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import model_copy, one_error_line, onnx_graph
from xray_ray.data.phantoms import render
from xray_ray.errors import UserError
from xray_ray.serve import evaluate, predict, runtime


def _card(good: Path) -> dict:
    return json.loads((good / "model.json").read_text())


def _set(card: dict, dotted: str, value) -> dict:
    card = json.loads(json.dumps(card))
    *path, last = dotted.split(".")
    node = card
    for key in path:
        node = node[key]
    node[last] = value
    return card


BAD_CARDS = {
    "threshold NaN": ("threshold.value", math.nan, "threshold.value must be a finite number from 0 to 1"),
    "threshold 'inf'": ("threshold.value", "inf", "threshold.value must be a finite number from 0 to 1"),
    "threshold true": ("threshold.value", True, "threshold.value must be a finite number from 0 to 1"),
    "threshold 7.5": ("threshold.value", 7.5, "threshold.value must be a finite number from 0 to 1"),
    "threshold -3": ("threshold.value", -3, "threshold.value must be a finite number from 0 to 1"),
    "size '32'": ("input.size", "32", "input.size must be a whole number"),
    "size 0": ("input.size", 0, "input.size must be a whole number"),
    "size true": ("input.size", True, "input.size must be a whole number"),
    "data.seed 'abc'": ("data.seed", "abc", "data.seed must be a whole number"),
    "data.seed 1.5": ("data.seed", 1.5, "data.seed must be a whole number"),
    "split seed None-like string": ("data.split", {"seed": "x"}, "data.split.seed must be a whole number"),
    "contract version true": ("contract_version", True, "model contract version True is not supported"),
}

BAD_GRAPHS = {
    "float64 input": (dict(input_type="double"), "takes tensor(double)"),
    "[N, 2] output": (dict(output_shape="N2"), "returns shape ['N', 2]"),
    "two outputs": (dict(outputs=2), "has outputs ['prob_pneumonia', 'extra']"),
}


@pytest.fixture(scope="module")
def scan(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "scan.png"
    Image.fromarray(render(0, 0, 1, size=48)).save(path)
    return path


def _run(tool: str, model: Path, scan: Path, *extra: str) -> int:
    if tool == "predict":
        return predict.main(["--model", str(model), str(scan), *extra])
    return evaluate.main(["--model", str(model), "--data", "synthetic:60", "--n-boot", "10", *extra])


@pytest.mark.parametrize("tool", ["predict", "evaluate"])
@pytest.mark.parametrize("kind", BAD_CARDS)
def test_a_bad_card_field_is_one_sentence_and_exit_2(tiny_model, tmp_path, scan, capsys, tool, kind):
    field, value, message = BAD_CARDS[kind]
    bad = model_copy(tiny_model, tmp_path / "m", card=_set(_card(tiny_model), field, value))
    assert _run(tool, bad, scan) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in one_error_line(captured.err)


@pytest.mark.parametrize("tool", ["predict", "evaluate"])
@pytest.mark.parametrize("kind", BAD_GRAPHS)
def test_an_onnx_graph_off_the_contract_is_one_sentence_and_exit_2(tiny_model, tmp_path, scan, capsys, tool, kind):
    kwargs, message = BAD_GRAPHS[kind]
    bad = model_copy(tiny_model, tmp_path / "m", onnx_bytes=onnx_graph(**kwargs))
    assert _run(tool, bad, scan, "--allow-modified-model") == 2  # refused by the contract, not by the hash
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert captured.out == "" and message in line and "the contract is input 'image' float32" in line


def test_a_graph_on_the_contract_is_accepted_when_the_change_is_allowed(tiny_model, tmp_path, scan, capsys):
    """The control for the refusals above, and the sha256 check: a valid replacement graph is refused as
    modified unless --allow-modified-model, then it predicts (its output: the image's mean brightness)."""
    other = model_copy(tiny_model, tmp_path / "m", onnx_bytes=onnx_graph())
    assert predict.main(["--model", str(other), str(scan)]) == 2
    assert "sha256 differs" in one_error_line(capsys.readouterr().err)
    assert predict.main(["--model", str(other), str(scan), "--allow-modified-model"]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    from xray_ray.data.images import load_gray

    mean = float(load_gray(scan.read_bytes(), 32).astype(np.float32).mean() / 255)
    assert row["prob_pneumonia"] == pytest.approx(mean, abs=1e-5)


def test_the_exported_card_passes_the_check_and_records_the_onnx_hash(tiny_model):
    card = runtime.check_card(_card(tiny_model))
    assert card["files"]["model.onnx"] == runtime.sha256_file(tiny_model / "model.onnx")
    model = runtime.load_exported(tiny_model)
    assert 0 <= model.threshold <= 1 and model.image_size == 32


def test_the_export_reads_its_own_model_back_through_the_same_check(monkeypatch, tmp_path):
    """finalize ends with load_exported: an export whose card would not pass is an error there, not later."""
    from conftest import export_tiny_model
    from xray_ray.ship import winner

    real = winner.write_json_atomic

    def off_by_a_bug(card, path):  # as if the card writer had a bug: the threshold lands outside [0, 1]
        real({**card, "threshold": {**card["threshold"], "value": 7.5}}, path)

    monkeypatch.setattr(winner, "write_json_atomic", off_by_a_bug)
    with pytest.raises(UserError, match="threshold.value must be a finite number"):
        export_tiny_model(tmp_path / "m")


def test_check_card_unit_cases(tiny_model):
    good = _card(tiny_model)
    for field, value, message in BAD_CARDS.values():
        with pytest.raises(UserError, match=message.split(" must")[0].replace(".", r"\.")):
            runtime.check_card(_set(good, field, value))
    assert runtime.check_card(_set(good, "threshold.value", 0)) and runtime.check_card(_set(good, "threshold.value", 1))
    assert runtime.check_card(_set(good, "data.seed", None))
    with pytest.raises(UserError, match="files.model.onnx must be a sha256"):
        runtime.check_card(_set(good, "files", {"model.onnx": "abc"}))
