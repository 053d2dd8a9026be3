"""Shared fixtures: small data sets generated into tmp_path, and the real images when they are present."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray_ray.images import resize_gray
from xray_ray.phantoms import render

REAL_DATA = Path(os.environ.get("XRAY_RAY_REAL_DATA")
                 or Path(__file__).resolve().parents[2] / "shared/data/chest_xray")

# (split, class) -> file names; patients never cross splits, some own two images
KAGGLE_FILES = {
    ("train", "NORMAL"): ["IM-0001-0001.jpeg", "IM-0001-0002.jpeg", "IM-0002-0001.jpeg", "IM-0003-0001.jpeg",
                          "IM-0004-0001.jpeg", "NORMAL2-IM-0001-0001.jpeg", "NORMAL2-IM-0002-0001.jpeg",
                          "NORMAL2-IM-0002-0002.jpeg"],
    ("train", "PNEUMONIA"): ["person1_bacteria_1.jpeg", "person1_bacteria_2.jpeg", "person2_virus_3.jpeg",
                             "person3_bacteria_4.jpeg", "person4_virus_5.jpeg", "person5_bacteria_6.jpeg",
                             "person5_bacteria_7.jpeg", "person6_virus_8.jpeg", "person7_bacteria_9.jpeg",
                             "person8_bacteria_10.jpeg", "person9_virus_11.jpeg", "person10_bacteria_12.jpeg"],
    ("val", "NORMAL"): ["NORMAL2-IM-0100-0001.jpeg", "NORMAL2-IM-0101-0001.jpeg"],
    ("val", "PNEUMONIA"): ["person100_bacteria_100.jpeg", "person101_virus_101.jpeg"],
    ("test", "NORMAL"): ["IM-0200-0001.jpeg", "IM-0201-0001.jpeg", "IM-0202-0001.jpeg"],
    ("test", "PNEUMONIA"): ["person200_bacteria_200.jpeg", "person201_bacteria_201.jpeg",
                            "person202_virus_202.jpeg"],
}


def write_kaggle_tree(root: Path, files: dict[tuple[str, str], list[str]] = KAGGLE_FILES, *, size: int = 48,
                      seed: int = 0) -> Path:
    """Write phantom JPEGs as <root>/<split>/<CLASS>/<name>; every file has distinct pixels."""
    i = 0
    for (split, cls), names in files.items():
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            img = render(seed, i, int(cls.upper() == "PNEUMONIA"), size=size)
            Image.fromarray(img).save(folder / name, quality=90)
            i += 1
    return root


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb without building the pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def kaggle_file_count(files: dict[tuple[str, str], list[str]] = KAGGLE_FILES) -> int:
    return sum(len(v) for v in files.values())


@pytest.fixture
def kaggle_dir(tmp_path: Path) -> Path:
    """A small clean Kaggle-layout folder (named chest_xray) with Kermany-style patient names."""
    return write_kaggle_tree(tmp_path / "chest_xray")


@pytest.fixture
def make_kaggle_tree():
    """The writer behind kaggle_dir, for tests that need their own layout: f(root, files=..., size=...)."""
    return write_kaggle_tree


def write_npz(path: Path, *, size: int = 28, counts: dict[str, int] | None = None, flat_labels: bool = False,
              seed: int = 0) -> Path:
    """A PneumoniaMNIST-style archive of phantoms; labels [N, 1] like the real one unless flat_labels."""
    counts = counts or {"train": 40, "val": 12, "test": 12}
    rng = np.random.default_rng(seed)
    arrays, i = {}, 0
    for split, n in counts.items():
        labels = rng.permutation(np.arange(n) % 4 != 0).astype(np.uint8)  # 75% PNEUMONIA, both classes
        arrays[f"{split}_images"] = np.stack([resize_gray(render(seed, i + k, int(y)), size)
                                              for k, y in enumerate(labels)])
        arrays[f"{split}_labels"] = labels if flat_labels else labels[:, None]
        i += n
    np.savez_compressed(path, **arrays)
    return path


@pytest.fixture
def pneumonia_npz(tmp_path: Path) -> Path:
    """A small PneumoniaMNIST-layout .npz (28 px; 40 train, 12 val, 12 test)."""
    return write_npz(tmp_path / "pneumoniamnist.npz")


@pytest.fixture
def real_data() -> Path:
    """The real Kaggle images beside the checkout (../shared/data/chest_xray or $XRAY_RAY_REAL_DATA)."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    return REAL_DATA


ROOT = Path(__file__).resolve().parents[1]


def run_module(module: str, *args: str, code: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` (or ``python -c code args``) in a fresh interpreter, never via a shell."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
