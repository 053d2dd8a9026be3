"""The benchmarks under bench/ run end to end in --quick mode and end with the JSON line they promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MACHINE = {"cores", "cpu", "python", "torch", "ray"}
KEYS = {
    "prepare": {
        "machine",
        "per_core_ratio",
        "cached_share",
        "thread_speedup",
        "prepare_cold",
        "prepare_cached",
        "pil_decode_resize",
        "discovery_scan",
        "ray_data_epoch",
        "meets_targets",
    },
    "trial_throughput": {"machine", "sizes", "warmup_epochs_skipped", "target_ratio", "preset", "batch_size"},
    "search_efficiency": {
        "machine",
        "searches",
        "random_best_val_auc",
        "asha_trial_epochs_to_reach_random_best",
        "random_total_trial_epochs",
        "share_of_random",
        "meets_target",
        "files",
    },
    "overhead_memory": {
        "machine",
        "peak_rss_mb",
        "peak_private_mb",
        "after_trials",
        "rss_slope_mb_per_trial",
        "share_outside",
        "overhead",
    },
    "scale": {"machine", "asha_shares", "assumptions", "sources", "estimates"},
    "eval_batch": {"machine", "images", "repeats", "results", "fastest"},
    "gpu": {"machine", "device", "check", "train", "eval", "eval_speedup", "augment", "sharing"},
}


def run_quick(name: str, tmp_path: Path) -> dict:
    out = tmp_path / "out"
    env = {**os.environ, "XRAY_RAY_CACHE": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert KEYS[name] <= set(last), KEYS[name] - set(last)
    assert MACHINE <= set(last["machine"]) and last["quick"] is True
    assert json.loads((out / f"{name}.json").read_text()) == last
    return last


def test_prepare(tmp_path):
    r = run_quick("prepare", tmp_path)
    assert r["images"] > 0 and r["prepare_cold"]["images"] == r["prepare_cached"]["images"] == r["images"]
    assert r["ray_data_epoch"]["images"] == r["memory_epoch"]["images"] == r["images"]  # every image, once
    assert r["cached_share"] == pytest.approx(r["prepare_cached"]["seconds"] / r["prepare_cold"]["seconds"], rel=0.01)
    assert r["per_core_ratio"] == pytest.approx(
        r["prepare_cold"]["images_per_s"] / r["cores"] / r["pil_decode_resize"]["images_per_s"], rel=0.01
    )
    workers = r["cores"]
    assert r["decoded_by"] == (f"{workers} processes" if workers > 1 else "1 threads")  # forks on Linux, no Ray
    for name in ("pil_decode_resize", "prepare_cold_1w", "prepare_cold_threads", "prepare_cold", "prepare_cached"):
        assert len(r[name]["rounds"]) == r["rounds"] and r[name]["seconds"] == pytest.approx(
            sorted(r[name]["rounds"])[len(r[name]["rounds"]) // 2], rel=1e-3
        )  # the median of its rounds


def test_trial_throughput(tmp_path):
    r = run_quick("trial_throughput", tmp_path)
    assert set(r["sizes"]) == {"64"}  # --quick: one size (the full run: 64 and 128)
    for s in r["sizes"].values():
        a, b = s["memory_loop"], s["tune_trial"]
        assert a["images_per_s"] > 0 and b["images_per_s"] > 0 and a["epochs"] == b["epochs"] == [2]
        assert s["ratio"] == pytest.approx(b["images_per_s"] / a["images_per_s"])


def test_search_efficiency(tmp_path):
    r = run_quick("search_efficiency", tmp_path)
    fifo = r["searches"]["fifo_random"]
    assert fifo["trial_epochs"] == fifo["planned_trial_epochs"] == r["random_total_trial_epochs"]  # FIFO stops none
    curve = pd.read_csv(r["files"]["csv"])
    assert set(curve["search"]) == {"asha_optuna", "fifo_random"}
    for _, c in curve.groupby("search"):
        assert c["ended_at"].is_monotonic_increasing and c["best_so_far"].is_monotonic_increasing
        assert list(c["trial_epochs"]) == list(range(1, len(c) + 1))
    assert r["random_best_val_auc"] == pytest.approx(curve.loc[curve.search == "fifo_random", "val_auc"].max())
    assert Path(r["files"]["png"]).read_bytes()[:4] == b"\x89PNG"


def test_overhead_memory(tmp_path):
    r = run_quick("overhead_memory", tmp_path)
    assert r["peak_processes"] >= 3  # the driver, gcs_server, raylet at least
    assert all(r["at_peak_rss_mb"][k] > 0 for k in ("driver", "ray_core", "workers"))
    assert r["peak_rss_mb"] >= r["peak_private_mb"] > 0
    assert [a["trials_done"] for a in r["after_trials"]] == [1, 2]
    assert 0 <= r["share_outside"] <= 1


def test_scale(tmp_path):
    r = run_quick("scale", tmp_path)
    walls = [r["estimates"][f"{g}_gpu"]["paper"]["wall_h"] for g in (1, 4, 16)]
    assert walls[0] >= walls[1] >= walls[2] > 0
    # the committed measurement from a real card (bench/measured/) replaces the assumed GPU rate
    assert r["sources"]["gpu_images_per_s"].startswith("measured") and r["gpu"]
    one = r["estimates"]["1_gpu"]["paper"]
    a = r["assumptions"]
    assert one["slots"] == 1 / a["gpus_per_trial"]
    assert one["trial_images_per_s"] == pytest.approx(a["gpu_images_per_s_128px"] / a["gpu_size_factor"])
    assert a["trial_overhead_s"] > 0 and a["epoch_overhead_s"] > 0
    # without it, the figures are flagged as assumptions
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "scale.py"),
            "--quick",
            "--gpu-measured",
            "",
            "--gpu-search",
            "",
            "--out",
            str(tmp_path / "bare"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    bare = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "ASSUMPTION" in bare["sources"]["gpu_images_per_s"] and bare["gpu"] is None


def test_gpu(tmp_path):
    r = run_quick("gpu", tmp_path)  # on this machine's CPU when it has no GPU
    c = r["check"]
    assert c["checkpoint_roundtrip_identical"] and c["logits_rel_error_vs_float64"] < c["logits_tolerance"]
    assert len(c["phantom_val_auc_by_seed"]) == 3 and 0 <= c["phantom_val_auc"] <= 1
    assert [s["processes"] for s in r["sharing"]] == [1, 2]
    for s in r["sharing"]:
        assert len(s["per_process_images_per_s"]) == s["processes"]
        assert s["total_images_per_s"] == pytest.approx(sum(s["per_process_images_per_s"]))
    assert all(t["images_per_s"] > 0 for t in r["train"]) and r["eval"]["images"] > 0
    assert r["device"] == ("cuda" if r["machine"]["gpu"] else "cpu")


def test_eval_batch(tmp_path):
    r = run_quick("eval_batch", tmp_path)
    batches = [x["batch"] for x in r["results"]]
    assert len(batches) == 3 and batches[0] >= batches[-1]  # the budgets, largest (the old one) first
    assert r["results"][0]["ratio"] == pytest.approx(1.0)
    for x in r["results"]:
        assert x["images_per_s"] == pytest.approx(r["images"] / sorted(x["seconds"])[len(x["seconds"]) // 2])
