"""The trackers people already watch runs with: an MLflow run per trial, and the Optuna study in a storage.

Both are optional (``pip install 'xray_ray[tracking]'``) and checked before any data is read or trial
started: a missing package or an unreachable tracking URI is one sentence. The Parquet tables stay the
record; these are views of it for the tools users already have open.

MLflow: one experiment per search (the run's name), one MLflow run per trial (tagged ``trial_id``), its
parameters, per-epoch metrics (step = epoch) and status; the winner's run gets the exported model folder as
artifacts and the card's headline figures. A resumed search finds each trial's run by its tag instead of
opening another. Optuna: the searcher's study lives in the storage, named after the run, so optuna-dashboard
and ``optuna.visualization`` open it while the search runs, and ``--resume`` continues the same study.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune.logger import LoggerCallback

from xray_ray.common import env_set
from xray_ray.config import TrialConfig, decode_config
from xray_ray.errors import UserError

INSTALL = "pip install 'xray_ray[tracking]'"
# the per-epoch columns of epochs.parquet sent to MLflow (the validation and robustness ones; NaN skipped)
EPOCH_METRICS = (
    "train_loss",
    "val_loss",
    "val_auc",
    "val_acc",
    "val_brier",
    "lr",
    "rob_auc_min",
    "rob_auc_mean",
    "rob_loss_mean",
)
HEADLINE = ("accuracy", "sensitivity", "specificity", "roc_auc", "f1")  # the card's test figures, at its threshold
HEADLINE_K = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "log_loss")  # K > 2 classes: arg-max


# one try with a short timeout for the reachability check (MLflow retries for minutes by default)
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _sqlite_folder(uri: str, flag: str) -> None:
    """A sqlite:/// URI's folder must exist (sqlite creates the file, not its folders)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if str(path) not in ("", ":memory:") and not path.expanduser().resolve().parent.is_dir():
            raise UserError(f"{flag} {uri}: the folder {path.parent} does not exist; create it or choose another path.")


def check_mlflow(uri: str) -> None:
    """Refuse, in one sentence, an --mlflow URI this machine cannot use: no MLflow, or no answer from it."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError(f"--mlflow needs MLflow, which is not installed; {INSTALL}.") from None
    if uri.startswith("file:") or "://" not in uri:
        raise UserError(
            f"--mlflow {uri}: recent MLflow releases refuse a plain file store; give a database such as "
            "sqlite:///results/mlflow.db, or an http(s):// tracking server."
        )
    _sqlite_folder(uri, "--mlflow")
    try:
        with env_set(**QUICK_HTTP):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 (MLflow raises many kinds: connection, SQL, its own)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(
            f"cannot reach the MLflow tracking URI {uri} ({e.__class__.__name__}: {first}); start the "
            "server or fix --mlflow."
        ) from None


def optuna_storage(uri: str):
    """The Optuna RDB storage of --optuna-storage, opened now so that a bad URI is one sentence."""
    import optuna

    _sqlite_folder(uri, "--optuna-storage")
    try:
        return optuna.storages.RDBStorage(uri)
    except Exception as e:  # noqa: BLE001 (SQLAlchemy and Optuna raise many kinds)
        raise UserError(
            f"cannot open the Optuna storage {uri} ({e.__class__.__name__}); fix --optuna-storage."
        ) from None


def _finite(result: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k in EPOCH_METRICS:
        v = result.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


class MLflowTrials(LoggerCallback):
    """One MLflow run per Tune trial (driver side). Holds only strings until ``setup``, so it pickles with
    the Tuner and comes back on ``--resume``, where it reopens each trial's run by its ``trial_id`` tag."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None = None) -> None:
        self.uri, self.experiment, self.artifact_location = uri, experiment, artifact_location
        self._client = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_experiment_id": None, "_runs": {}}

    def setup(self, *args, **kwargs) -> None:
        self._client, self._experiment_id = experiment_of(self.uri, self.experiment, self.artifact_location)

    def _run_id(self, trial) -> str:
        tid = trial.trial_id
        if tid not in self._runs:
            if self._client is None:
                self.setup()
            self._runs[tid] = run_of(self._client, self._experiment_id, tid) or self._new_run(trial)
        return self._runs[tid]

    def _new_run(self, trial) -> str:
        from mlflow.entities import Param

        run = self._client.create_run(self._experiment_id, run_name=trial.trial_id, tags={"trial_id": trial.trial_id})
        cfg = TrialConfig.from_dict(decode_config(trial.config)).to_dict()
        params = [Param(k, str(v)[:6000]) for k, v in sorted({**cfg, "seed": trial.config.get("seed")}.items())]
        self._client.log_batch(run.info.run_id, params=params)
        return run.info.run_id

    def log_trial_start(self, trial) -> None:
        self._run_id(trial)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        from mlflow.entities import Metric

        step = int(result.get("epoch") or iteration)
        stamp = int(1000 * (result.get("ended_at") or time.time()))  # orders a retrained epoch after the first
        metrics = [Metric(k, v, stamp, step) for k, v in _finite(result).items()]
        if metrics:
            self._client.log_batch(self._run_id(trial), metrics=metrics)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        self._client.set_terminated(self._run_id(trial), "FAILED" if failed else "FINISHED")


def experiment_of(uri: str, name: str, artifact_location: str | None = None):
    """(MlflowClient, the id of experiment `name`, created when missing)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return client, found.experiment_id
    return client, client.create_experiment(name, artifact_location=artifact_location)


def run_of(client, experiment_id: str, trial_id: str) -> str | None:
    """The MLflow run of a trial (its ``trial_id`` tag), if the experiment has one."""
    found = client.search_runs([experiment_id], filter_string=f"tags.trial_id = '{trial_id}'", max_results=1)
    return found[0].info.run_id if found else None


def log_winner(uri: str, experiment: str, card: Mapping[str, Any], best_dir: Path) -> str:
    """The exported model folder as artifacts (``model/``) and the card's test figures as metrics, on the
    winner's run (an ensemble gets a run of its own, tagged ``trial_id: ensemble``); returns the run id."""
    from mlflow.entities import Metric

    client, exp = experiment_of(uri, experiment)
    tid = str(card.get("trial_id") or "ensemble")
    run_id = run_of(client, exp, tid) or client.create_run(exp, run_name=tid, tags={"trial_id": tid}).info.run_id
    test = (card.get("metrics") or {}).get("test") or {}
    if "macro_auc" in test:  # K > 2 classes: the arg-max figures, no threshold
        figures = {f"test_{k}": test.get(k) for k in HEADLINE_K}
    else:
        figures = {f"test_{k}": test.get("at_threshold", {}).get(k) for k in HEADLINE}
        figures["threshold"] = (card.get("threshold") or {}).get("value")
    metrics = [Metric(k, float(v), 0, 0) for k, v in figures.items() if isinstance(v, (int, float))]
    client.log_batch(run_id, metrics=metrics, tags=[])
    client.set_tag(run_id, "xray_ray.best", "true")
    client.log_artifacts(run_id, str(best_dir), artifact_path="model")
    return run_id


def check_trackers(mlflow: str | None, optuna: str | None, space) -> None:
    """Refuse the tracker flags a search cannot honour, before any data is read or Ray started."""
    if optuna and (space.searcher != "optuna" or not space.params):
        raise UserError(
            f"--optuna-storage keeps an Optuna study, but the space {space.name!r} is searched "
            f"{'at random' if space.params else 'over constants only'}; drop the flag or set "
            "searcher.algorithm: optuna."
        )
    if mlflow:
        check_mlflow(mlflow)
    if optuna:
        optuna_storage(optuna)


def mlflow_callbacks(uri: str | None, run_name: str, run_dir: str) -> tuple:
    """The Tune callback of --mlflow (none without it); a local sqlite store keeps artifacts in the run folder."""
    if not uri:
        return ()
    local = "://" not in run_dir and uri.startswith("sqlite:")
    artifacts = (Path(run_dir) / "mlflow-artifacts").resolve().as_uri() if local else None
    return (MLflowTrials(uri, run_name, artifacts),)
