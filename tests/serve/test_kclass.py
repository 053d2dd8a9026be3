"""K >= 2 classes in the serve wing (issue 21): loading a K-class model folder, predict in each output format,
evaluate's K-class figures, and the refusals, each one sentence and exit 2.

The models are small ONNX graphs built here with the onnx helpers (no torch, no Ray): the image's mean
brightness m, logits linear in m, a softmax; so a dark image is NORMAL, a mid-grey one BACTERIA and a bright
one VIRUS, and every probability can be recomputed in numpy to check what the tools print.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import one_error_line, run_module
from xray_ray.data.images import load_gray
from xray_ray.data.manifest import Manifest, frame
from xray_ray.data.sources import load_source
from xray_ray.errors import UserError
from xray_ray.metrics import multiclass_metrics, roc_auc
from xray_ray.serve import adapt, evaluate, predict, runtime
from xray_ray.serve.multiclass import format_k_table, log_loss_ci, normal_vs_rest, summarize_k

SIZE = 32
SUBTYPES = ("NORMAL", "BACTERIA", "VIRUS")
SLOPE = 30.0  # logits' steepness: class boundaries at m = 1/3 and 2/3, soft enough for errors near them
# the data wing's K-class discovery (kclass-data) adds labels= to load_source; the folder tests need it
K_CLASS_DISCOVERY = "labels" in inspect.signature(load_source).parameters


def logits_of(m: np.ndarray, k: int) -> np.ndarray:
    """Logits [N, K], linear in the mean brightness, class j ahead of j - 1 from m = j / K on."""
    j = np.arange(k)
    return SLOPE * (j * m[:, None] - j * (j + 1) / (2 * k))


def reference_probs(pixels: np.ndarray, k: int = 3) -> np.ndarray:
    """What the graph computes, in numpy: softmax of the logits of uint8 images [N, S, S]."""
    z = logits_of(pixels.astype(np.float32).reshape(len(pixels), -1).mean(axis=1) / 255.0, k)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def kclass_graph(k: int = 3, *, meta: tuple | list | None = SUBTYPES, output: str = "probs", dim: object = None):
    """ONNX bytes: image [N, 1, S, S] -> `output` float32 [N, k] (softmax of logits_of), classes in metadata.
    With `dim`, the output's class dimension is that symbol, and a Reshape to its own shape hides k from
    onnxruntime's shape inference, so that only running the graph tells it."""
    from onnx import TensorProto, helper

    j = np.arange(k)
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Unsqueeze", ["m", "axis1"], ["m1"]),
        helper.make_node("Mul", ["m1", "w"], ["wm"]),
        helper.make_node("Add", ["wm", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], [output if dim is None else "raw"], axis=1),
    ]
    if dim is not None:
        nodes += [helper.make_node("Shape", ["raw"], ["shp"]), helper.make_node("Reshape", ["raw", "shp"], [output])]
    inits = [
        helper.make_tensor("axis1", TensorProto.INT64, [1], [1]),
        helper.make_tensor("w", TensorProto.FLOAT, [1, k], (SLOPE * j).tolist()),
        helper.make_tensor("b", TensorProto.FLOAT, [k], (-SLOPE * j * (j + 1) / (2 * k)).tolist()),
    ]
    graph = helper.make_graph(
        nodes,
        "kclass_test",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", k if dim is None else dim])],
        initializer=inits,
    )
    return _serialize(helper, graph, meta)


def binary_graph(output: str, meta: list[str] | None) -> bytes:
    """ONNX bytes: image -> `output` float32 [N], the mean brightness (a probability of classes[1])."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["image"], [output], axes=[1, 2, 3], keepdims=0)],
        "pair_test",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N"])],
    )
    return _serialize(helper, graph, meta)


def _serialize(helper, graph, meta: tuple | list | None) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if meta is not None:
        helper.set_model_props(model, {"classes": json.dumps(list(meta))})
    return model.SerializeToString()


def kclass_card(classes=SUBTYPES, output: str = "probs") -> dict:
    """A K-class card as ship.multiclass writes it."""
    return {
        "contract_version": 1,
        "input": {"name": "image", "size": SIZE, "channels": 1, "shape": ["N", 1, SIZE, SIZE], "dtype": "float32"},
        "classes": list(classes),
        "decision": "argmax",
        "threshold": None,
        "output": {
            "name": output,
            "shape": ["N", len(classes)],
            "dtype": "float32",
            "meaning": "probability of each class, in the order of classes",
        },
        "data": {"seed": 0},
        "trial_id": "kclass_test",
    }


def pair_card(classes=("NORMAL", "TUBERCULOSIS")) -> dict:
    card = kclass_card(classes, output="prob_positive")
    card.update(decision="threshold", threshold={"value": 0.5}, positive_class=classes[1])
    card["output"] = {"name": "prob_positive", "shape": ["N"], "dtype": "float32", "meaning": "P(TUBERCULOSIS)"}
    return card


def write_model(dest: Path, card: dict, onnx_bytes: bytes) -> Path:
    """A model folder: model.onnx and its card, which records the graph's sha256."""
    dest.mkdir(parents=True)
    (dest / "model.onnx").write_bytes(onnx_bytes)
    card = {**card, "files": {"model.onnx": hashlib.sha256(onnx_bytes).hexdigest()}}
    (dest / "model.json").write_text(json.dumps(card))
    return dest


@pytest.fixture(scope="module")
def kmodel(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("k") / "best", kclass_card(), kclass_graph())


@pytest.fixture(scope="module")
def pair_model(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("pair") / "best", pair_card(), binary_graph("prob_positive", None))


LEVELS = {"NORMAL": 0.2, "BACTERIA": 0.5, "VIRUS": 0.8}  # mean brightness of each class's images


def scan(level: float, seed: int, spread: float = 0.1, size: int = 40) -> Image.Image:
    """A noisy grey image whose mean brightness is `level` plus a per-image offset of sd `spread` (so some
    images cross a class boundary)."""
    rng = np.random.default_rng(seed)
    mean = np.clip(level + rng.normal(0, spread), 0.05, 0.95)
    return Image.fromarray(np.clip(rng.normal(mean * 255, 20, (size, size)), 0, 255).astype(np.uint8))


def file_name(cls: str, patient: int, k: int) -> str:
    """Kermany-style names: IM-... for NORMAL, personN_bacteria_M / personN_virus_M for the subtypes."""
    return f"IM-{patient:04d}-{k:04d}.jpeg" if cls == "NORMAL" else f"person{patient}_{cls.lower()}_{k}.jpeg"


@pytest.fixture(scope="module")
def subtype_folder(tmp_path_factory) -> tuple[Path, list[dict]]:
    """<root>/<split>/{NORMAL,BACTERIA,VIRUS}/ JPEGs, two per patient, and their manifest rows."""
    root, rows, i = tmp_path_factory.mktemp("subtypes") / "chest_xray", [], 0
    for split, per_class in (("train", 4), ("test", 8)):
        for label, cls in enumerate(SUBTYPES):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for k in range(per_class):
                patient = 1000 * (split == "test") + 100 * label + k // 2
                path = folder / file_name(cls, patient, k)
                scan(LEVELS[cls], i).save(path, quality=95)
                rows.append(_row(path, label, cls, split, patient))
                i += 1
    return root, rows


def _row(path: Path, label: int, cls: str, split: str, patient: int) -> dict:
    data = path.read_bytes()
    return {
        "uid": f"{split}/{cls}/{path.name}",
        "location": str(path),
        "index": -1,
        "label": label,
        "class_name": cls,
        "orig_split": split,
        "patient": f"{cls}{patient}",
        "sha1": hashlib.sha1(data, usedforsecurity=False).hexdigest(),
        "width": 40,
        "height": 40,
    }


def manifest_of(rows: list[dict], classes=SUBTYPES) -> Manifest:
    """The manifest discovery gives a folder of these classes (built here: main's discovery knows two)."""
    return Manifest(frame(rows), info={"source": "folder", "classes": list(classes)})


def test_a_k_class_folder_loads_with_its_classes_and_probabilities(kmodel, subtype_folder):
    model = runtime.load_exported(kmodel)
    assert model.classes == SUBTYPES and model.k == 3 and model.output_name == "probs"
    assert model.threshold is None and model.positive_class is None
    assert model.score_columns == ("prob_NORMAL", "prob_BACTERIA", "prob_VIRUS")
    pixels = np.stack([load_gray(Path(r["location"]).read_bytes(), SIZE) for r in subtype_folder[1]])
    probs = model.probabilities(pixels.astype(np.float32)[:, None] / 255)
    assert probs.shape == (len(pixels), 3) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, reference_probs(pixels), atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert model.labels(probs) == [SUBTYPES[i] for i in reference_probs(pixels).argmax(axis=1)]
    assert model.class_probabilities(probs).shape == (len(pixels), 3)
    assert model.probabilities(np.zeros((0, 1, SIZE, SIZE), np.float32)).shape == (0, 3)
    with pytest.raises(ValueError, match="arg-max"):
        model.label(0.5)


def test_a_binary_model_keeps_its_contract_and_gains_the_same_api(tiny_model):
    model = runtime.load_exported(tiny_model)
    assert model.classes == ("NORMAL", "PNEUMONIA") and model.k == 2 and model.output_name == "prob_pneumonia"
    assert model.positive_class == "PNEUMONIA" and model.score_columns == ("prob_pneumonia",)
    p = np.array([0.0, model.threshold, 1.0], np.float32)
    assert model.labels(p) == ["NORMAL", "PNEUMONIA", "PNEUMONIA"] == [model.label(v) for v in p]
    np.testing.assert_allclose(model.class_probabilities(p), [[1, 0], [1 - p[1], p[1]], [0, 1]], atol=1e-6)
    assert model.rows(p[:1]) == [{"prob_pneumonia": 0.0, "label": "NORMAL"}]


def test_another_pair_of_classes_thresholds_its_positive_class(pair_model, tmp_path, capsys):
    model = runtime.load_exported(pair_model)
    assert model.classes == ("NORMAL", "TUBERCULOSIS") and model.output_name == "prob_positive"
    assert model.positive_class == "TUBERCULOSIS" and model.score_columns == ("prob_TUBERCULOSIS",)
    dark, bright = tmp_path / "dark.png", tmp_path / "bright.png"
    scan(0.2, 0, spread=0).save(dark)
    scan(0.8, 1, spread=0).save(bright)
    assert predict.main(["--model", str(pair_model), str(dark), str(bright)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [set(r) for r in rows] == [{"path", "prob_TUBERCULOSIS", "label"}] * 2
    assert [r["label"] for r in rows] == ["NORMAL", "TUBERCULOSIS"]  # mean brightness at the 0.5 threshold
    out = tmp_path / "pred.csv"
    assert predict.main(["--model", str(pair_model), str(dark), str(bright), "--csv", str(out)]) == 0
    assert "(1 TUBERCULOSIS at threshold 0.5000)" in capsys.readouterr().out
    assert next(csv.reader(out.open())) == ["path", "prob_TUBERCULOSIS", "label", "error"]


# ---------------------------------------------------------------- predict, in each output format


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> Path:
    """One image of each class's brightness and a truncated JPEG."""
    root = tmp_path_factory.mktemp("scans")
    for i, cls in enumerate(SUBTYPES):
        scan(LEVELS[cls], 50 + i, spread=0).save(root / f"{i}_{cls.lower()}.png")
    scan(0.5, 9).save(root / "9_broken.jpeg", quality=90)
    (root / "9_broken.jpeg").write_bytes((root / "9_broken.jpeg").read_bytes()[:300])
    return root


def _expected(path: str) -> np.ndarray:
    return reference_probs(load_gray(Path(path).read_bytes(), SIZE)[None])[0]


def test_predict_json_lines_give_the_class_and_each_class_probability(kmodel, scans, capsys):
    assert predict.main(["--model", str(kmodel), str(scans), "--batch-size", "2"]) == 1  # the broken file
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["0_normal.png", "1_bacteria.png", "2_virus.png", "9_broken.jpeg"]
    for r, cls in zip(rows, SUBTYPES):
        assert list(r) == ["path", "label", "prob_NORMAL", "prob_BACTERIA", "prob_VIRUS"]
        probs = [r[f"prob_{c}"] for c in SUBTYPES]
        np.testing.assert_allclose(probs, _expected(r["path"]), atol=1e-5)
        assert r["label"] == cls == SUBTYPES[int(np.argmax(probs))]
    assert set(rows[3]) == {"path", "error"}


def test_predict_tables_have_a_column_per_class(kmodel, scans, tmp_path, capsys):
    out_csv, out_pq = tmp_path / "p.csv", tmp_path / "p.parquet"
    assert predict.main(["--model", str(kmodel), str(scans), "--csv", str(out_csv)]) == 1
    summary = capsys.readouterr().out
    assert "3 predicted (1 NORMAL, 1 BACTERIA, 1 VIRUS by the arg-max), 1 failed" in summary
    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "prob_NORMAL", "prob_BACTERIA", "prob_VIRUS", "error"]
    assert [r["label"] for r in rows] == [*SUBTYPES, ""] and rows[3]["error"] and not rows[3]["prob_VIRUS"]
    np.testing.assert_allclose([float(rows[1][f"prob_{c}"]) for c in SUBTYPES], _expected(rows[1]["path"]), atol=1e-5)
    assert predict.main(["--model", str(kmodel), str(scans), "--parquet", str(out_pq)]) == 1
    table = pd.read_parquet(out_pq)
    assert list(table.columns) == ["path", "label", "prob_NORMAL", "prob_BACTERIA", "prob_VIRUS", "error"]
    assert all(table[f"prob_{c}"].dtype == np.float64 for c in SUBTYPES)
    assert table["prob_NORMAL"].isna().tolist() == [False, False, False, True]
    np.testing.assert_allclose(table.iloc[:3][[f"prob_{c}" for c in SUBTYPES]].sum(axis=1), 1, atol=1e-5)


def test_a_k_class_model_predicts_without_torch(kmodel, scans):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from xray_ray.serve import predict\n"
        "rc = predict.main(['--model', sys.argv[1], sys.argv[2]])\n"
        "assert sys.modules['torch'] is None\n"
        "sys.exit(rc)\n"
    )
    res = run_module("", str(kmodel), str(scans / "2_virus.png"), code=code)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["label"] == "VIRUS"


# ---------------------------------------------------------------- models that do not hold together


def _card_with(**changes) -> dict:
    card = kclass_card()
    for key, value in changes.items():
        if value is _DROP:
            card.pop(key)
        else:
            card[key] = value
    return card


_DROP = object()
BAD_MODELS = {
    "metadata in another order": (
        {},
        dict(meta=["NORMAL", "VIRUS", "BACTERIA"]),
        "names its classes ['NORMAL', 'VIRUS', 'BACTERIA'] in its metadata but its card names",
    ),
    "no class names in the graph": ({}, dict(meta=None), "does not name its classes in its metadata"),
    "four columns for three classes": ({}, dict(k=4), "returns shape ['N', 4]"),
    "another output name": (dict(output={"name": "scores"}), {}, "has outputs ['probs']"),
    "no decision": (dict(decision=_DROP), {}, "decision must be 'argmax' for a model of 3 classes"),
    "a threshold": (dict(threshold={"value": 0.5}), {}, "threshold must be null for a model of 3 classes"),
    "lower-case classes": (
        dict(classes=["normal", "bacteria", "virus"]),
        dict(meta=["normal", "bacteria", "virus"]),
        "classes must be a list of 2 or more distinct upper-case class names",
    ),
    "a class twice": (dict(classes=["NORMAL", "VIRUS", "VIRUS"]), {}, "classes must be a list of 2 or more distinct"),
    "one class": (dict(classes=["NORMAL"]), {}, "classes must be a list of 2 or more"),
    "output shape of four": (
        dict(output={"name": "probs", "shape": ["N", 4]}),
        {},
        "output.shape must be ['N', 3] (one probability per class)",
    ),
}


@pytest.mark.parametrize("kind", BAD_MODELS)
def test_a_k_class_model_that_does_not_hold_together_is_one_sentence_and_exit_2(kind, tmp_path, scans, capsys):
    card_changes, graph_args, message = BAD_MODELS[kind]
    bad = write_model(tmp_path / "m", _card_with(**card_changes), kclass_graph(**graph_args))
    assert predict.main(["--model", str(bad), str(scans / "0_normal.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and message in one_error_line(captured.err)


def test_a_pair_whose_positive_class_is_not_the_second_is_refused(tmp_path, scans, capsys):
    card = {**pair_card(), "positive_class": "NORMAL"}
    bad = write_model(tmp_path / "m", card, binary_graph("prob_positive", None))
    assert predict.main(["--model", str(bad), str(scans / "0_normal.png")]) == 2
    assert "positive_class must be the second of classes, 'TUBERCULOSIS'" in one_error_line(capsys.readouterr().err)


def test_a_class_dimension_known_only_at_run_time_is_still_checked(tmp_path, scans, capsys):
    """A graph whose output is [N, K] with K symbolic loads; four columns for three classes fail when it runs."""
    good = write_model(tmp_path / "ok", kclass_card(), kclass_graph(dim="K"))
    assert predict.main(["--model", str(good), str(scans / "2_virus.png")]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == "VIRUS"
    bad = write_model(tmp_path / "bad", kclass_card(), kclass_graph(4, dim="K"))
    assert predict.main(["--model", str(bad), str(scans / "2_virus.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "returned [1, 4] for 1 images, not the ['N', 3]" in one_error_line(captured.err)


def test_adapt_refuses_a_k_class_model(kmodel, scans, capsys):
    assert adapt.main(["--model", str(kmodel), "--images", str(scans)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "adapt handles two-class models only" in one_error_line(captured.err)


# ---------------------------------------------------------------- evaluate


def _scored(model_dir: Path, rows: list[dict], split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Labels (in SUBTYPES order) and probabilities of a split's rows, scored here without evaluate."""
    rows = [r for r in rows if r["orig_split"] == split]
    pixels = np.stack([load_gray(Path(r["location"]).read_bytes(), SIZE) for r in rows])
    probs = runtime.load_exported(model_dir).probabilities(pixels.astype(np.float32)[:, None] / 255)
    return np.array([SUBTYPES.index(r["class_name"]) for r in rows]), probs


def test_evaluate_gives_the_k_class_figures_with_intervals(kmodel, subtype_folder):
    root, rows = subtype_folder
    model = runtime.load_exported(kmodel)
    result = evaluate.evaluate_manifest(model, manifest_of(rows), str(root), split="test", n_boot=50)
    assert result["classes"] == list(SUBTYPES) and result["decision"] == "argmax" and result["threshold"] is None
    m = result["metrics"]
    y, probs = _scored(kmodel, rows)
    want = multiclass_metrics(y, probs, SUBTYPES)
    assert m["n"] == 24 and m["patients"] == 12 and m["counts"] == {c: 8 for c in SUBTYPES}
    assert m["confusion"] == want["confusion"]
    assert all(m["per_class"][c] == pytest.approx(want["per_class"][c]) for c in SUBTYPES)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "log_loss"):
        assert m[key] == pytest.approx(want[key], abs=1e-9)
        lo, hi = m["ci"][key]
        assert lo <= hi, key
    assert 0.5 < m["accuracy"] < 1  # the brightness model is good and, near its boundaries, wrong sometimes
    assert {f"{s}__{c}" for s in ("sensitivity", "specificity", "auc") for c in SUBTYPES} <= set(m["ci"])
    nvr, abnormal = m["normal_vs_rest"], y != 0
    called = probs.argmax(axis=1) != 0
    assert nvr["abnormal"] == 16 and nvr["tp"] + nvr["fn"] == 16 and nvr["tn"] + nvr["fp"] == 8
    assert nvr["sensitivity"] == pytest.approx(called[abnormal].mean())
    assert nvr["specificity"] == pytest.approx((~called[~abnormal]).mean())
    assert nvr["roc_auc"] == pytest.approx(roc_auc(abnormal, 1 - probs[:, 0].astype(np.float64)))
    assert set(nvr["ci"]) == {"sensitivity", "specificity", "precision", "accuracy", "f1", "roc_auc", "pr_auc"}
    table = format_k_table(m)
    for text in ("balanced_accuracy", "macro_auc", "log_loss", "per class", "confusion matrix", "normal vs rest"):
        assert text in table
    confusion = table.split("confusion matrix", 1)[1]
    row = next(line for line in confusion.splitlines() if line.startswith("BACTERIA "))
    assert row.split()[1:] == [str(v) for v in m["confusion"][1]]


def test_evaluate_maps_the_datas_class_order_onto_the_models(kmodel, subtype_folder):
    root, rows = subtype_folder
    model = runtime.load_exported(kmodel)
    order = ("BACTERIA", "NORMAL", "VIRUS")  # the same classes, another label numbering
    renumbered = [{**r, "label": order.index(r["class_name"])} for r in rows]
    same = evaluate.evaluate_manifest(model, manifest_of(rows), str(root), n_boot=20)
    other = evaluate.evaluate_manifest(model, manifest_of(renumbered, order), str(root), n_boot=20)
    assert other["metrics"] == same["metrics"]


def test_evaluate_refuses_classes_the_model_and_the_data_do_not_share(kmodel, tiny_model, subtype_folder, capsys):
    root, rows = subtype_folder
    res = evaluate.main(["--model", str(kmodel), "--data", "synthetic:60", "--n-boot", "10"])
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert res == 2 and captured.out == ""
    assert "the model's classes (NORMAL, BACTERIA, VIRUS) are not those of the data at synthetic:60" in line
    assert "(NORMAL, PNEUMONIA)" in line and "--labels subtype" in line
    four = [*rows, {**rows[0], "uid": "test/COVID/x.jpeg", "label": 3, "class_name": "COVID"}]
    with pytest.raises(UserError, match=r"\(NORMAL, BACTERIA, VIRUS\) are not those of the data at .* VIRUS, COVID\)"):
        evaluate.evaluate_manifest(runtime.load_exported(kmodel), manifest_of(four, (*SUBTYPES, "COVID")), str(root))
    with pytest.raises(UserError, match=r"model's classes \(NORMAL, PNEUMONIA\) are not those"):
        evaluate.evaluate_manifest(runtime.load_exported(tiny_model), manifest_of(rows), str(root))


def test_evaluate_a_pair_of_other_classes_at_its_threshold(pair_model, subtype_folder):
    root, rows = subtype_folder
    pair = [{**r, "class_name": "TUBERCULOSIS"} if r["label"] else r for r in rows if r["label"] != 1]
    pair = [{**r, "label": int(r["label"] > 0)} for r in pair]
    result = evaluate.evaluate_manifest(
        runtime.load_exported(pair_model), manifest_of(pair, ("NORMAL", "TUBERCULOSIS")), str(root), n_boot=20
    )
    m = result["metrics"]
    assert result["decision"] == "threshold" and result["threshold"] == 0.5
    assert m["counts"] == {"NORMAL": 8, "TUBERCULOSIS": 8} and m["at_threshold"]["tp"] + m["at_threshold"]["fn"] == 8


@pytest.mark.skipif(not K_CLASS_DISCOVERY, reason="needs the data wing's K-class discovery (branch kclass-data)")
def test_evaluate_a_folder_of_three_class_folders_end_to_end(kmodel, subtype_folder, capsys):
    root, rows = subtype_folder
    args = ["--model", str(kmodel), "--data", str(root), "--split", "test", "--n-boot", "20"]
    assert evaluate.main(args) == 0
    out = capsys.readouterr().out
    assert "24 images (8 NORMAL, 8 BACTERIA, 8 VIRUS) from 12 patients" in out
    assert "confusion matrix" in out and "normal vs rest" in out
    assert evaluate.main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    y, probs = _scored(kmodel, rows)
    assert result["metrics"]["confusion"] == multiclass_metrics(y, probs, SUBTYPES)["confusion"]


@pytest.mark.skipif(not K_CLASS_DISCOVERY, reason="needs the data wing's K-class discovery (branch kclass-data)")
def test_evaluate_reads_the_subtypes_from_kaggle_file_names(kmodel, subtype_folder, tmp_path, capsys):
    root, rows = subtype_folder
    kaggle = tmp_path / "chest_xray"
    for r in rows:  # the Kaggle layout: BACTERIA and VIRUS files together under PNEUMONIA/
        cls = "NORMAL" if r["class_name"] == "NORMAL" else "PNEUMONIA"
        dest = kaggle / r["orig_split"] / cls / Path(r["location"]).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(Path(r["location"]).read_bytes())
    args = ["--model", str(kmodel), "--data", str(kaggle), "--split", "test", "--n-boot", "20", "--json"]
    assert evaluate.main(args) == 2  # folder labels: NORMAL and PNEUMONIA, not the model's classes
    assert "--labels subtype" in one_error_line(capsys.readouterr().err)
    assert evaluate.main([*args, "--labels", "subtype"]) == 0
    result = json.loads(capsys.readouterr().out)
    y, probs = _scored(kmodel, rows)
    assert result["labels"] == "subtype" and result["metrics"]["counts"] == {c: 8 for c in SUBTYPES}
    assert result["metrics"]["confusion"] == multiclass_metrics(y, probs, SUBTYPES)["confusion"]


def test_evaluate_reads_the_labels_the_models_search_read(subtype_folder, tmp_path, capsys):
    root, rows = subtype_folder
    kaggle = tmp_path / "chest_xray"
    for r in rows:
        cls = "NORMAL" if r["class_name"] == "NORMAL" else "PNEUMONIA"
        dest = kaggle / r["orig_split"] / cls / Path(r["location"]).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(Path(r["location"]).read_bytes())
    card = {**kclass_card(), "data": {"source": {"source": "folder", "labels": "subtype"}}}
    model = write_model(tmp_path / "subtype-model", card, kclass_graph())
    args = ["--model", str(model), "--data", str(kaggle), "--split", "test", "--n-boot", "20", "--json"]
    assert evaluate.main(args) == 0  # no --labels: the card says its search read the subtypes
    result = json.loads(capsys.readouterr().out)
    assert result["labels"] == "subtype" and result["metrics"]["counts"] == {c: 8 for c in SUBTYPES}
    assert evaluate.main([*args, "--labels", "folder"]) == 2  # asked for the folders' classes: refused


# ---------------------------------------------------------------- the figures themselves


def test_normal_vs_rest_calls_by_the_arg_max_and_ranks_by_one_minus_p_normal():
    y = np.array([0, 0, 1, 2, 1])
    probs = np.array(
        [
            [0.8, 0.1, 0.1],  # normal, called normal
            [0.3, 0.6, 0.1],  # normal, called abnormal: a false positive
            [0.4, 0.3, 0.3],  # bacteria, arg-max NORMAL although 1 - P(NORMAL) = 0.6: a false negative
            [0.1, 0.2, 0.7],  # virus, called abnormal
            [0.2, 0.7, 0.1],  # bacteria, called abnormal
        ]
    )
    nvr = normal_vs_rest(y, probs, SUBTYPES, n_boot=20)
    assert (nvr["tp"], nvr["fn"], nvr["tn"], nvr["fp"]) == (2, 1, 1, 1)
    assert nvr["sensitivity"] == pytest.approx(2 / 3) and nvr["specificity"] == pytest.approx(1 / 2)
    # ranked by 1 - P(NORMAL): abnormal 0.6, 0.9, 0.8 against normal 0.2, 0.7: 5 of 6 pairs in order
    assert nvr["roc_auc"] == pytest.approx(5 / 6)
    summary = summarize_k(y, probs, SUBTYPES, n_boot=20)
    assert summary["counts"] == {"NORMAL": 2, "BACTERIA": 2, "VIRUS": 1} and "normal_vs_rest" in summary
    assert "normal_vs_rest" not in summarize_k(y, probs, ("A", "B", "C"), n_boot=20)


def test_the_log_loss_interval_resamples_patients():
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), y] = 0.8
    probs[5] = [0.45, 0.45, 0.1]  # one badly wrong image
    loss = -np.log(probs[np.arange(6), y])
    lo, hi = log_loss_ci(y, probs, n_boot=400, seed=1)
    assert loss.min() <= lo < loss.mean() < hi <= loss.max()
    # all six images of one patient: every resample is that patient, the interval is the point
    assert log_loss_ci(y, probs, groups=["p"] * 6, n_boot=50) == pytest.approx((loss.mean(), loss.mean()))
