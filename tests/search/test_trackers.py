"""--mlflow and --optuna-storage: the trackers people already watch runs with, read back with their own APIs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import ROOT, one_error_line, search_args, search_process, tiny_space_file
from xray_ray.search.command import main
from xray_ray.search.spaces import load_space


def _interrupt_after(proc: subprocess.Popen, pattern: str, timeout: float = 240) -> tuple[str, str]:
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if pattern in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    return "".join(seen) + out, err


@pytest.mark.slow
def test_mlflow_and_optuna_hold_every_trial_once_across_a_resume(tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    space = tiny_space_file(
        tmp_path, name="trk", space={"epochs": 2}, searcher={"algorithm": "optuna", "num_samples": 3}
    )
    mlflow_uri, optuna_uri = f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/optuna.db"
    args = search_args(tmp_path, space, "--mlflow", mlflow_uri, "--optuna-storage", optuna_uri, "--ensemble", "1")
    proc = search_process(args)
    try:
        out, err = _interrupt_after(proc, "epoch 1/2")  # the first trial half-way: it continues on --resume
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    resumed = subprocess.run(
        [sys.executable, "-m", "xray_ray.search", *args, "--resume"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_dir = tmp_path / "results" / "trk"
    trials = pd.read_parquet(run_dir / "trials.parquet")
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    assert len(trials) == 3

    client = MlflowClient(tracking_uri=mlflow_uri)
    exp = client.get_experiment_by_name("trk")
    runs = client.search_runs([exp.experiment_id])
    by_trial = {r.data.tags["trial_id"]: r for r in runs}
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
        assert sorted(latest) == mine["epoch"].tolist() == [1, 2]
        np.testing.assert_allclose([latest[e] for e in (1, 2)], mine["val_auc"], rtol=1e-9)
    card = json.loads((run_dir / "best" / "model.json").read_text())
    best = by_trial[card["trial_id"]]
    assert "model/model.json" in {a.path for a in client.list_artifacts(best.info.run_id, "model")}
    assert client.get_run(best.info.run_id).data.metrics["test_accuracy"] == pytest.approx(
        card["metrics"]["test"]["at_threshold"]["accuracy"]
    )

    study = optuna.load_study(study_name="trk", storage=optuna_uri)
    metric = load_space(space).metric
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


def test_mlflow_missing_is_one_sentence_before_anything_starts(tmp_path):
    space = tiny_space_file(tmp_path, name="trk")
    code = (
        "import sys; sys.modules['mlflow'] = None\n"
        "from xray_ray.search.command import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, *search_args(tmp_path, space, "--mlflow", f"sqlite:///{tmp_path}/m.db")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "--mlflow needs MLflow" in one_error_line(res.stderr) and "xray_ray[tracking]" in res.stderr
    assert not (tmp_path / "results").exists()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "flag, uri, says",
    [
        ("--mlflow", "http://127.0.0.1:{port}", "cannot reach the MLflow tracking URI"),
        ("--mlflow", "file:///tmp/mlruns", "refuse a plain file store"),
        ("--mlflow", "sqlite:////nonexistent-folder/m.db", "does not exist"),
        ("--optuna-storage", "sqlite:////nonexistent-folder/o.db", "does not exist"),
        ("--optuna-storage", "nosuchdb://x", "cannot open the Optuna storage"),
    ],
)
def test_an_unusable_tracker_is_one_sentence_and_exit_2_before_training(tmp_path, capsys, flag, uri, says):
    space = tiny_space_file(tmp_path, name="trk", searcher={"algorithm": "optuna"})
    assert main(search_args(tmp_path, space, flag, uri.format(port=_closed_port()))) == 2
    err = one_error_line(capsys.readouterr().err)
    assert says in err, err
    assert not (tmp_path / "results" / "trk" / "run.json").exists()  # nothing started


def test_optuna_storage_needs_the_optuna_searcher(tmp_path, capsys):
    space = tiny_space_file(tmp_path, name="trk")  # searcher: random
    assert main(search_args(tmp_path, space, "--optuna-storage", f"sqlite:///{tmp_path}/o.db")) == 2
    assert "searched at random" in one_error_line(capsys.readouterr().err)


def test_the_winner_of_k_classes_logs_its_arg_max_figures(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from xray_ray.search.trackers import log_winner

    best = tmp_path / "best"
    best.mkdir()
    (best / "model.json").write_text("{}")
    test = {"accuracy": 0.8, "balanced_accuracy": 0.75, "macro_f1": 0.7, "macro_auc": 0.9, "log_loss": 0.5}
    card = {"trial_id": "abc", "classes": ["NORMAL", "BACTERIA", "VIRUS"], "threshold": None, "metrics": {"test": test}}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = log_winner(uri, "k", card, best)
    logged = MlflowClient(uri).get_run(run_id).data.metrics
    assert logged == {f"test_{k}": v for k, v in test.items()}
