"""Sources: Kaggle folders (clean and messy, local, file:// and s3://), PneumoniaMNIST npz, synthetic."""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import KAGGLE_FILES, kaggle_file_count, png_with_size, write_npz
from xray_ray.data.images import load_gray, resize_gray
from xray_ray.data.phantoms import render
from xray_ray.data.sources import COLUMNS, load_source, read_pixels
from xray_ray.errors import DataError


def save(path: Path, im: Image.Image, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)


def phantom(i: int, label: int = 1, size: int = 48) -> Image.Image:
    return Image.fromarray(render(9, i, label, size=size))


# ---------------------------------------------------------------- clean folders


def test_clean_folder_manifest(kaggle_dir):
    m = load_source(str(kaggle_dir))
    df = m.df
    assert tuple(df.columns) == COLUMNS
    assert len(df) == kaggle_file_count() and m.skipped.empty
    assert df["uid"].is_unique
    for col in ("index", "label", "width", "height"):
        assert df[col].dtype == np.int64
    row = df.set_index("uid").loc["train/NORMAL/IM-0001-0002.jpeg"]
    assert (row["label"], row["class_name"], row["orig_split"], row["patient"]) == (0, "NORMAL", "train", "IM-0001")
    assert row["index"] == -1 and (row["width"], row["height"]) == (48, 48)
    assert row["sha1"] == hashlib.sha1(Path(row["location"]).read_bytes(), usedforsecurity=False).hexdigest()
    assert df.set_index("uid").loc["val/NORMAL/NORMAL2-IM-0100-0001.jpeg", "patient"] == "NORMAL2-IM-0100"
    counts = m.info["counts"]
    assert counts["train"] == {"NORMAL": 8, "PNEUMONIA": 12, "total": 20}
    assert counts["test"]["total"] == 6 and counts["val"]["total"] == 4
    assert m.info["source"] == "folder" and m.info["warnings"] == []


def test_parent_of_chest_xray_and_file_uri_give_the_same_manifest(kaggle_dir):
    direct = load_source(str(kaggle_dir)).df
    parent = load_source(str(kaggle_dir.parent)).df
    uri = load_source(kaggle_dir.as_uri()).df
    pd.testing.assert_frame_equal(direct, parent)
    pd.testing.assert_frame_equal(direct[["uid", "sha1"]], uri[["uid", "sha1"]])


def test_read_pixels_for_a_folder_row(kaggle_dir):
    row = load_source(str(kaggle_dir)).df.iloc[3].to_dict()
    out = read_pixels(row, 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, load_gray(Path(row["location"]).read_bytes(), 32))


def test_class_folders_match_case_insensitively(make_kaggle_tree, tmp_path):
    root = make_kaggle_tree(
        tmp_path / "d", {("train", "normal"): ["IM-0001-0001.jpeg"], ("train", "Pneumonia"): ["person1_virus_1.jpeg"]}
    )
    df = load_source(str(root)).df
    assert dict(zip(df["uid"], df["class_name"])) == {
        "train/normal/IM-0001-0001.jpeg": "NORMAL",
        "train/Pneumonia/person1_virus_1.jpeg": "PNEUMONIA",
    }


# ---------------------------------------------------------------- the real world's mess


@pytest.fixture
def messy(tmp_path, make_kaggle_tree) -> tuple[Path, dict[str, str]]:
    """A Kaggle download with every kind of junk; returns (root, {root-relative path: expected})."""
    root = tmp_path / "download"
    data = make_kaggle_tree(root / "chest_xray")
    expect = {f"chest_xray/{s}/{c}/{n}": "used" for (s, c), names in KAGGLE_FILES.items() for n in names}
    make_kaggle_tree(data / "chest_xray")  # the zip's nested second copy: byte-identical
    for (s, c), names in KAGGLE_FILES.items():
        for n in names:
            expect[f"chest_xray/chest_xray/{s}/{c}/{n}"] = "nested duplicate copy"

    def junk(rel: str, data_bytes: bytes, reason: str) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data_bytes)
        expect[rel] = reason

    junk("__MACOSX/chest_xray/train/NORMAL/._IM-0001-0001.jpeg", b"\0\5\26\7" + b"\0" * 60, "__MACOSX")
    junk("chest_xray/train/NORMAL/._IM-0001-0001.jpeg", b"\0\5\26\7" + b"\0" * 60, "AppleDouble")
    junk(".DS_Store", b"\0\0\0\1Bud1", ".DS_Store")
    junk("chest_xray/train/.DS_Store", b"\0\0\0\1Bud1", ".DS_Store")
    junk("chest_xray/README.txt", b"hello", "not an image file")
    ckpt = io.BytesIO()
    phantom(0).save(ckpt, "JPEG")
    junk("chest_xray/train/NORMAL/.ipynb_checkpoints/IM-0001-0001-checkpoint.jpeg", ckpt.getvalue(), "Jupyter")

    # one picture in every encoding: all must decode to (nearly) the same pixels
    pn = data / "train" / "PNEUMONIA"
    gray = np.asarray(phantom(20))
    opaque = np.full_like(gray, 255)
    save(pn / "person20_bacteria_1.png", Image.fromarray(gray), "PNG")
    save(pn / "person21_bacteria_1.JPEG", Image.fromarray(gray), "JPEG", quality=95)
    save(pn / "person22_bacteria_1.png", Image.fromarray(gray.astype(np.uint16) * 257), "PNG")
    save(pn / "person23_virus_1.jpeg", Image.fromarray(gray).convert("CMYK"), "JPEG", quality=95)
    save(pn / "person24_virus_1.png", Image.fromarray(np.dstack([gray] * 3 + [opaque])), "PNG")
    save(pn / "person25_virus_1.png", Image.fromarray(np.dstack([gray, opaque])), "PNG")
    save(pn / "person26_virus_1.png", Image.fromarray(gray).convert("P"), "PNG")
    wide = Image.fromarray(render(9, 27, 1, size=48)[:24])  # stored 48 wide, 24 tall
    exif = wide.getexif()
    exif[0x0112] = 6
    save(pn / "person27_bacteria_1.jpeg", wide, "JPEG", exif=exif)
    make_kaggle_tree(root / "chest_xray", {("test", "normal"): ["IM-0300-0001.jpeg"]}, seed=5)
    for name in (
        "person20_bacteria_1.png",
        "person21_bacteria_1.JPEG",
        "person22_bacteria_1.png",
        "person23_virus_1.jpeg",
        "person24_virus_1.png",
        "person25_virus_1.png",
        "person26_virus_1.png",
        "person27_bacteria_1.jpeg",
    ):
        expect[f"chest_xray/train/PNEUMONIA/{name}"] = "used"
    expect["chest_xray/test/normal/IM-0300-0001.jpeg"] = "used"

    good = (pn / "person21_bacteria_1.JPEG").read_bytes()
    junk("chest_xray/train/PNEUMONIA/person30_bacteria_1.jpeg", b"", "empty")
    junk("chest_xray/train/PNEUMONIA/person31_bacteria_1.jpeg", good[: len(good) // 2], "truncated")
    junk(
        "chest_xray/train/PNEUMONIA/person32_bacteria_1.jpeg",
        np.random.default_rng(0).bytes(3000),
        "not a readable image",
    )
    junk("chest_xray/train/PNEUMONIA/person33_bacteria_1.png", png_with_size(100_000, 100_000), "too large")

    normal = data / "train" / "NORMAL"
    (tmp_path / "outside.jpeg").write_bytes(good)
    links = {
        "loop.jpeg": ("loop.jpeg", "symlink loop"),
        "parent_link": ("..", "symlink loop"),
        "outside.jpeg": (str(tmp_path / "outside.jpeg"), "outside the data folder"),
        "dangling.jpeg": ("nothing-here.jpeg", "broken symlink"),
        "inside.jpeg": ("IM-0001-0001.jpeg", "counts under its own path"),
    }
    for name, (target, reason) in links.items():
        os.symlink(target, normal / name)
        expect[f"chest_xray/train/NORMAL/{name}"] = reason
    return root, expect


def all_entries(root: Path) -> set[str]:
    """Every file, and every link, under root (links not followed)."""
    out = set()
    for folder, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            out.add(Path(os.path.relpath(os.path.join(folder, name), root)).as_posix())
    return out


def test_messy_download_every_file_used_or_skipped_with_its_reason(messy):
    root, expect = messy
    m = load_source(str(root))
    used = {f"chest_xray/{u}" for u in m.df["uid"]}
    skipped = dict(zip(m.skipped["path"], m.skipped["reason"]))
    assert not used & set(skipped)
    assert used | set(skipped) == all_entries(root) == set(expect)
    assert m.info["files_seen"] == len(expect) and m.info["data_root"] == "chest_xray"
    for path, want in expect.items():
        if want == "used":
            assert path in used, path
        else:
            assert want in skipped.get(path, ""), (path, skipped.get(path))
    assert m.df["uid"].is_unique


def test_messy_download_decodes_every_kind_the_same_way(messy):
    root, _ = messy
    df = load_source(str(root)).df.set_index("uid")
    rotated = df.loc["train/PNEUMONIA/person27_bacteria_1.jpeg"]
    assert (rotated["width"], rotated["height"]) == (24, 48)  # EXIF orientation applied
    ref = read_pixels(df.loc["train/PNEUMONIA/person20_bacteria_1.png"].to_dict(), 32)
    for name in (
        "person22_bacteria_1.png",
        "person24_virus_1.png",
        "person25_virus_1.png",
        "person26_virus_1.png",
    ):  # 16-bit, RGBA, LA, palette: the same pixels exactly
        np.testing.assert_array_equal(read_pixels(df.loc[f"train/PNEUMONIA/{name}"].to_dict(), 32), ref)
    for name in ("person21_bacteria_1.JPEG", "person23_virus_1.jpeg"):  # lossy: nearly the same
        out = read_pixels(df.loc[f"train/PNEUMONIA/{name}"].to_dict(), 32).astype(int)
        assert np.abs(out - ref).mean() < 4
    assert df.loc["test/normal/IM-0300-0001.jpeg", "class_name"] == "NORMAL"


def test_nested_copy_is_counted_once(messy):
    root, _ = messy
    df = load_source(str(root)).df
    assert not df["uid"].str.startswith("chest_xray/").any()
    assert df["sha1"].is_unique  # the nested copy's identical bytes were not counted a second time


# ---------------------------------------------------------------- structural problems


def make(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def jpeg(i: int = 0) -> bytes:
    buf = io.BytesIO()
    phantom(i).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "files, match",
    [
        ({"NORMAL/IM-0001-0001.jpeg": jpeg()}, r"no train/, val/ or test/ folder"),
        ({"train/NORMAL/.DS_Store": b"x", "train/PNEUMONIA/notes.txt": b"x"}, "no usable images"),
        ({"train/NORMAL/a.jpeg": b"", "train/PNEUMONIA/b.jpeg": b"garbage"}, r"no usable images .*2 files skipped"),
        ({"train/NORMAL/IM-0001-0001.jpeg": jpeg()}, "train/ has no PNEUMONIA images"),
        (  # any folder is a class now (issue 21), so a third one with nothing usable is named, and why
            {"train/NORMAL/a.jpeg": jpeg(0), "train/PNEUMONIA/b.jpeg": jpeg(1), "train/COVID/c.jpeg": b""},
            r"class folder train/COVID/ has no usable image \(1 file skipped, e.g. c.jpeg: empty file",
        ),
    ],
)
def test_structural_problems_raise_one_clear_sentence(tmp_path, files, match):
    root = make(tmp_path / "data", files)
    with pytest.raises(DataError, match=match) as err:
        load_source(str(root))
    assert "\n" not in str(err.value)


def test_linked_split_and_class_folders_are_followed(make_kaggle_tree, tmp_path):
    """A shared machine's layout: the data folder's train/ and one class folder are links to the real ones."""
    real = make_kaggle_tree(tmp_path / "kaggle")
    data = tmp_path / "mine" / "chest_xray"
    (data / "test").mkdir(parents=True)
    os.symlink(real / "train", data / "train")  # a split folder
    os.symlink(real / "test" / "NORMAL", data / "test" / "NORMAL")  # a class folder
    os.symlink(real / "test" / "PNEUMONIA", data / "test" / "PNEUMONIA")
    os.symlink(real / "train" / "NORMAL" / "IM-0001-0001.jpeg", real / "train" / "NORMAL" / "IM-0009-0001.jpeg")
    m = load_source(str(data))
    direct = load_source(str(real))
    assert sorted(m.df["uid"]) == sorted(u for u in direct.df["uid"] if not u.startswith("val/"))
    assert m.df.set_index("uid")["sha1"].to_dict().items() <= direct.df.set_index("uid")["sha1"].to_dict().items()
    # a link inside the image tree is still skipped with its reason, never followed
    skipped = dict(zip(m.skipped["path"], m.skipped["reason"]))
    assert skipped["train/NORMAL/IM-0009-0001.jpeg"] == "symlink pointing outside the data folder"


def test_a_layout_link_that_cannot_be_followed_is_named_in_the_error(tmp_path):
    data = tmp_path / "chest_xray"
    data.mkdir()
    os.symlink(tmp_path / "nowhere", data / "train")
    os.symlink(data, data / "val")  # a loop
    with pytest.raises(DataError) as e:
        load_source(str(data))
    msg = str(e.value)
    assert "links skipped: " in msg and "train (broken symlink" in msg and "val (symlink loop" in msg
    assert len(msg.splitlines()) == 1


def test_missing_folder_and_plain_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_source(str(tmp_path / "nope"))
    (tmp_path / "file.jpeg").write_bytes(jpeg())
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_source(str(tmp_path / "file.jpeg"))


def test_empty_split_folder_and_one_class_test_only_warn(tmp_path):
    root = make(
        tmp_path / "data",
        {
            "train/NORMAL/a.jpeg": jpeg(0),
            "train/PNEUMONIA/b.jpeg": jpeg(1),
            "val/NORMAL/.DS_Store": b"x",
            "test/PNEUMONIA/c.jpeg": jpeg(2),
        },
    )
    m = load_source(str(root))
    assert len(m.df) == 3
    assert any("val/ has no usable images" in w for w in m.info["warnings"])
    assert any("test/ has no NORMAL images" in w for w in m.info["warnings"])


def test_a_test_only_folder_loads_for_evaluation(tmp_path):
    root = make(tmp_path / "data", {"test/NORMAL/a.jpeg": jpeg(0), "test/PNEUMONIA/b.jpeg": jpeg(1)})
    assert set(load_source(str(root)).df["orig_split"]) == {"test"}


# ---------------------------------------------------------------- s3 (moto server, no network)


@pytest.fixture
def s3_uri(kaggle_dir, monkeypatch):
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    query = f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    fs = pafs.S3FileSystem(
        endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1", allow_bucket_creation=True
    )
    fs.create_dir("bucket")
    for path in kaggle_dir.rglob("*.jpeg"):
        with fs.open_output_stream(f"bucket/kaggle/{path.relative_to(kaggle_dir.parent).as_posix()}") as f:
            f.write(path.read_bytes())
    yield f"s3://bucket/kaggle?{query}"
    server.stop()


def test_s3_folder_matches_the_local_one(s3_uri, kaggle_dir):
    remote = load_source(s3_uri)
    local = load_source(str(kaggle_dir)).df
    pd.testing.assert_frame_equal(remote.df.drop(columns="location"), local.drop(columns="location"))
    row = remote.df.iloc[0]
    assert row["location"].startswith("s3://bucket/kaggle/chest_xray/")
    np.testing.assert_array_equal(read_pixels(row.to_dict(), 24), read_pixels(local.iloc[0].to_dict(), 24))


# ---------------------------------------------------------------- npz


def test_npz_manifest_and_pixels(pneumonia_npz):
    m = load_source(str(pneumonia_npz))
    df = m.df
    assert tuple(df.columns) == COLUMNS and m.skipped.empty
    assert m.info["counts"]["train"]["total"] == 40 and m.info["image_size"] == 28
    assert df["uid"].iloc[0] == "test/000000" and "train/000039" in set(df["uid"])
    with np.load(pneumonia_npz) as z:
        row = df.set_index("uid").loc["val/000005"]
        assert row["label"] == z["val_labels"][5, 0] and row["index"] == 5
        assert row["sha1"] == hashlib.sha1(z["val_images"][5].tobytes(), usedforsecurity=False).hexdigest()
        out = read_pixels(row.to_dict(), 64)
        np.testing.assert_array_equal(out, resize_gray(z["val_images"][5], 64))
    assert (df["width"] == 28).all() and df["patient"].equals(df["uid"])


def test_npz_with_flat_labels(tmp_path):
    path = write_npz(tmp_path / "flat.npz", flat_labels=True)
    assert load_source(str(path)).df["label"].isin([0, 1]).all()


@pytest.mark.parametrize("drop, key", [("test_labels", "test_labels"), ("train_images", "train_images")])
def test_npz_missing_key_is_named(tmp_path, pneumonia_npz, drop, key):
    with np.load(pneumonia_npz) as z:
        arrays = {k: z[k] for k in z.files if k != drop}
    np.savez(tmp_path / "broken.npz", **arrays)
    with pytest.raises(DataError, match=key):
        load_source(str(tmp_path / "broken.npz"))


def test_npz_pickles_are_never_loaded(tmp_path, pneumonia_npz):
    with np.load(pneumonia_npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["train_labels"] = np.array([object()] * 40, dtype=object)
    np.savez(tmp_path / "pickled.npz", **arrays)
    with pytest.raises(DataError, match="pickled"):
        load_source(str(tmp_path / "pickled.npz"))


def test_npz_bad_labels_and_not_a_zip(tmp_path, pneumonia_npz):
    with np.load(pneumonia_npz) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["val_labels"] = arrays["val_labels"] + 2
    np.savez(tmp_path / "labels.npz", **arrays)
    with pytest.raises(DataError, match="0 \\(NORMAL\\) or 1"):
        load_source(str(tmp_path / "labels.npz"))
    (tmp_path / "fake.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_source(str(tmp_path / "fake.npz"))
    with pytest.raises(DataError, match="does not exist"):
        load_source(str(tmp_path / "absent.npz"))


def test_medmnist_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("XRAY_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "medmnist", None)  # import fails even where it is installed
    with pytest.raises(DataError, match="pip install medmnist"):
        load_source("medmnist:64")
    with pytest.raises(DataError, match="28, 64, 128, 224"):
        load_source("medmnist:100")


def test_medmnist_uses_the_cached_download(tmp_path, monkeypatch):
    monkeypatch.setenv("XRAY_RAY_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "medmnist", None)  # proves no download was attempted
    write_npz(tmp_path / "pneumoniamnist.npz")
    m = load_source("medmnist")
    assert m.info["source"] == "npz" and len(m.df) == 64


# ---------------------------------------------------------------- synthetic


def test_synthetic_default_set():
    m = load_source("synthetic", seed=0)
    df = m.df
    assert len(df) == 1200 and tuple(df.columns) == COLUMNS
    assert set(df["orig_split"]) == {"train"}
    assert abs(df["label"].mean() - 0.74) < 0.03
    per_patient = df.groupby("patient").size()
    assert per_patient.max() == 3 and (per_patient >= 2).sum() > 100  # grouping matters
    assert all(re.fullmatch(r"synth-p\d{4}", p) for p in df["patient"])
    assert (df.groupby("patient")["label"].nunique() == 1).all()
    assert df["uid"].iloc[42] == "synthetic/000042" and df["index"].iloc[42] == 42


def test_synthetic_is_deterministic_per_seed_and_pixels_match_the_hash():
    a, b, c = (load_source("synthetic:60", seed=s).df for s in (3, 3, 4))
    pd.testing.assert_frame_equal(a, b)
    assert not a["sha1"].equals(c["sha1"])
    row = a.iloc[7].to_dict()
    native = render(3, 7, row["label"])
    assert row["sha1"] == hashlib.sha1(native.tobytes(), usedforsecurity=False).hexdigest()
    np.testing.assert_array_equal(read_pixels(row, 64), resize_gray(native, 64))


@pytest.mark.parametrize("spec", ["synthetic:abc", "synthetic:5", ""])
def test_bad_synthetic_specs(spec):
    with pytest.raises(DataError):
        load_source(spec)
