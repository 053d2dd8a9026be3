"""Shared fixtures: small data sets generated into tmp_path, and the real images when they are present."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
import yaml
from browser import BROWSERS, Chromium, find_browser
from PIL import Image

from xray_ray.data.images import resize_gray
from xray_ray.data.phantoms import render

REAL_DATA = Path(os.environ.get("XRAY_RAY_REAL_DATA") or Path(__file__).resolve().parents[2] / "shared/data/chest_xray")

# (split, class) -> file names; patients never cross splits, some own two images
KAGGLE_FILES = {
    ("train", "NORMAL"): [
        "IM-0001-0001.jpeg",
        "IM-0001-0002.jpeg",
        "IM-0002-0001.jpeg",
        "IM-0003-0001.jpeg",
        "IM-0004-0001.jpeg",
        "NORMAL2-IM-0001-0001.jpeg",
        "NORMAL2-IM-0002-0001.jpeg",
        "NORMAL2-IM-0002-0002.jpeg",
    ],
    ("train", "PNEUMONIA"): [
        "person1_bacteria_1.jpeg",
        "person1_bacteria_2.jpeg",
        "person2_virus_3.jpeg",
        "person3_bacteria_4.jpeg",
        "person4_virus_5.jpeg",
        "person5_bacteria_6.jpeg",
        "person5_bacteria_7.jpeg",
        "person6_virus_8.jpeg",
        "person7_bacteria_9.jpeg",
        "person8_bacteria_10.jpeg",
        "person9_virus_11.jpeg",
        "person10_bacteria_12.jpeg",
    ],
    ("val", "NORMAL"): ["NORMAL2-IM-0100-0001.jpeg", "NORMAL2-IM-0101-0001.jpeg"],
    ("val", "PNEUMONIA"): ["person100_bacteria_100.jpeg", "person101_virus_101.jpeg"],
    ("test", "NORMAL"): ["IM-0200-0001.jpeg", "IM-0201-0001.jpeg", "IM-0202-0001.jpeg"],
    ("test", "PNEUMONIA"): ["person200_bacteria_200.jpeg", "person201_bacteria_201.jpeg", "person202_virus_202.jpeg"],
}


# the smallest search the end-to-end tests run: one 4-channel conv block at 32 px, two trials, FIFO
TINY_SPACE = {
    "name": "tiny",
    "space": {
        "image_size": 32,
        "epochs": 3,
        "blocks": 1,
        "double_conv": False,
        "width": 4,
        "head": "gap",
        "fc": [8],
        "lr": 1.0e-3,
        "batch_size": 64,
        "zoom": {"type": "float", "low": 0.0, "high": 0.2},
    },
    "searcher": {"algorithm": "random", "num_samples": 2, "max_concurrent": 1, "seed": 0},
    "scheduler": {"algorithm": "fifo"},
    "data": {"val_fraction": 0.2, "test_fraction": 0.2},
}


def tiny_space_file(
    tmp: Path, *, name: str = "tiny", space: dict | None = None, filename: str | None = None, **sections: dict
) -> Path:
    """TINY_SPACE named `name`, with `space` entries and whole sections (searcher=..., scheduler=...) changed,
    written to tmp/<filename> (default <name>.yaml)."""
    doc = json.loads(json.dumps(TINY_SPACE))
    doc["name"] = name
    doc["space"].update(space or {})
    for key, value in sections.items():
        doc[key] = dict(value) if key not in doc else {**doc[key], **value}
    path = tmp / (filename or f"{name}.yaml")
    path.write_text(yaml.safe_dump(doc))
    return path


def search_args(tmp: Path, space: Path, *extra: str, data: str = "synthetic:200") -> list[str]:
    """A small search's command line: results and pixel cache under `tmp`, a 2-CPU local Ray."""
    return [
        "--data",
        data,
        "--space",
        str(space),
        "--results",
        str(tmp / "results"),
        "--cache",
        str(tmp / "cache"),
        "--num-cpus",
        "2",
        *extra,
    ]


def search_process(args: list[str]) -> subprocess.Popen:
    """`python -u -m xray_ray.search ARGS` in its own process group (so a test can Ctrl-C it as a terminal
    does), stdout and stderr piped as text."""
    return subprocess.Popen(
        [sys.executable, "-u", "-m", "xray_ray.search", *args],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def write_kaggle_tree(
    root: Path, files: dict[tuple[str, str], list[str]] = KAGGLE_FILES, *, size: int = 48, seed: int = 0
) -> Path:
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
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def kaggle_file_count(files: dict[tuple[str, str], list[str]] = KAGGLE_FILES) -> int:
    return sum(len(v) for v in files.values())


def saved_trials(state: str | bytes) -> list[dict]:
    """Each trial as a Tune experiment state (the text of experiment_state-*.json) has it: status, folder, last
    reported iteration, and the checkpoint a restore would start from (None: none registered yet; Tune registers
    an epoch's checkpoint only when the trial's actor answers the save it asks for after the epoch's result, so
    a trial can have reported epoch 1 and have none). Raises ValueError for a state cut short (caught while Tune
    writes it). The names are read as `--resume` reads them (search.tuner.named_checkpoints)."""
    from xray_ray.search.tuner import named_checkpoints  # here: the module imports Ray and torch

    out = []
    for trial_json, meta_json in json.loads(state)["trial_data"]:
        trial, meta = json.loads(trial_json), json.loads(meta_json)
        last = meta.get("last_result") or {}
        named = named_checkpoints(meta)
        out.append(
            {
                "status": trial["status"],
                "dir": trial["relative_logdir"],
                "iteration": last.get("training_iteration", 0),
                "checkpoint": max(named) if named else None,
            }
        )
    return out


@pytest.fixture
def kaggle_dir(tmp_path: Path) -> Path:
    """A small clean Kaggle-layout folder (named chest_xray) with Kermany-style patient names."""
    return write_kaggle_tree(tmp_path / "chest_xray")


@pytest.fixture
def make_kaggle_tree():
    """The writer behind kaggle_dir, for tests that need their own layout: f(root, files=..., size=...)."""
    return write_kaggle_tree


def write_npz(
    path: Path, *, size: int = 28, counts: dict[str, int] | None = None, flat_labels: bool = False, seed: int = 0
) -> Path:
    """A PneumoniaMNIST-style archive of phantoms; labels [N, 1] like the real one unless flat_labels."""
    counts = counts or {"train": 40, "val": 12, "test": 12}
    rng = np.random.default_rng(seed)
    arrays, i = {}, 0
    for split, n in counts.items():
        labels = rng.permutation(np.arange(n) % 4 != 0).astype(np.uint8)  # 75% PNEUMONIA, both classes
        arrays[f"{split}_images"] = np.stack(
            [resize_gray(render(seed, i + k, int(y)), size) for k, y in enumerate(labels)]
        )
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


def run_module(
    module: str, *args: str, code: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python -m module args`` (or ``python -c code args``) in a fresh interpreter, never via a shell;
    `env`: variables set for it besides this process's own."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", module, *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


# numpy's AVX-512 kernels (Intel's SVML) round exp, sin, ... differently in the last bit from the C library's
# functions its other x86-64 paths call, so a few phantom pixels in a million differ by one grey level on a CPU
# with AVX-512 (3 of 1,310,720 on an AVX-512 AMD EPYC). Pixel digests pinned across machines are taken with
# those kernels off (names numpy does not know, or this CPU lacks, are ignored).
PORTABLE_NUMPY = {
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL "
    "AVX512_KNL AVX512_KNM"
}


def portable_output(code: str, *args: str) -> str:
    """The last line `code` prints, run in a fresh interpreter with numpy's AVX-512 kernels off."""
    proc = run_module("", *args, code=code, env=PORTABLE_NUMPY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


# ---------------------------------------------------------------- exported models, good and bad


def export_tiny_model(out: Path, size: int = 32) -> Path:
    """A tiny untrained CNN exported by winner.finalize into `out` (plumbing tests, not accuracy)."""
    import pandas as pd
    import torch

    from xray_ray.data.prepare import SplitArrays
    from xray_ray.model.cnn import build_model
    from xray_ray.ship.winner import finalize

    torch.manual_seed(0)
    labels = np.array([0, 1] * 8, np.int64)
    val = SplitArrays(
        np.stack([render(1, i, int(y), size=size) for i, y in enumerate(labels)]),
        labels,
        [f"v{i}" for i in range(16)],
        [f"p{i}" for i in range(16)],
    )
    finalize(
        out, build_model("tiny", image_size=size), {"val": val}, {"seed": 0}, pd.DataFrame(), pd.DataFrame(), n_boot=20
    )
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """One exported tiny model (32 px) for the whole session; copy it (model_copy) before changing it."""
    return export_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def model_copy(good: Path, dest: Path, *, card: dict | None = None, onnx_bytes: bytes | None = None) -> Path:
    """A copy of an exported model folder, with a replaced card and/or model.onnx."""
    import json
    import shutil

    shutil.copytree(good, dest)
    if card is not None:
        (dest / "model.json").write_text(json.dumps(card))  # json writes NaN as the token NaN
    if onnx_bytes is not None:
        (dest / "model.onnx").write_bytes(onnx_bytes)
    return dest


def onnx_graph(*, input_type: str = "float", size: int = 32, output_shape: str = "N", outputs: int = 1) -> bytes:
    """A small ONNX graph with the contract's names and a chosen input dtype, output shape and output count:
    the mean of the image, as [N] or as [N, 2] (the mean twice), Cast to float32."""
    from onnx import TensorProto, helper

    dtype = {"float": TensorProto.FLOAT, "double": TensorProto.DOUBLE}[input_type]
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Cast", ["m"], ["p"], to=TensorProto.FLOAT),
    ]
    if output_shape == "N":
        nodes.append(helper.make_node("Identity", ["p"], ["prob_pneumonia"]))
        out_shape: list = ["N"]
    else:
        nodes += [
            helper.make_node("Unsqueeze", ["p", "one"], ["p1"]),
            helper.make_node("Concat", ["p1", "p1"], ["prob_pneumonia"], axis=1),
        ]
        out_shape = ["N", 2]
    outs = [helper.make_tensor_value_info("prob_pneumonia", TensorProto.FLOAT, out_shape)]
    if outputs == 2:
        nodes.append(helper.make_node("Identity", ["p"], ["extra"]))
        outs.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["N"]))
    graph = helper.make_graph(
        nodes,
        "contract_test",
        [helper.make_tensor_value_info("image", dtype, ["N", 1, size, size])],
        outs,
        initializer=[] if output_shape == "N" else [helper.make_tensor("one", TensorProto.INT64, [1], [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def one_error_line(err: str) -> str:
    """The CLI contract for a user's mistake: exactly one line 'error: <sentence>' and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


_MEASURE = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
with open(sys.argv[1], "w") as f:
    f.write(f"{child.returncode} {usage.ru_maxrss}")
"""


def run_measured(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, int]:
    """Run ``python args`` (never via a shell); returns (the completed process, its peak RSS in bytes).

    The peak is the child's own (os.wait4 in a small wrapper process that starts it): a child forked from
    this test process directly would report this process's size as its peak, since ru_maxrss survives exec.
    A child still running after `timeout` is killed with its wrapper (return code -9).
    """
    import tempfile

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, *args]
    with tempfile.TemporaryDirectory() as scratch, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        report = Path(scratch) / "rusage"
        proc = subprocess.Popen(
            [sys.executable, "-c", _MEASURE, str(report), *cmd],
            stdout=out,
            stderr=err,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        rc, maxrss = map(int, report.read_text().split()) if report.exists() else (-9, 0)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(
            cmd, rc, out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace")
        )
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, kB on Linux
    return done, maxrss * scale


# ---------------------------------------------------------------- the longest files first

# Seconds each end-to-end file took in a fresh-clone `CI=true bash .ci/run` (its tests' durations summed by
# `pytest --durations=0`, two workers on a 2-core machine, at dcd1c34; only their order matters). `make test`
# runs files whole on two workers (--dist loadfile) in collection order (--no-loadscope-reorder): the longest
# first, so that no worker is left finishing a long file alone at the end while the other idles. Unlisted files
# weigh 0 and keep their order; tests keep their order within a file (module fixtures and test_search.py's
# first test rely on it). Only the order changes, never what runs.
FILE_SECONDS = {
    "search/test_cluster_run.py": 688,
    "search/test_faults.py": 333,
    "test_bench.py": 305,
    "search/test_search.py": 240,
    "serve/test_adapt.py": 141,
    "search/test_multiclass_search.py": 53,
    "studies/test_ablation.py": 34,
    "data/test_pipeline.py": 33,
    "test_results.py": 27,
}


def pytest_collection_modifyitems(items):
    tests = Path(__file__).resolve().parent

    def weight(item) -> int:
        path = item.path.resolve()
        return FILE_SECONDS.get(path.relative_to(tests).as_posix(), 0) if path.is_relative_to(tests) else 0

    items.sort(key=lambda item: -weight(item))  # stable: the order within a file and among equals is kept


# ---------------------------------------------------------------- one Ray per test module


@pytest.fixture(scope="module")
def module_ray():
    """One local Ray for a module's in-process searches and stability runs, started as a search starts its
    own: each uses the Ray its process already runs and leaves it running (rayinit.ray_session), and finds
    idle workers with torch imported instead of starting and stopping a Ray of its own. Yields its GCS address."""
    import ray

    from xray_ray.search.ray_setup import RayOptions, init_ray

    init_ray(RayOptions())
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


# ---------------------------------------------------------------- a real browser


def unavailable(message: str) -> NoReturn:
    """What the test needs is not on this machine: skipped locally, a failure under CI (CI set)."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """A headless Chromium with one page (tests/browser.py); skipped without one, except under CI."""
    binary = find_browser()
    if binary is None:
        message = (
            f"no headless browser found ({', '.join(BROWSERS)} or $XRAY_RAY_CHROMIUM); "
            "install Debian's chromium package (`apt-get install chromium`)"
        )
        unavailable(message)
    chromium = Chromium(binary, tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()
