"""K classes (issue 21): class folders, the subtype labels of the Kaggle layout, K-class npz and phantoms,
and each bad input's one sentence."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import KAGGLE_FILES, portable_output, write_kaggle_tree, write_npz
from xray_ray import CLASSES, SUBTYPE_CLASSES
from xray_ray.data.labels import NO_SUBTYPE
from xray_ray.data.loaders import synthetic_spec
from xray_ray.data.manifest import order_classes
from xray_ray.data.phantoms import PHANTOM_CLASSES, render
from xray_ray.data.sources import load_source, read_pixels
from xray_ray.data.splits import assign_splits
from xray_ray.errors import DataError


def write_class_tree(root, counts: dict[tuple[str, str], int], size: int = 32):
    """<root>/<split>/<CLASS>/pN_M.png: phantoms of the class's pattern (PHANTOM_CLASSES by position in
    the sorted folder names), patients pN owning two images each; every image distinct."""
    names = order_classes(c for _, c in counts)
    i = 0
    for (split, cls), n in counts.items():
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            label = names.index(cls.upper()) % len(PHANTOM_CLASSES)
            Image.fromarray(render(1, i, label, size=size)).save(folder / f"p{i // 2}_{k % 2}.png")
            i += 1
    return root


def one_sentence(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


# ---------------------------------------------------------------- class folders


def test_a_three_class_folder_names_and_orders_its_classes(tmp_path):
    counts = {
        ("train", "NORMAL"): 6,
        ("train", "covid"): 6,
        ("train", "PNEUMONIA"): 6,
        ("test", "Covid"): 2,
        ("test", "normal"): 2,
        ("test", "PNEUMONIA"): 2,
    }
    m = load_source(str(write_class_tree(tmp_path / "d", counts)))
    assert m.info["classes"] == ["NORMAL", "COVID", "PNEUMONIA"]  # NORMAL first, the others sorted
    df = m.df.set_index("uid")
    assert set(zip(df["label"], df["class_name"])) == {(0, "NORMAL"), (1, "COVID"), (2, "PNEUMONIA")}
    assert df.loc["test/Covid/p9_0.png", "class_name"] == "COVID"  # matched across splits ignoring case
    assert m.info["counts"] == {
        "train": {"NORMAL": 6, "COVID": 6, "PNEUMONIA": 6, "total": 18},
        "test": {"NORMAL": 2, "COVID": 2, "PNEUMONIA": 2, "total": 6},
    }
    assert m.info["warnings"] == [] and m.skipped.empty


def test_a_four_class_folder_without_normal_splits_every_class(tmp_path):
    counts = {("train", c): 30 for c in ("TB", "VIRAL", "BACTERIAL", "COVID")}
    m = load_source(str(write_class_tree(tmp_path / "d", counts)))
    assert m.info["classes"] == ["BACTERIAL", "COVID", "TB", "VIRAL"]
    df, info = assign_splits(m.df, seed=0)
    for split in ("train", "val", "test"):
        assert set(df.loc[df["split"] == split, "class_name"]) == set(m.info["classes"])
        assert list(info["counts"][split]) == [*m.info["classes"], "total"]
    assert info["warnings"] == []
    # pixels come back through read_pixels like any folder's
    row = m.df.iloc[0].to_dict()
    assert read_pixels(row, 16).shape == (16, 16)


def test_a_binary_folder_keeps_its_labels(kaggle_dir, tmp_path):
    m = load_source(str(kaggle_dir))
    assert m.info["classes"] == list(CLASSES) and m.info["labels"] == "folder"
    assert dict(zip(m.df["class_name"], m.df["label"])) == {"NORMAL": 0, "PNEUMONIA": 1}
    # a folder holding PNEUMONIA only (say, a test/ to evaluate) is still the binary data set: label 1
    only = write_kaggle_tree(tmp_path / "only", {("test", "PNEUMONIA"): ["person1_virus_1.jpeg"]})
    m = load_source(str(only))
    assert m.info["classes"] == list(CLASSES) and m.df["label"].tolist() == [1]
    # another pair is binary too, its classes in the usual order
    pair = write_class_tree(tmp_path / "pair", {("train", "TB"): 4, ("train", "Normal"): 4})
    m = load_source(str(pair))
    assert m.info["classes"] == ["NORMAL", "TB"] and set(zip(m.df["class_name"], m.df["label"])) == {
        ("NORMAL", 0),
        ("TB", 1),
    }


def test_a_nested_copy_inside_a_split_is_no_class(kaggle_dir):
    write_kaggle_tree(kaggle_dir / "train" / "chest_xray")  # train/chest_xray/<split>/<CLASS>/...
    m = load_source(str(kaggle_dir))
    assert m.info["classes"] == list(CLASSES)
    assert set(m.skipped["reason"]) == {"nested duplicate copy of the data set (only the outermost tree is used)"}


# ---------------------------------------------------------------- subtype labels


def kaggle_with_subtypes(root):
    files = {k: list(v) for k, v in KAGGLE_FILES.items()}
    files[("train", "PNEUMONIA")].append("pneumonia_0001.jpeg")  # no subtype in its name
    return write_kaggle_tree(root, files)


def test_subtype_labels_from_the_kaggle_file_names(tmp_path):
    root = kaggle_with_subtypes(tmp_path / "chest_xray")
    m = load_source(str(root), labels="subtype")
    assert m.info["classes"] == list(SUBTYPE_CLASSES) and m.info["labels"] == "subtype"
    df = m.df.set_index("uid")
    for (split, cls), names in KAGGLE_FILES.items():
        for name in names:
            want = "NORMAL" if cls == "NORMAL" else ("BACTERIA" if "_bacteria_" in name else "VIRUS")
            assert df.loc[f"{split}/{cls}/{name}", "class_name"] == want, name
            assert df.loc[f"{split}/{cls}/{name}", "label"] == SUBTYPE_CLASSES.index(want)
    assert m.skipped.to_dict(orient="records") == [
        {"path": "train/PNEUMONIA/pneumonia_0001.jpeg", "reason": NO_SUBTYPE}
    ]
    assert m.info["counts"]["train"] == {"NORMAL": 8, "BACTERIA": 8, "VIRUS": 4, "total": 20}
    # the same files, patients and bytes as the folder labels give, less the one skipped
    folder = load_source(str(root)).df
    folder = folder[folder["uid"] != "train/PNEUMONIA/pneumonia_0001.jpeg"].reset_index(drop=True)
    cols = ["uid", "location", "orig_split", "patient", "sha1"]
    pd.testing.assert_frame_equal(m.df[cols], folder[cols])


@pytest.mark.slow  # scans and hashes the 5,232 real images
@pytest.mark.realdata
def test_subtype_counts_of_the_real_images(real_data):
    m = load_source(str(real_data), labels="subtype")
    assert m.skipped.empty and m.info["classes"] == list(SUBTYPE_CLASSES)
    assert m.info["counts"]["train"] == {"NORMAL": 1341, "BACTERIA": 2530, "VIRUS": 1345, "total": 5216}
    assert m.info["counts"]["val"] == {"NORMAL": 8, "BACTERIA": 8, "VIRUS": 0, "total": 16}
    assert (m.df["class_name"] == "BACTERIA").sum() == 2538  # train and val, as the file names count them
    df, info = assign_splits(m.df, seed=0)
    assert info["warnings"] == [] and (df.groupby("patient")["split"].nunique() == 1).all()
    for split in ("val", "test"):  # each subtype gets its tenth of train
        for c, n in {"NORMAL": 1341, "BACTERIA": 2530, "VIRUS": 1345}.items():
            assert abs(info["counts"][split][c] - 0.1 * n) <= 10, (split, c)  # whole patients: a few images off


# ---------------------------------------------------------------- other sources


_SYNTHETIC_DIGEST = """
import hashlib
from xray_ray.data.sources import load_source
df = load_source("synthetic:200", seed=0).df
print(hashlib.sha1("".join(df["sha1"] + df["class_name"] + df["patient"]).encode(), usedforsecurity=False).hexdigest())
"""


def test_synthetic_k_classes_and_the_binary_default_unchanged():
    binary = load_source("synthetic:200", seed=0)
    pd.testing.assert_frame_equal(binary.df, load_source("synthetic:200:2", seed=0).df)
    assert binary.info["classes"] == list(CLASSES)
    # pinned with numpy's AVX-512 kernels off (conftest.PORTABLE_NUMPY; a few pixels differ with them on, and
    # with them each image's sha1): main before issue 21
    assert portable_output(_SYNTHETIC_DIGEST) == "fa715af39a9695bd1131ff81a9c6c1a728a8abbd"
    assert binary.df["class_name"].tolist() == [CLASSES[k] for k in binary.df["label"]]
    m = load_source("synthetic:240:4", seed=1)
    assert m.info["classes"] == list(PHANTOM_CLASSES[:4])
    counts = m.info["counts"]["train"]
    assert counts["total"] == 240 and min(counts[c] for c in PHANTOM_CLASSES[:4]) >= 45
    assert (m.df.groupby("patient")["label"].nunique() == 1).all()
    row = m.df[m.df["label"] == 3].iloc[0].to_dict()
    native = render(1, int(row["index"]), 3)
    assert row["sha1"] == hashlib.sha1(native.tobytes(), usedforsecurity=False).hexdigest()
    assert synthetic_spec("") == (1200, 2) and synthetic_spec(":3") == (1200, 3) and synthetic_spec("50:5") == (50, 5)


def test_npz_with_k_classes(tmp_path):
    path = write_npz(tmp_path / "k.npz")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    for split in ("train", "val", "test"):
        n = len(arrays[f"{split}_labels"])
        arrays[f"{split}_labels"] = (np.arange(n) % 3).astype(np.uint8)[:, None]
    np.savez(tmp_path / "three.npz", **arrays)
    m = load_source(str(tmp_path / "three.npz"))
    assert m.info["classes"] == ["CLASS0", "CLASS1", "CLASS2"]
    assert m.info["counts"]["train"] == {"CLASS0": 14, "CLASS1": 13, "CLASS2": 13, "total": 40}
    np.savez(tmp_path / "named.npz", classes=np.array(["normal", "covid", "other"]), **arrays)
    m = load_source(str(tmp_path / "named.npz"))
    assert m.info["classes"] == ["NORMAL", "COVID", "OTHER"]
    assert set(zip(m.df["label"], m.df["class_name"])) == {(0, "NORMAL"), (1, "COVID"), (2, "OTHER")}
    arrays["val_labels"][0] = 3  # a class train does not have
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=r"val_labels must hold the labels 0..2 of the classes CLASS0"):
        load_source(str(tmp_path / "bad.npz"))


# ---------------------------------------------------------------- bad input: one sentence each


def make(root, files: dict[str, bytes]):
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def png(i: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(render(2, i, 0, size=32)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "files, match",
    [
        (
            {"train/COVID/a.png": png(0), "test/COVID/b.png": png(1)},
            r"one class only \(COVID\); .*at least two classes",
        ),
        (
            {"train/NORMAL/a.png": png(0), "test/NORMAL/b.png": png(1)},
            r"train/ has no PNEUMONIA images; a classifier needs at least two classes to train on, and train/ has "
            "NORMAL only",
        ),
        (
            {"train/NORMAL/a.png": png(0), "train/TB/b.png": png(1), "train/COVID/notes.txt": b"x"},
            r"class folder train/COVID/ has no usable image \(1 file skipped, e.g. notes.txt: not an image file",
        ),
        (
            {"train/NORMAL/a.png": png(0), "train/TB/b.png": png(1), "train/COVID/c.png": b"", "test/covid/d.png": b""},
            r"class folders test/covid/ and train/COVID/ have no usable image \(2 files skipped",
        ),
        (
            {"train/NORMAL/a.png": png(0), "train/TB/b.png": png(1), "val/COVID/c.png": png(2)},
            r"train/ has no COVID images, though val/ has some",
        ),
    ],
    ids=["one class", "binary, one class in train", "folder of junk", "broken everywhere", "class train lacks"],
)
def test_bad_class_folders_raise_one_sentence(tmp_path, files, match):
    root = make(tmp_path / "data", files)
    with pytest.raises(DataError, match=match) as err:
        load_source(str(root))
    one_sentence(err)


def test_an_empty_class_folder_is_named(tmp_path):
    root = make(tmp_path / "data", {"train/NORMAL/a.png": png(0), "train/TB/b.png": png(1)})
    (root / "train" / "COVID").mkdir()
    with pytest.raises(DataError, match=r"class folder train/COVID/ has no usable image \(it is empty\)") as err:
        load_source(str(root))
    one_sentence(err)


def test_subtype_bad_inputs_raise_one_sentence(tmp_path, pneumonia_npz):
    no_subtype = make(tmp_path / "plain", {"train/NORMAL/a.png": png(0), "train/PNEUMONIA/b.png": png(1)})
    cases = [
        (str(no_subtype), r"found no bacteria/virus subtype in the names of the 1 PNEUMONIA images \(e.g. b.png\)"),
        ("synthetic:100", r"--labels subtype reads the pneumonia subtype from a Kaggle-layout folder"),
        (str(pneumonia_npz), r"so .*pneumoniamnist.npz cannot use it"),
    ]
    other = make(tmp_path / "other", {"train/NORMAL/a.png": png(0), "train/COVID/b.png": png(1)})
    cases.append((str(other), r"but this folder has the class folder\(s\) COVID"))
    for spec, match in cases:
        with pytest.raises(DataError, match=match) as err:
            load_source(spec, labels="subtype")
        one_sentence(err)
    with pytest.raises(DataError, match="labels must be one of folder, subtype"):
        load_source("synthetic", labels="species")


@pytest.mark.parametrize("spec", ["synthetic:100:1", "synthetic:100:7", "synthetic:100:x", "synthetic:5:3"])
def test_bad_synthetic_class_counts(spec):
    with pytest.raises(DataError, match="N >= 20" if spec.endswith(":3") else "K from 2 to 6") as err:
        load_source(spec)
    one_sentence(err)
