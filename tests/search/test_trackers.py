"""--mlflow and --optuna-storage: the trackers people already watch runs with, read back with their own APIs."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from conftest import ROOT, one_error_line, search_args, tiny_space_file
from xray_ray.search.command import main

# Both trackers across a Ctrl-C and --resume: tests/search/test_faults.py
# (test_mlflow_and_optuna_hold_every_trial_once_across_a_resume), which shares the interrupted search of its
# Ctrl-C test rather than train a second one.


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

    from xray_ray.search.trackers import experiment_of, log_winner

    best = tmp_path / "best"
    best.mkdir()
    (best / "model.json").write_text("{}")
    test = {"accuracy": 0.8, "balanced_accuracy": 0.75, "macro_f1": 0.7, "macro_auc": 0.9, "log_loss": 0.5}
    card = {"trial_id": "abc", "classes": ["NORMAL", "BACTERIA", "VIRUS"], "threshold": None, "metrics": {"test": test}}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_of(uri, "k", (tmp_path / "artifacts").as_uri())  # as the search made it: artifacts in its run
    run_id = log_winner(uri, "k", card, best)
    logged = MlflowClient(uri).get_run(run_id).data.metrics
    assert logged == {f"test_{k}": v for k, v in test.items()}
    assert list((tmp_path / "artifacts").rglob("model.json"))  # nothing written to the working directory
