"""Reliability and security: bad input is refused in one sentence, faults during a search are contained.

Rows of the table in docs/reliability.md that other test files already prove are cited there, not repeated
here. Searches use
tiny synthetic data (32 px, one block of 4 channels) so each takes well under a minute on 2 cores.
"""

from __future__ import annotations

import ast
import json
import os
import re
import resource
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import png_with_size, search_args, search_process, tiny_space_file, write_kaggle_tree
from xray_ray import results as R
from xray_ray.data.phantoms import render
from xray_ray.faults import FAULT_ENV, SWITCH_ENV
from xray_ray.search.command import main

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "xray_ray"


def space_file(tmp: Path, *, name: str = "faults", space: dict | None = None, **sections) -> Path:
    """The shared tiny space (conftest.TINY_SPACE) with `space` entries and whole sections changed."""
    return tiny_space_file(tmp, name=name, space=space, **sections)


def one_error_line(err: str) -> str:
    """The CLI contract for a user's mistake: exactly one line 'error: <sentence>' and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def trial_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "tune").glob("trainable_*") if p.is_dir())


def tune_rows(trial_dir: Path) -> list[dict]:
    """Every result Tune recorded for a trial, in order (result.json: one line per tune.report)."""
    f = trial_dir / "result.json"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def assert_each_epoch_once(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Tables and Tune's own records agree: every trial once, epochs 1..n once each, iteration == epoch."""
    trials = pd.read_parquet(run_dir / "trials.parquet")
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    assert trials["trial_id"].is_unique
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    for t in trials.itertuples():
        got = sorted(epochs.loc[epochs["trial_id"] == t.trial_id, "epoch"])
        assert got == list(range(1, t.epochs_run + 1)), (t.trial_id, got)
    for d in trial_dirs(run_dir):
        rows = tune_rows(d)
        assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1)), (d.name, [r["epoch"] for r in rows])
        # ASHA's time_attr: a restored trial keeps counting where its checkpoint left off
        assert all(r["training_iteration"] == r["epoch"] for r in rows), d.name
    return trials, epochs


@pytest.fixture
def ray_init_calls(monkeypatch) -> list:
    """Records calls of ray.init (and still makes them): 'nothing started' means this stays empty."""
    import ray

    calls: list = []
    real = ray.init

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ray, "init", spy)
    return calls


# ---------------------------------------------------------------- refused before anything starts


def _tree(root: Path, files: dict[tuple[str, str], int]) -> Path:
    """A Kaggle-layout folder with n phantom JPEGs per (split, class)."""
    return write_kaggle_tree(
        root, {k: [f"IM-{k[1][:1]}{i:04d}-0001.jpeg" for i in range(n)] for k, n in files.items()}, size=32
    )


BAD_RUNS = {
    "unknown key": ({"space": {"learning_rate": 0.1}}, [], "unknown key 'space.learning_rate'"),
    "wrong type": ({"space": {"double_conv": "yes"}}, [], "'double_conv' must be true or false"),
    "inverted range": ({"space": {"lr": {"type": "float", "low": 0.1, "high": 0.01}}}, [], "empty range"),
    "empty range": ({"space": {"blocks": {"type": "int", "low": 2, "high": 2}}}, [], "empty range"),
    "epochs 101": ({"space": {"epochs": 101}}, [], "epochs must be between 1 and 100"),
    "epochs 0": ({"space": {"epochs": {"type": "int", "low": 0, "high": 3}}}, [], "epochs must be between 1 and 100"),
    "unknown searcher": ({"searcher": {"algorithm": "grid"}}, [], "searcher.algorithm must be one of"),
    "more GPUs than the machine": ({}, ["--gpus-per-trial", "4"], "asks for more GPUs than this machine has"),
    "more CPUs than the machine": ({}, ["--cpus-per-trial", "3"], "asks for more CPUs than this machine has"),
    "negative max failures": ({}, ["--max-failures", "-1"], "--max-failures must be 0 or more"),
    "resume of nothing": ({}, ["--resume"], "there is no run to resume"),
}


@pytest.mark.parametrize("doc, flags, message", BAD_RUNS.values(), ids=BAD_RUNS.keys())
def test_bad_space_or_flags_exit_2_before_anything_starts(tmp_path, capsys, ray_init_calls, doc, flags, message):
    if "GPUs" in message:
        from xray_ray.search.ray_setup import local_gpus

        if local_gpus() >= 4:
            pytest.skip("this machine has 4 GPUs")
    space = space_file(tmp_path, space=doc.get("space"), **{k: v for k, v in doc.items() if k != "space"})
    assert main(search_args(tmp_path, space, *flags)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line, line
    assert ray_init_calls == [] and not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


BAD_DATA = {
    "missing folder": (None, "does not exist"),
    "empty folder": ({}, "has no train/, val/ or test/ folder"),
    "only junk": ({("train", "NORMAL"): 0}, "no usable images"),
    "only one class": ({("train", "NORMAL"): 6}, "train/ has no PNEUMONIA images"),
    # any folder under a split is a class now: one with no usable image is refused, never trained on
    "empty class folder": (
        {("train", "NORMAL"): 3, ("train", "PNEUMONIA"): 3, ("train", "COVID"): 0},
        "class folder train/COVID/ has no usable image",
    ),
}


@pytest.mark.parametrize("files, message", BAD_DATA.values(), ids=BAD_DATA.keys())
def test_bad_data_folder_exits_2_before_ray_starts(tmp_path, capsys, ray_init_calls, files, message):
    root = tmp_path / "data"
    if files is not None:
        root.mkdir()
        _tree(root, files)
        if files == {("train", "NORMAL"): 0}:
            (root / "train" / "NORMAL" / "notes.txt").write_text("x")
            (root / "train" / "NORMAL" / "empty.jpeg").write_bytes(b"")
    rc = main(search_args(tmp_path, space_file(tmp_path), data=str(root)))
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line, line
    assert ray_init_calls == [] and not list((tmp_path / "results").rglob("run.json"))


def test_the_real_cli_exits_2_with_one_line_and_starts_nothing(tmp_path):
    from xray_ray.search.ray_setup import local_gpus

    if local_gpus() >= 4:
        pytest.skip("this machine has 4 GPUs")
    t0 = time.time()
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "xray_ray.search",
            *search_args(tmp_path, space_file(tmp_path), "--gpus-per-trial", "4"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and res.stdout == ""
    assert "--gpus-per-trial 4 asks for more GPUs" in one_error_line(res.stderr)
    assert not (tmp_path / "results").exists()
    assert time.time() - t0 < 60  # refused up front, not after starting Ray and loading data


def test_unwritable_results_folder_is_refused_before_the_data_is_read(tmp_path, capsys, ray_init_calls):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # root ignores permission bits; nothing can be created under a regular file
    args = search_args(tmp_path, space_file(tmp_path), data=str(tmp_path / "no-such-data"))
    args[args.index("--results") + 1] = str(blocker / "results")
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cannot write to the results folder" in line and "no-such-data" not in line
    assert ray_init_calls == []


def test_a_full_disk_is_refused_before_the_search_starts(tmp_path):
    """RLIMIT_FSIZE=0 makes every write fail with EFBIG, as a full disk fails with ENOSPC."""

    def no_file_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal; kept across exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    res = subprocess.run(
        [sys.executable, "-m", "xray_ray.search", *search_args(tmp_path, space_file(tmp_path))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=no_file_writes,
    )
    assert res.returncode == 2
    assert "cannot write to the results folder" in one_error_line(res.stderr)
    assert [p for p in (tmp_path / "results").rglob("*") if p.is_file()] == []  # not even a temp file


# ---------------------------------------------------------------- atomic result files

_WRITE_UNDER_LIMIT = """
import resource, signal, sys
import numpy as np, pandas as pd
from xray_ray import results as R
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
big = pd.DataFrame({"x": np.random.default_rng(0).random(200_000)})
for write, where in ((lambda: R.write_parquet(big, sys.argv[1]), "parquet"),
                     (lambda: R.write_json({"x": "y" * 100_000}, sys.argv[2]), "json")):
    try:
        write()
        print(where, "written")
    except OSError as e:
        print(where, "refused", type(e).__name__)
"""


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temp_file(tmp_path):
    table, run_json = tmp_path / "run" / "trials.parquet", tmp_path / "run" / "run.json"
    old = pd.DataFrame({"trial_id": ["a", "b"], "best_val_auc": [0.9, 0.8]})
    R.write_parquet(old, str(table))
    R.write_json({"status": "finished"}, str(run_json))
    res = subprocess.run(
        [sys.executable, "-c", _WRITE_UNDER_LIMIT, str(table), str(run_json)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "parquet refused" in res.stdout and "json refused" in res.stdout, res.stdout
    pd.testing.assert_frame_equal(pd.read_parquet(table), old)
    assert R.read_json(str(run_json)) == {"status": "finished"}
    assert sorted(p.name for p in table.parent.iterdir()) == ["run.json", "trials.parquet"]


# ---------------------------------------------------------------- a messy folder, with secrets in the environment


def _save(path: Path, im: Image.Image, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)


def messy_folder(root: Path, outside: Path) -> tuple[dict[str, str], str]:
    """A Kaggle folder with every kind of bad and odd file; returns ({skipped path: reason part}, leaked uid)."""
    n = {("train", "NORMAL"): 24, ("train", "PNEUMONIA"): 24, ("test", "NORMAL"): 6, ("test", "PNEUMONIA"): 6}
    write_kaggle_tree(
        root,
        {
            k: [f"{'IM' if k[1] == 'NORMAL' else 'person'}-{k[0]}{i:03d}-0001.jpeg" for i in range(c)]
            for k, c in n.items()
        },
        size=48,
    )
    tn, tp = root / "train" / "NORMAL", root / "train" / "PNEUMONIA"
    gray = render(7, 100, 1, size=48)
    _save(tp / "odd-16bit.png", Image.fromarray(gray.astype(np.uint16) * 257), "PNG")
    _save(tp / "odd-cmyk.jpeg", Image.fromarray(gray).convert("CMYK"), "JPEG", quality=95)
    _save(tp / "odd-rgba.png", Image.fromarray(np.dstack([gray] * 3 + [np.full_like(gray, 255)])), "PNG")
    _save(tp / "odd-palette.png", Image.fromarray(gray).convert("P"), "PNG")
    _save(tp / "odd-upper.JPEG", Image.fromarray(render(7, 101, 1, size=48)), "JPEG")
    _save(tn / "odd-upper.PNG", Image.fromarray(render(7, 102, 0, size=48)), "PNG")
    rotated = Image.fromarray(render(7, 103, 0, size=48)[:24])
    exif = rotated.getexif()
    exif[0x0112] = 6
    _save(tn / "odd-exif.jpeg", rotated, "JPEG", exif=exif)

    good = (tp / "odd-upper.JPEG").read_bytes()
    bad = {
        "train/NORMAL/zero.jpeg": (b"", "empty file"),
        "train/NORMAL/truncated.jpeg": (good[: len(good) // 2], "truncated"),
        "train/PNEUMONIA/random.jpeg": (np.random.default_rng(0).bytes(3000), "not a readable image"),
        "train/PNEUMONIA/._person-train000-0001.jpeg": (b"\0\5\26\7" + b"\0" * 60, "AppleDouble"),
        "train/PNEUMONIA/bomb.png": (png_with_size(100_000, 100_000), "too large"),
        "val/NORMAL/.DS_Store": (b"\0\0\0\1Bud1", ".DS_Store"),  # a split folder with no images
    }
    expect = {}
    for rel, (data, reason) in bad.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        expect[rel] = reason
    outside.write_bytes(good)
    os.symlink("loop.jpeg", tn / "loop.jpeg")
    os.symlink(outside, tn / "outside.jpeg")
    expect["train/NORMAL/loop.jpeg"] = "symlink loop"
    expect["train/NORMAL/outside.jpeg"] = "outside the data folder"
    leaked = "train/PNEUMONIA/person-copy-of-a-test-image.jpeg"  # the same bytes as a test image
    shutil.copy(root / "test" / "PNEUMONIA" / "person-test000-0001.jpeg", root / leaked)
    return expect, leaked


SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")

_RUN_AND_REPORT_AUTH = """
import os, sys
from xray_ray.search.command import main
rc = main(sys.argv[1:])
print("RAY_AUTH_MODE after the run:", os.environ.get("RAY_AUTH_MODE"))
sys.exit(rc)
"""


@pytest.fixture(scope="module")
def messy_run(tmp_path_factory):
    """One finished search over the messy folder, run with dummy credentials in its environment."""
    tmp = tmp_path_factory.mktemp("messy")
    expect, leaked = messy_folder(tmp / "chest_xray", tmp / "outside.jpeg")
    secrets_env = {
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "AWS_SESSION_TOKEN": secrets.token_urlsafe(60),
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")} | secrets_env
    args = search_args(tmp, space_file(tmp, name="messy"), data=str(tmp / "chest_xray"))
    res = subprocess.run(
        [sys.executable, "-c", _RUN_AND_REPORT_AUTH, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {
        "dir": tmp / "results" / "messy",
        "tmp": tmp,
        "args": args,
        "stdout": res.stdout,
        "expect": expect,
        "leaked": leaked,
        "secrets": secrets_env,
    }


@pytest.mark.slow
def test_a_messy_folder_is_searched_with_every_skipped_file_listed(messy_run):
    run = json.loads((messy_run["dir"] / "run.json").read_text())
    assert run["status"] == "finished"
    skipped = {s["path"]: s["reason"] for s in run["data"]["skipped_files"]}
    assert set(skipped) == set(messy_run["expect"]) and run["data"]["skipped"] == len(skipped)
    for path, reason in messy_run["expect"].items():
        assert reason in skipped[path], (path, skipped[path])
    # 60 clean images, 7 odd but valid ones (16-bit, CMYK, RGBA, palette, upper-case, EXIF) and the copy
    assert run["data"]["source"]["images"] == 60 + 7 + 1
    leak = run["data"]["splits"]["leakage"]
    assert [u for group in leak for u in group["dropped"]] == [messy_run["leaked"]]
    assert leak[0]["kept_split"] == "test" and leak[0]["identical_bytes"]
    out = messy_run["stdout"]
    assert f"{len(skipped)} files skipped" in out and "leakage: 1 train images" in out
    assert "warning: val/ has no usable images; it is ignored." in out
    trials = pd.read_parquet(messy_run["dir"] / "trials.parquet")
    assert (trials["status"] == "completed").all() and (messy_run["dir"] / "best" / "model.onnx").is_file()


@pytest.mark.slow
def test_no_credential_from_the_environment_is_written_anywhere(messy_run):
    files = [p for p in messy_run["dir"].rglob("*") if p.is_file()]
    assert any(p.name == "run.json" for p in files) and any(p.name == "model.json" for p in files)
    for p in files:
        data = p.read_bytes()
        for name, value in messy_run["secrets"].items():
            assert value.encode() not in data, f"{name} written to {p}"


@pytest.mark.slow
def test_token_auth_stays_on_for_the_local_ray(messy_run):
    # ray.init turns token auth on for a new local cluster unless RAY_AUTH_MODE says otherwise; nothing in
    # xray_ray says otherwise (the run's environment had no RAY_AUTH_MODE)
    assert "RAY_AUTH_MODE after the run: token" in messy_run["stdout"]


@pytest.mark.slow
def test_a_results_folder_holding_a_different_run_is_refused(messy_run, capsys, ray_init_calls):
    run_json = messy_run["dir"] / "run.json"
    before = run_json.read_bytes()
    args = messy_run["args"]
    for change in (["--seed", "5"], ["--data", "synthetic:200"]):
        argv = list(args)
        if change[0] in argv:
            argv[argv.index(change[0]) + 1] = change[1]
        else:
            argv += change
        assert main([*argv, "--resume"]) == 2
        assert "holds a different run" in one_error_line(capsys.readouterr().err)
    changed = space_file(messy_run["tmp"] / "results", name="messy", space={"epochs": 2})  # same name, other space
    argv = list(args)
    argv[argv.index("--space") + 1] = str(changed)
    assert main([*argv, "--resume"]) == 2
    assert "holds a different run" in one_error_line(capsys.readouterr().err)
    assert ray_init_calls == [] and run_json.read_bytes() == before


# ---------------------------------------------------------------- Ctrl-C (its interrupted search runs in a subprocess)


def _read_until(proc: subprocess.Popen, pattern: str, deadline: float, seen: list[str]) -> bool:
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            return False
        seen.append(line)
        if re.search(pattern, line):
            return True
    return False


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory, module_ray):
    """A search with both trackers stopped by Ctrl-C in its first trial, then resumed by the command it printed
    (run in this process, on the module's Ray). One run serves the Ctrl-C test and the trackers' test below."""
    tmp = tmp_path_factory.mktemp("interrupted")
    space = space_file(
        tmp,
        searcher={"algorithm": "optuna", "num_samples": 3},
        scheduler={"algorithm": "asha", "grace_period": 1, "reduction_factor": 2},
        space={"epochs": 2},
    )
    mlflow_uri, optuna_uri = f"sqlite:///{tmp}/mlflow.db", f"sqlite:///{tmp}/optuna.db"
    args = search_args(tmp, space, "--mlflow", mlflow_uri, "--optuna-storage", optuna_uri, "--ensemble", "1")
    proc = search_process(args)
    seen: list[str] = []
    try:
        assert _read_until(proc, r"epoch 1/", time.time() + 180, seen), "".join(seen)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        t0 = time.time()
        _, err = proc.communicate(timeout=90)
        stopped_in = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    run_dir = tmp / "results" / "faults"
    status = json.loads((run_dir / "run.json").read_text())["status"]
    resume = [line for line in err.splitlines() if "Resume with:" in line]
    command = shlex.split(resume[0].split("Resume with:", 1)[1]) if len(resume) == 1 else []
    resumed = main(command[3:]) if command[3:-1] == args else None
    return {
        "args": args, "returncode": proc.returncode, "err": err, "stopped_in": stopped_in, "status": status,
        "resume": resume, "command": command, "resumed": resumed, "run_dir": run_dir, "space": space,
        "mlflow": mlflow_uri, "optuna": optuna_uri,
    }  # fmt: skip


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_prints_the_resume_command_and_resume_completes(interrupted_run):
    r = interrupted_run
    assert r["returncode"] == 130, r["err"][-3000:]
    assert r["stopped_in"] < 60
    assert "Traceback" not in r["err"], r["err"][-3000:]
    assert len(r["resume"]) == 1, r["err"][-3000:]
    command = r["command"]
    assert command[:3] == ["python", "-m", "xray_ray.search"] and command[-1] == "--resume"
    assert command[3:-1] == r["args"]
    assert r["status"] == "interrupted"  # as run.json said before the resume

    assert r["resumed"] == 0  # that command, run in this process on the module's Ray
    trials, epochs = assert_each_epoch_once(r["run_dir"])
    assert len(trials) == 3 and set(trials["status"]) <= {"completed", "stopped"}
    assert len(trial_dirs(r["run_dir"])) == 3
    assert json.loads((r["run_dir"] / "run.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_mlflow_and_optuna_hold_every_trial_once_across_a_resume(interrupted_run):
    """--mlflow and --optuna-storage, read back with their own APIs after the interrupted search resumed."""
    import optuna
    from mlflow.tracking import MlflowClient

    from xray_ray.search.spaces import load_space

    r = interrupted_run
    assert r["resumed"] == 0, r["err"][-3000:]
    trials = pd.read_parquet(r["run_dir"] / "trials.parquet")
    epochs = pd.read_parquet(r["run_dir"] / "epochs.parquet")
    assert len(trials) == 3

    client = MlflowClient(tracking_uri=r["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    by_trial = {run.data.tags["trial_id"]: run for run in runs}
    assert len(runs) == len(by_trial) == 3 and set(by_trial) == set(trials["trial_id"])  # no duplicate run
    for t in trials.itertuples():
        run = by_trial[t.trial_id]
        assert run.info.status == "FINISHED"
        assert float(run.data.params["zoom"]) == pytest.approx(t.p_zoom)
        # an epoch Tune trained again after the interruption carries two values at its step: the later one
        # is the kept one, as epochs.parquet keeps the last row of each epoch
        history = sorted(client.get_metric_history(run.info.run_id, "val_auc"), key=lambda m: m.timestamp)
        latest = {m.step: m.value for m in history}
        mine = epochs[epochs["trial_id"] == t.trial_id].sort_values("epoch")
        assert sorted(latest) == mine["epoch"].tolist() == list(range(1, t.epochs_run + 1))
        np.testing.assert_allclose([latest[e] for e in sorted(latest)], mine["val_auc"], rtol=1e-9)
    card = json.loads((r["run_dir"] / "best" / "model.json").read_text())
    best = by_trial[card["trial_id"]]
    assert "model/model.json" in {a.path for a in client.list_artifacts(best.info.run_id, "model")}
    assert client.get_run(best.info.run_id).data.metrics["test_accuracy"] == pytest.approx(
        card["metrics"]["test"]["at_threshold"]["accuracy"]
    )

    study = optuna.load_study(study_name="faults", storage=r["optuna"])
    metric = load_space(r["space"]).metric
    assert len(study.trials) == 3  # the resumed search asked for no trial twice
    last = epochs.sort_values("epoch").groupby("trial_id").last()
    seen = set()
    for ot in study.trials:
        match = trials[np.isclose(trials["p_zoom"], ot.params["zoom"])]
        assert len(match) == 1, ot.params
        t = match.iloc[0]
        seen.add(t.trial_id)
        assert ot.state == optuna.trial.TrialState.COMPLETE and t.status in ("completed", "stopped")
        assert ot.value == pytest.approx(last.loc[t.trial_id, metric])  # the space's metric, its last report
    assert seen == set(trials["trial_id"])


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.slow
def test_resume_skips_a_cut_short_experiment_state_and_resumes_from_the_one_before(tmp_path, capsys, module_ray):
    space = space_file(tmp_path, searcher={"num_samples": 2}, space={"epochs": 2})
    args = search_args(tmp_path, space, "--no-export")
    assert main(args) == 0
    tune_dir = tmp_path / "results" / "faults" / "tune"
    (first,) = sorted(tune_dir.glob("experiment_state-*.json"))
    # a later session killed while Tune rewrote its state (a plain open-and-write): the newest file is cut short
    later = "2999-01-01_00-00-00"
    for f in tune_dir.glob(f"*-{first.stem.removeprefix('experiment_state-')}.*"):
        shutil.copyfile(f, tune_dir / f.name.replace(first.stem.removeprefix("experiment_state-"), later))
    _truncate(tune_dir / f"experiment_state-{later}.json")
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"newest experiment state was damaged (experiment_state-{later}.json" in out
    session = sorted(p.name for p in tune_dir.iterdir() if later in p.name)
    assert f"damaged-experiment_state-{later}.json" in session
    assert len(session) >= 2 and all(n.startswith("damaged-") for n in session)  # the session's files go together
    trials, _ = assert_each_epoch_once(tmp_path / "results" / "faults")
    assert len(trials) == 2 and (trials["status"] == "completed").all()


@pytest.mark.slow
def test_resume_with_no_whole_experiment_state_is_one_sentence(tmp_path, capsys, module_ray):
    space = space_file(tmp_path, searcher={"num_samples": 1}, space={"epochs": 1})
    args = search_args(tmp_path, space, "--no-export")
    assert main(args) == 0
    (state,) = (tmp_path / "results" / "faults" / "tune").glob("experiment_state-*.json")
    _truncate(state)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = one_error_line(capsys.readouterr().err)
    assert "is damaged and no earlier one is whole" in err and "another --name" in err
    assert (tmp_path / "results" / "faults" / "trials.parquet").exists()  # nothing computed is lost


# ---------------------------------------------------------------- faults inside trials


@pytest.mark.slow
def test_a_trial_that_raises_runs_out_of_memory_or_goes_nan_is_errored_and_the_search_goes_on(
    tmp_path, monkeypatch, capsys, module_ray
):
    # lr 1e20 makes the loss NaN within the first epoch (train_one_epoch raises FloatingPointError);
    # the hook makes one healthy trial raise and another run out of memory at epoch 2
    monkeypatch.setenv(SWITCH_ENV, "1")
    monkeypatch.setenv(FAULT_ENV, "raise:epoch=2,once=raised;oom:epoch=2,once=oom")
    lrs = {"type": "categorical", "choices": [1.0e-3, 2.0e-3, 1.0e20]}
    space = space_file(tmp_path, space={"epochs": 2, "lr": lrs}, searcher={"num_samples": 4, "seed": 0})
    assert main(search_args(tmp_path, space, "--max-failures", "0", "--no-export")) == 0
    trials, _ = assert_each_epoch_once(tmp_path / "results" / "faults")
    assert len(trials) == 4
    nan = trials[trials["p_lr"] == 1.0e20]
    healthy = trials[trials["p_lr"] != 1.0e20]
    assert len(nan) >= 1 and len(healthy) >= 3, trials[["trial_id", "p_lr"]]  # the seed gives both kinds
    assert (nan["status"] == "errored").all() and nan["error"].str.contains("NaN or inf").all()
    assert (nan["epochs_run"] == 0).all()
    errors = healthy.loc[healthy["status"] == "errored", "error"].tolist()
    assert len(errors) == 2 and any("injected fault at epoch 2" in e for e in errors), errors
    assert any("OutOfMemoryError" in e and "out of memory" in e for e in errors), errors
    assert (healthy.loc[healthy["status"] == "errored", "epochs_run"] == 1).all()
    assert (healthy["status"] == "completed").sum() == len(healthy) - 2
    assert (healthy.loc[healthy["status"] == "completed", "epochs_run"] == 2).all()
    run = json.loads((tmp_path / "results" / "faults" / "run.json").read_text())
    assert run["status"] == "finished" and run["trials"]["errored"] == len(nan) + 2
    assert "errored; the search goes on" in capsys.readouterr().out


@pytest.mark.slow
def test_a_killed_trial_is_retried_from_its_checkpoint(tmp_path, monkeypatch, module_ray):
    # SIGKILL of the trial's process at epoch 2 (as an OOM killer does), once; --max-failures 1 retries it
    monkeypatch.setenv(SWITCH_ENV, "1")
    monkeypatch.setenv(FAULT_ENV, "kill:epoch=2,once=killed")
    space = space_file(tmp_path, space={"epochs": 2})
    assert main(search_args(tmp_path, space, "--max-failures", "1", "--no-export")) == 0
    assert (tmp_path / "results" / "faults" / "tune" / ".faults" / "killed").exists()  # the fault did fire
    run_dir = tmp_path / "results" / "faults"
    trials, epochs = assert_each_epoch_once(run_dir)
    assert len(trials) == 2 and (trials["status"] == "completed").all() and (trials["epochs_run"] == 2).all()
    assert len(epochs) == 4
    # the killed trial resumed after epoch 1 from its checkpoint: epoch 1 was not trained twice, and Tune
    # recorded the failure in the trial's folder
    failed = [d for d in trial_dirs(run_dir) if (d / "error.txt").exists()]
    assert len(failed) == 1, [p.name for d in trial_dirs(run_dir) for p in d.iterdir()]
    assert [r["epoch"] for r in tune_rows(failed[0])] == [1, 2]


# ---------------------------------------------------------------- models given to predict and evaluate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    import torch

    from xray_ray.data.prepare import SplitArrays
    from xray_ray.model.cnn import build_model
    from xray_ray.ship.winner import finalize

    torch.manual_seed(0)
    labels = np.array([0, 1] * 8, np.int64)
    val = SplitArrays(
        np.stack([render(1, i, int(y), size=32) for i, y in enumerate(labels)]),
        labels,
        [f"v{i}" for i in range(16)],
        [f"p{i}" for i in range(16)],
    )
    out = tmp_path_factory.mktemp("model")
    finalize(out, build_model("tiny", image_size=32), {"val": val}, {}, pd.DataFrame(), pd.DataFrame(), n_boot=20)
    return out


def _bad_model(kind: str, good: Path, tmp: Path) -> Path:
    if kind == "torch.save checkpoint":
        import torch

        path = tmp / "model.pt"
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, path)
        return path
    if kind == "raw pickle named .onnx":
        path = tmp / "weights.onnx"
        path.write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00\x8c\x01x\x94.")
        return path
    folder = tmp / kind.replace(" ", "-")
    shutil.copytree(good, folder)
    if kind == "random bytes as model.onnx":
        (folder / "model.onnx").write_bytes(np.random.default_rng(0).bytes(5000))
    elif kind == "contract version 99":
        card = json.loads((folder / "model.json").read_text())
        card["contract_version"] = 99
        (folder / "model.json").write_text(json.dumps(card))
    return folder


BAD_MODELS = {
    "torch.save checkpoint": "looks like a pickle",
    "raw pickle named .onnx": "looks like a pickle",
    "random bytes as model.onnx": "could not be loaded by onnxruntime",
    "contract version 99": "contract version 99 is not supported",
}


@pytest.mark.parametrize("tool", ["predict", "evaluate"])
@pytest.mark.parametrize("kind", BAD_MODELS)
def test_predict_and_evaluate_refuse_what_is_not_a_model_of_this_contract(model_dir, tmp_path, tool, kind):
    bad = _bad_model(kind, model_dir, tmp_path)
    image = tmp_path / "scan.png"
    Image.fromarray(render(0, 0, 1, size=48)).save(image)
    extra = [str(image)] if tool == "predict" else ["--data", "synthetic:60"]
    res = subprocess.run(
        [sys.executable, "-m", "xray_ray", tool, "--model", str(bad), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and res.stdout == ""
    assert BAD_MODELS[kind] in one_error_line(res.stderr)


def test_the_good_model_is_accepted(model_dir, tmp_path):
    """The control for the refusals above: the unmodified folder predicts."""
    image = tmp_path / "scan.png"
    Image.fromarray(render(0, 0, 1, size=48)).save(image)
    res = subprocess.run(
        [sys.executable, "-m", "xray_ray", "predict", "--model", str(model_dir), str(image)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and json.loads(res.stdout)["path"] == str(image)


# ---------------------------------------------------------------- code that must never appear


def _calls(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _keyword(call: ast.Call, name: str):
    kw = next((k for k in call.keywords if k.arg == name), None)
    return kw.value.value if kw is not None and isinstance(kw.value, ast.Constant) else "missing"


def test_no_checkpoint_or_array_is_ever_unpickled():
    seen = 0
    for path in sorted(PACKAGE.rglob("*.py")):
        for call, func in _calls(path):
            where = f"{path.name}:{call.lineno}"
            if func == "torch.load":
                seen += 1
                assert _keyword(call, "weights_only") is True, f"{where}: torch.load without weights_only=True"
            if func in ("np.load", "numpy.load"):
                assert _keyword(call, "allow_pickle") is False, f"{where}: np.load without allow_pickle=False"
            assert func not in (
                "pickle.load",
                "pickle.loads",
                "cloudpickle.load",
                "cloudpickle.loads",
                "joblib.load",
                "dill.load",
            ), f"{where}: {func}"
    assert seen >= 1  # the search's own trial checkpoints: the scan did find the call it guards


@pytest.mark.parametrize("module", ["serve/predict.py", "serve/runtime.py", "data/images.py", "serve/evaluate.py"])
def test_paths_given_to_predict_are_never_seen_by_a_shell(module):
    source = (PACKAGE / module).read_text()
    for pattern in (
        r"\bsubprocess\b",
        r"\bos\.system\b",
        r"\bos\.popen\b",
        r"shell\s*=\s*True",
        r"\bos\.exec",
        r"\bos\.spawn",
        r"\beval\(",
        r"\bexec\(",
    ):
        assert not re.search(pattern, source), f"{module}: {pattern}"


def test_local_ray_keeps_the_dashboard_off_and_auth_on():
    # every ray.init of the package lives in search/ray_setup.py; the local one keeps the dashboard off
    assert [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py") if "ray.init(" in p.read_text()] == [
        "search/ray_setup.py"
    ]
    search = (PACKAGE / "search" / "ray_setup.py").read_text()
    local_init = [
        call
        for call, func in _calls(PACKAGE / "search" / "ray_setup.py")
        if func == "ray.init" and not any(k.arg == "address" for k in call.keywords)
    ]
    assert len(local_init) == 1 and _keyword(local_init[0], "include_dashboard") is False
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "0.0.0.0" not in text and "dashboard_host" not in text, path.name  # noqa: S104 (its absence)
        assert not re.search(r"RAY_AUTH_MODE\W+(?!token)\w", text), path.name
    assert "RAY_AUTH_TOKEN" not in search  # tokens come from Ray's own files or environment, never from us


# ---------------------------------------------------------------- the test-only hook itself


def test_the_fault_hook_is_inert_without_the_test_switch(tmp_path, monkeypatch):
    from xray_ray.faults import inject_fault, spec

    monkeypatch.delenv(SWITCH_ENV, raising=False)
    monkeypatch.setenv(FAULT_ENV, "raise:epoch=1,once=marker")
    assert spec() == ""  # the variable alone gives the search nothing to hand its trials
    inject_fault(1, tmp_path, spec())  # nothing happens, nothing is written
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv(SWITCH_ENV, "1")
    with pytest.raises(RuntimeError, match="injected fault at epoch 1"):
        inject_fault(1, tmp_path, spec())
    assert (tmp_path / "marker").exists()
    inject_fault(1, tmp_path, spec())  # once: the marker exists, so no second failure


def test_a_slow_fault_delays_every_epoch_and_fails_nothing(tmp_path, monkeypatch):
    from xray_ray.faults import inject_fault, spec

    monkeypatch.setenv(SWITCH_ENV, "1")
    monkeypatch.setenv(FAULT_ENV, "slow:epoch=*,seconds=0.3;raise:epoch=4")
    for epoch in (1, 2, 3):  # every epoch is late; the raise is for epoch 4 only
        t0 = time.monotonic()
        inject_fault(epoch, tmp_path, spec())
        assert time.monotonic() - t0 >= 0.3
    with pytest.raises(RuntimeError, match="injected fault at epoch 4"):
        inject_fault(4, tmp_path, spec())
    monkeypatch.setenv(FAULT_ENV, "slow:seconds=5")  # epoch 1 by default, as for every kind
    t0 = time.monotonic()
    inject_fault(2, tmp_path, spec())
    assert time.monotonic() - t0 < 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "../up", "a/b", ".."])
def test_the_fault_hook_never_writes_outside_the_run(tmp_path, monkeypatch, name):
    from xray_ray.faults import inject_fault, spec

    monkeypatch.setenv(SWITCH_ENV, "1")
    monkeypatch.setenv(FAULT_ENV, f"raise:epoch=1,once={name}")
    with pytest.raises(ValueError, match="plain file name"):
        inject_fault(1, tmp_path / "run", spec())
    assert not (tmp_path / "run").exists() and not Path("/tmp/elsewhere").exists()


def test_the_shipped_trainable_reaches_the_hook_only_through_the_faults_module():
    import inspect

    import xray_ray.search.trial as T
    import xray_ray.search.trial_loop as L

    src = inspect.getsource(T) + inspect.getsource(L)
    assert "os.open(" not in src and "SIGKILL" not in src  # the hook's file and kill code live in faults.py


@pytest.mark.slow
def test_the_ray_token_file_is_private_after_a_local_start(tmp_path):
    # Ray 2.60 writes ~/.ray/auth_token with the process umask (0644 here); init_ray narrows it to 0600
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")} | {"HOME": str(home)}
    code = (
        "import os, ray; os.umask(0o022); from xray_ray.search.ray_setup import RayOptions, init_ray; "
        "init_ray(RayOptions(address=None, num_cpus=1, cpus_per_trial=1.0)); ray.shutdown()"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    token = home / ".ray" / "auth_token"
    assert token.is_file() and token.stat().st_size > 0
    assert token.stat().st_mode & 0o077 == 0 and token.parent.stat().st_mode & 0o077 == 0
