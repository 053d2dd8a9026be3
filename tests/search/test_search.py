"""End-to-end searches on a real local Ray: Parquet schema, agreement with Tune, ASHA, resume after SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from browser import check_report

from conftest import saved_trials
from xray_ray.config import TrialConfig, decode_config, model_sizes
from xray_ray.model.cnn import build_model
from xray_ray.search.command import main
from xray_ray.search.tables import EPOCH_COLUMNS, TRIAL_COLUMNS

# The end-to-end searches are marked slow one by one; the pure unit tests run in `make test-fast` too.
ROOT = Path(__file__).resolve().parents[2]

TINY_SPACE = {
    "name": "tiny",
    "space": {
        "image_size": 32,
        "epochs": {"type": "int", "low": 2, "high": 3},
        "blocks": {"type": "int", "low": 1, "high": 2},
        "double_conv": False,
        "width": {"type": "categorical", "choices": [4, 8]},
        "head": "gap",
        "fc": [8],
        "lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-2, "log": True},
        "batch_size": 64,
        "zoom": {"type": "float", "low": 0.0, "high": 0.3},
    },
    "searcher": {"algorithm": "optuna", "num_samples": 6, "max_concurrent": 1, "seed": 0},
    "scheduler": {"algorithm": "asha", "metric": "val_auc", "grace_period": 1, "reduction_factor": 2},
    "data": {"val_fraction": 0.2, "test_fraction": 0.2},
}


def _space(tmp_path, **changes):
    doc = json.loads(json.dumps(TINY_SPACE))
    for k, v in changes.items():
        doc[k].update(v)
    path = tmp_path / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _trial_dirs(run_dir):
    return [p for p in (run_dir / "tune").glob("trainable_*") if p.is_dir()]


def _trial_params(run_dir) -> dict:
    """trial id -> TrialConfig, from Tune's own params.json and result.json of each trial."""
    out = {}
    for d in _trial_dirs(run_dir):
        tid = json.loads((d / "result.json").read_text().splitlines()[0])["trial_id"]
        out[tid] = TrialConfig.from_dict(decode_config(json.loads((d / "params.json").read_text())))
    return out


def _saved_state(tune_dir: Path) -> list[dict]:
    """Each trial as Tune's last saved experiment state has it: status, folder, iteration, checkpoint."""
    states = sorted(tune_dir.glob("experiment_state-*.json"))
    try:
        return saved_trials(states[-1].read_text()) if states else []
    except ValueError:  # caught while Tune writes it
        return []


# first in the file: the search it kills runs in a subprocess before this module's own Ray (module_ray) starts
@pytest.mark.slow
def test_resume_after_the_driver_is_killed(tmp_path, capsys, module_ray):
    """kill -9 of the whole search, then --resume: finished trials are kept, the others complete; a trial whose
    saved checkpoint is not whole (Tune deletes the previous checkpoint before it saves the state that names
    the next, so a kill can land during or after the delete) trains again from its first epoch instead of
    erroring; a finished trial whose result files the kill cut short keeps its epochs (from its history)."""
    space = _space(tmp_path, searcher={"num_samples": 3, "max_concurrent": 1}, scheduler={"algorithm": "fifo"})
    doc = yaml.safe_load(space.read_text())
    doc["space"]["epochs"] = 3
    space.write_text(yaml.safe_dump(doc))
    args = [
        sys.executable,
        "-m",
        "xray_ray.search",
        "--data",
        "synthetic:600",
        "--space",
        str(space),
        "--results",
        str(tmp_path / "results"),
        "--cache",
        str(tmp_path / "cache"),
        "--no-export",
    ]
    run_dir = tmp_path / "results" / "tiny"
    # Tune saves its experiment state every second instead of every ten, so that the kill below can wait for
    # a state that shows one trial finished and another half-way
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            state = _saved_state(run_dir / "tune")
            done = [t["dir"] for t in state if t["status"] == "TERMINATED"]
            half = [t["dir"] for t in state if t["status"] == "RUNNING" and t["checkpoint"] and t["iteration"] < 3]
            if done and half:
                break
            time.sleep(0.1)
        assert time.time() < deadline, f"no saved state with a finished and a half-way trial: {state}"
        killed_at = time.time()
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not (run_dir / "trials.parquet").exists()
    for d in half:  # the checkpoint the state names is not whole, as after a kill while Tune deleted it: the
        # folder and some of its files left (on S3 the folder's marker goes last; a kill after the delete leaves
        # no folder, which lacks the same files)
        for checkpoint in (run_dir / "tune" / d).glob("checkpoint_*"):
            for name in ("state.pt", "best.safetensors"):
                (checkpoint / name).unlink(missing_ok=True)
    # and a finished trial's result files cut short, as after a kill while Tune copies them to storage (its
    # state already saying the trial finished): result.json mid-line, which Tune then cannot read at all
    finished = run_dir / "tune" / done[0]
    text = (finished / "result.json").read_text()
    (finished / "result.json").write_text(text[: text.rindex("\n", 0, len(text) - 1) + 40])
    (finished / "progress.csv").write_text("".join((finished / "progress.csv").read_text().splitlines(True)[:2]))

    # the resume in this process, on the module's Ray (as a notebook would run it)
    assert main([*args[3:], "--resume"]) == 0
    out = capsys.readouterr().out
    assert "left 1 trial(s) naming a checkpoint that is gone or not whole" in out, out[-3000:]
    trials = pd.read_parquet(run_dir / "trials.parquet")
    epochs = pd.read_parquet(run_dir / "epochs.parquet")
    assert len(trials) == 3 and trials["trial_id"].is_unique
    assert (trials["status"] == "completed").all() and (trials["epochs_run"] == 3).all()
    assert len(epochs) == 9 and not epochs.duplicated(["trial_id", "epoch"]).any()
    for d in _trial_dirs(run_dir):
        rows = [json.loads(line) for line in (d / "result.json").read_text().splitlines() if line.endswith("}")]
        if d.name in done:  # finished trials were not re-run: no new results after the kill
            assert len(rows) <= 3 and max(r["timestamp"] for r in rows) <= killed_at
        if d.name in half:  # trained again from epoch 1 after the resume
            assert [r["epoch"] for r in rows if r["timestamp"] > killed_at] == [1, 2, 3]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, module_ray):
    tmp = tmp_path_factory.mktemp("search")
    space = _space(tmp)
    rc = main(
        [
            "--data",
            "synthetic:300",
            "--space",
            str(space),
            "--results",
            str(tmp / "results"),
            "--cache",
            str(tmp / "cache"),
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    return tmp / "results" / "tiny"


@pytest.mark.slow
def test_tables_have_the_contracted_schema(tiny_run):
    trials = pd.read_parquet(tiny_run / "trials.parquet")
    epochs = pd.read_parquet(tiny_run / "epochs.parquet")
    assert len(trials) == 6 and trials["trial_id"].is_unique
    assert set(TRIAL_COLUMNS) <= set(trials.columns)
    assert {"p_epochs", "p_blocks", "p_width", "p_lr", "p_zoom"} <= set(trials.columns)
    assert set(EPOCH_COLUMNS) <= set(epochs.columns)
    assert set(trials["status"]) <= {"completed", "stopped", "errored"}
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    per_trial = epochs.groupby("trial_id")["epoch"].agg(["count", "max"])
    for _, t in trials.iterrows():
        assert per_trial.loc[t.trial_id, "count"] == per_trial.loc[t.trial_id, "max"] == t.epochs_run
        assert t.epochs_run <= t.p_epochs and 0 <= t.best_val_auc <= 1
    assert (trials["status"] == "completed").eq(trials["epochs_run"] == trials["p_epochs"]).all()
    assert trials["node_id"].notna().all() and trials["data_nodes"].str.len().gt(0).all()
    assert trials["device"].eq("cpu").all()  # no --gpus-per-trial: every trial trained on the CPU


@pytest.mark.slow
def test_asha_stopped_some_trials_early(tiny_run):
    trials = pd.read_parquet(tiny_run / "trials.parquet")
    assert (trials["status"] == "stopped").any(), trials[["trial_id", "status", "epochs_run", "p_epochs"]]
    assert trials["epochs_run"].nunique() > 1


@pytest.mark.slow
def test_trial_rows_match_tunes_result_grid(tiny_run):
    # Tune's own record of each trial: params.json and one result.json line per report
    trials = pd.read_parquet(tiny_run / "trials.parquet").set_index("trial_id")
    dirs = _trial_dirs(tiny_run)
    assert len(dirs) == len(trials)
    for d in dirs:
        rows = [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
        params = json.loads((d / "params.json").read_text())
        row = trials.loc[rows[0]["trial_id"]]
        assert row.epochs_run == len(rows)
        assert row.best_val_auc == pytest.approx(max(r["val_auc"] for r in rows))
        assert row.p_lr == pytest.approx(params["lr"]) and row.p_blocks == params["blocks"]


@pytest.mark.slow
def test_run_json_and_best_folder(tiny_run):
    run = json.loads((tiny_run / "run.json").read_text())
    for key in ("space", "command", "data", "versions", "git_commit", "started", "finished", "seed", "overhead"):
        assert key in run, key
    assert run["status"] == "finished" and run["seed"] == 1
    assert run["data"]["splits"]["method"] and run["versions"]["ray"] == "2.60.0"
    best = tiny_run / "best"
    for f in ("config.json", "weights.safetensors", "model.onnx", "model.pt", "model.json", "report.html"):
        assert (best / f).is_file(), f
    trials = pd.read_parquet(tiny_run / "trials.parquet")
    # by default the search ships a greedy ensemble of up to three picks over its best trials
    assert run["export"]["ensemble"] == 3
    config = json.loads((best / "config.json").read_text())
    card = json.loads((best / "model.json").read_text())
    # (no "ensemble" section: no other trial trained all its epochs, so there was nothing to choose from)
    picked = card.get("ensemble", {"picked": {trials.iloc[0]["trial_id"]: 1}})["picked"]
    assert sum(picked.values()) <= 3 and trials.iloc[0]["trial_id"] in picked  # the greedy starts from the winner
    status = trials.set_index("trial_id")["status"]
    assert all(status[t] == "completed" for t in picked if t != trials.iloc[0]["trial_id"])  # none ASHA stopped
    if config.get("kind") == "ensemble":
        params = _trial_params(tiny_run)
        assert {m["trial_id"] for m in config["members"]} == set(picked) and len(picked) > 1
        for m in config["members"]:  # each member's training settings, for stability to retrain it
            assert TrialConfig.from_dict(m["trial_config"]) == params[m["trial_id"]]
    else:
        assert config["trial_id"] == trials.iloc[0]["trial_id"] and list(picked) == [config["trial_id"]]


@pytest.mark.slow
def test_the_exported_report_renders_in_a_browser(tiny_run, browser):
    """report.html as a person sees it (headless Chromium): no console error, every picture decoded, the
    metric tables and the card's threshold shown; the saliency maps too, since the search scored a test split."""
    facts = check_report(browser, tiny_run / "best" / "report.html")
    assert len(facts["images"]) == 7 and "saliency.png" in {img["alt"] for img in facts["images"]}


@pytest.mark.slow
def test_a_search_uses_the_ray_its_process_runs_and_leaves_it_running(tiny_run, module_ray):
    import ray

    assert ray.is_initialized() and ray.get_runtime_context().gcs_address == module_ray


@pytest.mark.slow
def test_a_second_search_into_the_same_folder_is_refused(tiny_run, capsys):
    rc = main(
        ["--data", "synthetic:300", "--space", str(_space(tiny_run.parent.parent)), "--results", str(tiny_run.parent)]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--resume" in err and "Traceback" not in err


def _as_winner(run, tiny_run, kind: str) -> dict:
    """Write run/best/config.json as the best trial alone or as an even ensemble of the best two (the card
    stays the exported model's: stability reads its splits' fingerprints, threshold rule and metrics)."""
    trials = pd.read_parquet(tiny_run / "trials.parquet").dropna(subset=["best_metric"])
    params = _trial_params(tiny_run)
    top = list(trials["trial_id"].iloc[: 1 if kind == "single" else 2])
    if kind == "single":
        config = {**params[top[0]].to_dict(), "trial_id": top[0], "best_epoch": int(trials.iloc[0]["best_epoch"])}
    else:
        members = [
            {
                "trial_id": t,
                "weight": 0.5,
                "config": build_model(**model_sizes(params[t])).config.to_dict(),
                "trial_config": params[t].to_dict(),
            }
            for t in top
        ]
        config = {"kind": "ensemble", "image_size": 32, "in_channels": 1, "members": members}
    (run / "best" / "config.json").write_text(json.dumps(config))
    return {"config": config, "members": [params[t] for t in top]}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["single", "ensemble"])
def test_stability_retrains_the_winner_with_other_seeds_on_the_same_splits(tiny_run, tmp_path, capsys, kind):

    from safetensors.numpy import load_file

    from xray_ray.studies import stability

    run = tmp_path / "tiny"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("tune"))
    card = json.loads((run / "best" / "model.json").read_text())
    winner = _as_winner(run, tiny_run, kind)
    seeds = ["5", "6"] if kind == "single" else ["5"]  # an ensemble's replica trains each member: one seed will do
    assert (
        stability.main(["--run", str(run), "--seeds", *seeds, "--cache", str(tmp_path / "cache"), "--n-boot", "20"])
        == 0
    )
    table = pd.read_parquet(run / "stability.parquet")
    summary = json.loads((run / "stability.json").read_text())
    assert list(table["source"]) == ["search"] + ["replica"] * len(seeds)
    assert list(table["seed"]) == [1, *map(int, seeds)]
    search = table.iloc[0]
    assert search["test_accuracy"] == pytest.approx(card["metrics"]["test"]["at_threshold"]["accuracy"])
    replicas = table.iloc[1:]
    # FIFO: every member of every replica trains all its epochs
    assert (replicas["epochs_run"] == max(c.epochs for c in winner["members"])).all()
    if len(seeds) > 1:
        assert summary["spread_points"]["test_accuracy"] == pytest.approx(
            100 * (replicas["test_accuracy"].max() - replicas["test_accuracy"].min())
        )
    expected = {k: v for k, v in winner["config"].items() if k not in ("trial_id", "best_epoch")}
    assert summary["config"] == (expected if kind == "single" else winner["config"])
    # a replica is each member under one seed: its trial ids name every member
    assert all(len(t.split(",")) == len(winner["members"]) for t in replicas["trial_id"])
    # other seeds or other members, other networks: their best weights differ
    weights = sorted((run / "stability" / "tune").glob("*/checkpoint_*/best.safetensors"))
    by_trial = {}
    for w in weights:
        by_trial[w.parent.parent.name] = w
    assert len(by_trial) == len(seeds) * len(winner["members"]) == 2
    a, b = (load_file(str(w)) for w in by_trial.values())
    assert any(a[k].shape != b[k].shape or not (a[k] == b[k]).all() for k in a if k in b) or a.keys() != b.keys()
    out = capsys.readouterr().out
    if len(seeds) > 1:
        assert f"spread over the {len(seeds)} replicas" in out and summary["within_target"] in (True, False)
    else:  # no spread from one replica: said so, not printed as NaN
        assert "one replica: a spread needs two seeds" in out and summary["within_target"] is None
    # asking for other seeds over an unfinished or finished set is refused, in one sentence
    assert stability.main(["--run", str(run), "--seeds", "7", "--cache", str(tmp_path / "cache")]) == 2
    assert "delete that folder" in capsys.readouterr().err


def test_stability_refuses_an_ensemble_that_does_not_record_its_members_training(tmp_path, capsys):
    from xray_ray.studies import stability

    (tmp_path / "best").mkdir()
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "best" / "model.json").write_text("{}")
    member = {"trial_id": "a", "weight": 1.0, "config": {"image_size": 32}}
    (tmp_path / "best" / "config.json").write_text(json.dumps({"kind": "ensemble", "members": [member]}))
    assert stability.main(["--run", str(tmp_path), "--seeds", "5"]) == 2
    err = capsys.readouterr().err
    assert "--resume --export-only" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_stability_refuses_a_folder_without_an_exported_run(tmp_path, capsys):
    from xray_ray.studies import stability

    assert stability.main(["--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "run.json not found" in err and "Traceback" not in err


def test_overhead_leaves_the_idle_tail_out_of_the_busy_share():
    from xray_ray.search.tables import overhead

    # trial a: epochs end at 5 and 10 (5 s each, 4 s inside steps); trial b: one epoch ending at 4
    epochs = pd.DataFrame(
        {
            "trial_id": ["a", "a", "b"],
            "epoch": [1, 2, 1],
            "ended_at": [5.0, 10.0, 4.0],
            "seconds": [5.0, 5.0, 4.0],
            "step_seconds": [3.5, 3.5, 3.0],
            "eval_seconds": [0.5, 0.5, 0.5],
        }
    )
    o = overhead(epochs, wall=12.0, concurrency=2)
    assert o["slot_seconds"] == 24.0 and o["inside_steps_seconds"] == pytest.approx(11.5)
    # both started at 0; after b ended at 4 its slot had nothing to run until a ended at 10
    assert o["idle_tail_slot_seconds"] == pytest.approx(6.0)
    assert o["share_outside"] == pytest.approx(1 - 11.5 / 24)
    assert o["share_outside_busy"] == pytest.approx(1 - 11.5 / 18)


@pytest.mark.slow
def test_trials_hand_their_worker_processes_on(tiny_run):
    """reuse_actors: 6 trials, 2 at a time, run in fewer than 6 worker processes (each import of torch saved)."""
    pids = {
        json.loads(f.read_text().splitlines()[0])["trial_id"]: json.loads(f.read_text().splitlines()[0])["pid"]
        for f in (tiny_run / "tune").glob("*/result.json")
    }
    assert len(pids) == 6 and len(set(pids.values())) < 6, pids


@pytest.mark.slow
def test_local_cpu_runs_share_few_augmentation_workers(tiny_run):
    from xray_ray.search.ray_setup import RayOptions, data_slots

    def ns(**kw):
        return RayOptions(**{"address": None, "gpus_per_trial": 0.0, "cpus_per_trial": 1.0, "data_tasks": 1, **kw})

    assert data_slots(ns(), 2) == 1 and data_slots(ns(), 8) == 4 and data_slots(ns(data_tasks=2), 8) == 8
    assert data_slots(ns(cpus_per_trial=2.0), 8) == 2  # 4 trials
    assert data_slots(ns(gpus_per_trial=0.25), 16) is None  # GPU trials consume far faster
    assert data_slots(ns(address="auto"), 16) is None  # a cluster's nodes do not have the resource
    run = json.loads((tiny_run / "run.json").read_text())
    assert run["resources"]["augment_slots"] == data_slots(ns(), os.cpu_count())


def _search_in_process(tmp_path, capsys, space_text: str, *flags: str) -> tuple[int, str, str]:
    """main() on the module's Ray: (exit status, stdout, stderr)."""
    space = tmp_path / "space.yaml"
    space.write_text(space_text)
    args = ["--data", "synthetic:60", "--space", str(space), "--results", str(tmp_path / "results")]
    rc = main([*args, "--cache", str(tmp_path / "cache"), "--no-export", *flags])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow  # a real search on Ray
def test_a_space_of_constants_trains_its_configuration_as_seeded_replicas(tmp_path, capsys, module_ray):
    """Issue 15 #12: no searched parameter used to crash OptunaSearch; now each trial is the same config."""
    rc, _, err = _search_in_process(
        tmp_path,
        capsys,
        "name: one\nspace:\n  image_size: 32\n  blocks: 2\n  epochs: 1\n  width: 4\n  double_conv: false\n",
        "--num-samples",
        "2",
        "--seed",
        "5",
    )
    assert rc == 0, err[-3000:]
    run_dir = tmp_path / "results" / "one"
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert len(trials) == 2 and (trials["status"] == "completed").all() and (trials["epochs_run"] == 1).all()
    params = [json.loads((d / "params.json").read_text()) for d in _trial_dirs(run_dir)]
    assert sorted(p["seed"] for p in params) == [5, 6]  # replicas: the run's seed + i
    assert all(
        {k: v for k, v in p.items() if k != "seed"} == {k: v for k, v in params[0].items() if k != "seed"}
        for p in params
    )


@pytest.mark.slow  # a real search on Ray
def test_a_search_whose_every_trial_errored_exits_2_with_the_reason(tmp_path, capsys, module_ray):
    """Issue 15: every trial NaN (lr 1e20) used to end with exit 0, 'done' and no model."""
    rc, out, err = _search_in_process(
        tmp_path,
        capsys,
        "name: nan\nspace:\n  image_size: 32\n  blocks: 2\n  epochs: 1\n  width: 4\n"
        "  lr: {type: float, low: 1.0e+19, high: 1.0e+20, log: true}\n"
        "searcher: {algorithm: random, num_samples: 2}\nscheduler: {algorithm: fifo}\n",
        "--max-failures",
        "0",
    )
    assert rc == 2, err[-3000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("error: every trial failed (2 of 2)") and "lower the learning rate" in last, last
    assert "done in" not in out
    run_dir = tmp_path / "results" / "nan"
    trials = pd.read_parquet(run_dir / "trials.parquet")
    assert len(trials) == 2 and (trials["status"] == "errored").all()
    assert (run_dir / "epochs.parquet").is_file() and not (run_dir / "best").exists()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "failed" and run["error"] == last.removeprefix("error: ")


@pytest.mark.parametrize(
    "started, says", [(False, "nothing to resume"), (True, "Resume with: python -m xray_ray.search")]
)
def test_main_learns_from_the_interrupt_whether_the_run_can_be_resumed(monkeypatch, capsys, started, says):
    from xray_ray.search import command as search

    def interrupted(opts):
        e = KeyboardInterrupt()
        if started:
            e.run_started = True  # as run() sets it once run.json is written
        raise e

    monkeypatch.setattr(search, "run", interrupted)
    assert search.main(["--name", "x"]) == 130
    err = capsys.readouterr().err
    assert says in err and ("--name x --resume" in err) == started
