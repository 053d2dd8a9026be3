"""Beyond one machine: the search on a real two-node Ray cluster, with token authentication, and on S3.

Both Ray nodes run on this machine, each started by `ray start --block` in its own process group, with
a token made for this test (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH). S3 is moto's S3 server on
127.0.0.1, reached through AWS_ENDPOINT_URL exactly as a real bucket is reached through the AWS
defaults. The search runs unchanged as `python -m xray_ray.search --address ...`; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import saved_trials, write_kaggle_tree
from xray_ray import results as R
from xray_ray.search.tuner import checkpoint_whole

# Tests that start a two-node Ray cluster are marked slow one by one; the pure unit test runs in `make test-fast`.
ROOT = Path(__file__).resolve().parents[2]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the venv's own ray CLI, never a PATH lookup
BUCKET = "xray-test"
# Dummy credentials: moto accepts any; the test checks that neither string is written to the bucket.
ACCESS_KEY = "AKIAXRAYRAYDUMMYKEY1"
SECRET_KEY = "xrayRayDummySecretKey0123456789abcdefXYZ"

TINY_SPACE = {
    "name": "cluster",
    "space": {
        "image_size": 32,
        "epochs": 2,
        "blocks": 1,
        "double_conv": False,
        "width": {"type": "categorical", "choices": [4, 8]},
        "head": "gap",
        "fc": [8],
        "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
        "batch_size": 64,
    },
    "searcher": {"algorithm": "optuna", "num_samples": 4, "max_concurrent": 2, "seed": 0},
    "scheduler": {"algorithm": "fifo", "metric": "val_auc"},
    "data": {"val_fraction": 0.2, "test_fraction": 0.2},
}
# One CPU per node and one per trial: the two concurrent trials cannot share a node, so both nodes train.
# Augmentation tasks reserve no CPU (they would wait forever behind trials holding every CPU); Ray Data
# spreads them over the nodes, and each task records the node it really ran on.
PLACEMENT = ["--cpus-per-trial", "1", "--data-cpus", "0"]


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # what every node, and a driver joining them, has in its environment
    head_id: str
    worker_id: str
    s3_endpoint: str
    tmp: Path
    nodes: list[subprocess.Popen]  # the `ray start --block` processes: head first
    join: list[str]  # the arguments that start one more node of this cluster


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextmanager
def two_nodes(s3_server: str, tmp: Path) -> Iterator[Cluster]:
    """A head (1 CPU, resource 'head') and a second node (1 CPU), token auth on; both stopped afterwards."""
    token_file = tmp / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN") and not k.startswith("AWS_")
    }
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stop now, not after Ray's 30 s drain wait
            "RAY_USAGE_STATS_ENABLED": "0",
            "XRAY_RAY_CACHE": str(tmp / "cache"),
            # As rayinit.init_ray does for a local Ray: keep idle workers (torch imported) for the next trial's
            # augmentation instead of killing them at once, which a 1-CPU node does by default (~10 s each here).
            "RAY_idle_worker_killing_time_threshold_ms": "600000",
            "RAY_num_workers_soft_limit": "4",
            **_aws_env(s3_server),
        }
    )
    # Short, because Ray's unix sockets live under it and socket paths are limited to 107 bytes.
    ray_tmp = Path(tempfile.mkdtemp(prefix="xrc", dir="/tmp"))
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--disable-usage-stats", f"--temp-dir={ray_tmp}"]
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(
            _start_node(
                ["--head", f"--port={port}", '--resources={"head": 1}', "--include-dashboard=false", *common],
                env,
                tmp / "head.log",
            )
        )
        nodes.append(_start_node([f"--address={address}", *common], env, tmp / "worker.log"))
        ids = _wait_for_nodes(address, env, 2)
        head = [n for n, is_head in ids.items() if is_head]
        assert len(head) == 1, ids
        worker = [n for n in ids if n != head[0]]
        join = [f"--address={address}", *common]
        yield Cluster(address, env, head[0], worker[0], s3_server, tmp, nodes, join)
    finally:
        for proc in reversed(nodes):
            _stop_node(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    with two_nodes(s3_server, tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture(scope="module")
def space_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "cluster.yaml"
    path.write_text(yaml.safe_dump(TINY_SPACE))
    return path


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_token_auth_guards_the_cluster(cluster):
    """The cluster answers its own token only: a client or a node with a wrong token, or none, is refused."""
    ok = _ray_status(cluster.address, cluster.env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "2.0 CPU" in ok.stdout and "head" in ok.stdout
    others = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    wrong_token = {**others, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    for env in (wrong_token, {**others, "RAY_AUTH_MODE": "disabled"}):
        refused = _ray_status(cluster.address, env)
        assert refused.returncode != 0
        assert "InvalidAuthToken" in refused.stdout + refused.stderr, refused.stdout + refused.stderr

    # A third node with a wrong token cannot join (one connection attempt instead of Ray's ~20 retries).
    log = cluster.tmp / "intruder.log"
    once = {**wrong_token, "RAY_gcs_server_port_wait_time_s": "1"}
    with open(log, "wb") as out:
        intruder = subprocess.Popen(
            [*RAY, "start", "--block", f"--address={cluster.address}", "--num-cpus=1", "--disable-usage-stats"],
            env=once,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 90
    while not _exited(intruder.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    joined = not _exited(intruder.pid)
    _stop_node(intruder)
    assert not joined and intruder.returncode != 0, log.read_text(errors="replace")[-3000:]
    assert "InvalidAuthToken" in log.read_text(errors="replace")
    assert len(_wait_for_nodes(cluster.address, cluster.env, 2)) == 2


@pytest.mark.slow
def test_multi_node_refuses_node_local_results(cluster, space_file):
    results = cluster.tmp / "local-results"
    proc = _search(
        cluster,
        "--data",
        "synthetic:300",
        "--space",
        str(space_file),
        "--results",
        str(results),
        *PLACEMENT,
        "--no-export",
    )
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr  # Ray's INFO lines go there too
    message = errors[0]
    assert message.startswith("error: this cluster has 2 nodes but --results")
    assert "node-local" in message and "s3://" in message and "--allow-local-results" in message
    assert message.endswith(".") and message.count(". ") == 0  # one sentence
    assert not (results / "cluster" / "tune").exists()  # refused before Tune started
    assert not (results / "cluster" / "run.json").exists()  # so the corrected command needs no --resume


def test_file_uris_count_as_node_local():
    """file:// is each node's own disk, like a plain path: only --allow-local-results accepts it on a cluster."""
    assert R.node_local("results") and R.node_local("/mnt/nfs/results") and R.node_local("file:///tmp/r")
    assert R.node_local("FILE:///tmp/r")
    assert not R.node_local("s3://bucket/results") and not R.node_local("gs://bucket/results")
    from xray_ray.search.command import node_local_refusal

    assert "is a node-local path" in node_local_refusal("file:///tmp/r", 2, False)
    assert node_local_refusal("file:///tmp/r", 2, True) is None  # the user says it is a shared mount
    assert node_local_refusal("results", 1, False) is None and node_local_refusal("s3://b/r", 3, False) is None


@pytest.mark.slow
def test_a_search_on_both_nodes_reads_and_writes_s3(cluster, space_file):
    """Images read from S3, results and checkpoints written there, trials and augmentation on both nodes."""
    s3 = _boto3_client(cluster.s3_endpoint)
    s3.create_bucket(Bucket=BUCKET)
    tree = write_kaggle_tree(cluster.tmp / "kaggle" / "chest_xray")
    for f in sorted(p for p in tree.rglob("*") if p.is_file()):
        s3.upload_file(str(f), BUCKET, f"chest_xray/{f.relative_to(tree).as_posix()}")

    proc = _search(
        cluster,
        "--data",
        f"s3://{BUCKET}/chest_xray",
        "--space",
        str(space_file),
        "--results",
        f"s3://{BUCKET}/results",
        *PLACEMENT,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    fs = _s3_fs(cluster.s3_endpoint)
    run = f"{BUCKET}/results/cluster"
    trials = pq.read_table(f"{run}/trials.parquet", filesystem=fs).to_pandas()
    epochs = pq.read_table(f"{run}/epochs.parquet", filesystem=fs).to_pandas()
    with fs.open_input_stream(f"{run}/run.json") as f:
        info = json.loads(f.read())
    both = {cluster.head_id, cluster.worker_id}
    assert len(trials) == 4 and (trials["status"] == "completed").all() and len(epochs) == 8
    assert set(trials["node_id"]) == both, trials[["trial_id", "node_id"]]  # both nodes wrote checkpoints
    data_nodes = {n for cell in trials["data_nodes"] for n in cell.split(",")}
    assert data_nodes == both, trials[["trial_id", "node_id", "data_nodes"]]  # and ran augmentation tasks
    assert set(epochs["node_id"]) == both and info["resources"]["address"] == cluster.address
    assert info["status"] == "finished" and info["data"]["spec"] == f"s3://{BUCKET}/chest_xray"
    assert info["data"]["source"]["images"] == sum(1 for p in tree.rglob("*") if p.is_file())
    assert info["best"]["trial_id"] in set(trials["trial_id"])
    for uri in trials["checkpoint_path"]:  # recorded as a URI, not as a path that looks local
        assert uri.startswith(f"s3://{run}/tune/"), uri
        assert fs.get_file_info(f"{uri.removeprefix('s3://')}/state.pt").type == pafs.FileType.File, uri

    import onnx

    with fs.open_input_stream(f"{run}/best/model.onnx") as f:
        onnx.checker.check_model(onnx.load_from_string(f.read()))
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="results/")
        for o in page.get("Contents", [])
    ]
    tune = [k for k in keys if k.startswith("results/cluster/tune/")]
    assert any(re.fullmatch(r"results/cluster/tune/experiment_state-[^/]+\.json", k) for k in tune), tune
    trial_dirs = {k.split("/")[3] for k in tune if "/checkpoint_" in k}
    assert len(trial_dirs) == 4, sorted(trial_dirs)
    for key in keys:  # nothing the run wrote holds the credentials it used
        body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        assert ACCESS_KEY.encode() not in body and SECRET_KEY.encode() not in body, key


# 4 trials of 6 epochs, two at a time (one on each node); the second node is killed while two trials both
# have at least two epochs to go, so it always takes a running trial with it
EPOCHS = 6
LOST_SPACE = {**TINY_SPACE, "name": "lost", "space": {**TINY_SPACE["space"], "epochs": EPOCHS}}
# The fault-tolerance searches below need trials that are still training when the test strikes, on a fast quiet
# machine too (on one, 1,200 synthetic images trained 6 epochs in 5 s, faster than the driver prints them): the test
# hook (xray_ray.faults) starts each epoch SLOW_S late, which costs no CPU, where more images would cost much.
SLOW_S = 2
SLOW = {"XRAY_RAY_TESTING": "1", "XRAY_RAY_INJECT_FAULT": f"slow:epoch=*,seconds={SLOW_S}"}
FAULT_DATA = "synthetic:300"
LOST_BUCKET = "xray-lost"


def _epochs_printed(lines: list[str]) -> dict[str, tuple[int, int]]:
    """{trial: (its last epoch, of how many)} as the driver's progress lines print them."""
    return {t: (int(e), int(n)) for line in lines for t, e, n in re.findall(r"trial (\w+) epoch (\d+)/(\d+)", line)}


def _drain(proc: subprocess.Popen, seen: list[str]) -> threading.Thread:
    """The driver's further output appended to `seen` in the background (a full pipe would block the driver)."""
    thread = threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True)
    thread.start()
    return thread


def _search_until_both_trained(cluster: Cluster, args: list[str]) -> tuple[subprocess.Popen, list[str]]:
    """The search started as a driver; returns once two trials are both half-way (one on each node)."""
    proc = subprocess.Popen(
        _driver(cluster, *args),
        env=cluster.env | SLOW,
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    # one CPU a node and a trial: two trials that have reported and not finished run on the two nodes
    seen, last, deadline = [], {}, time.monotonic() + 300
    while sum(0 < e <= n - 2 for e, n in last.values()) < 2 and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        last.update(_epochs_printed([line]))
    return proc, seen


def _node_pids(proc: subprocess.Popen) -> set[int]:
    """Every process of a node: its `ray start` group (raylet, object store, ...) and its workers."""
    procs = _processes()
    group = {pid for pid, (_, pgid, _) in procs.items() if pgid == proc.pid}
    return group | {pid for pid, (ppid, pgid, _) in procs.items() if ppid in group and pgid != proc.pid}


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL every process of a node at once, as a reclaimed spot instance loses them."""
    _signal_all(_node_pids(proc), signal.SIGKILL)
    proc.wait()


def _kill_when_a_trial_must_move(node: subprocess.Popen, node_id: str, fs, tune: str, seen: list[str]) -> list[str]:
    """SIGKILL every process of `node` at a moment when a trial on it has epochs to go and a checkpoint the
    driver knows of, so that the kill must move that trial; returns those trials (none: the node is left up).

    The driver prints epochs late on a loaded machine: by the time it says two trials are half-way, the one
    on this node may have finished, and the next one there not reported yet (killed then, it starts again
    from scratch and nothing moves; with --max-failures 0 nothing errors). So the node is stopped first
    (SIGSTOP: what it trains cannot change) and its trials are read from their newest checkpoints on S3
    (history.json: each epoch's node); a trial the driver has printed a later epoch than the first of has a
    checkpoint it knows of (_trials_on_node). Otherwise the node goes on (SIGCONT, well within Ray's health
    checks) and is looked at again."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        pids = _node_pids(node)
        _signal_all(pids, signal.SIGSTOP)
        found = _trials_on_node(fs, tune, node_id, seen)
        if found:
            _signal_all(pids | _node_pids(node), signal.SIGKILL)
            node.wait()
            return found
        _signal_all(pids, signal.SIGCONT)
        time.sleep(0.5)
    return []


def _trials_on_node(fs, tune: str, node_id: str, seen: list[str]) -> list[str]:
    """Trials whose newest checkpoint on S3 was trained on `node_id` before their last epoch, and of which
    the driver has printed an epoch after the first (and not the last).

    Printed epoch 2 or later, not 1: Tune registers an epoch's checkpoint only when the trial's actor answers
    the save the driver asks for after printing the epoch, and asks for the next epoch only then. So a trial
    printed at epoch e >= 2 has checkpoint e - 1 registered at least; one killed right after printing epoch 1
    has none, and rightly starts again from scratch elsewhere (nothing moves)."""
    printed = {t: e for t, (e, _) in _epochs_printed(list(seen)).items()}
    out = []
    for d in fs.get_file_info(pafs.FileSelector(tune, allow_not_found=True)):
        if d.type != pafs.FileType.Directory:
            continue
        ids = [t for t, e in printed.items() if t in d.base_name and 2 <= e < EPOCHS]
        checkpoints = sorted(
            c.path
            for c in fs.get_file_info(pafs.FileSelector(d.path))
            if c.type == pafs.FileType.Directory and c.base_name.startswith("checkpoint_")
        )
        history = []
        for c in reversed(checkpoints):  # the newest one uploaded whole
            try:
                with fs.open_input_stream(f"{c}/history.json") as f:
                    history = json.loads(f.read())
                break
            except (OSError, ValueError):
                continue
        if ids and history and history[-1]["node_id"] == node_id and history[-1]["epoch"] < EPOCHS:
            out.append(ids[0])
    return out


def _lost_node_run(cluster: Cluster, space: Path, fs, name: str, *extra: str) -> tuple[int, str, list[str]]:
    """A search on both nodes whose second node is killed while a trial trains there: its exit code, its
    output, and the trials that were on the node."""
    args = [
        "--data",
        FAULT_DATA,
        "--space",
        str(space),
        "--results",
        f"s3://{LOST_BUCKET}/lost",
        "--name",
        name,
        *PLACEMENT,
        "--no-export",
        *extra,
    ]
    proc, seen = _search_until_both_trained(cluster, args)
    drain = _drain(proc, seen)
    tune = f"{LOST_BUCKET}/lost/{name}/tune"
    try:
        moving = _kill_when_a_trial_must_move(cluster.nodes[-1], cluster.worker_id, fs, tune, seen)
        assert moving, "".join(seen)[-3000:]
        proc.wait(timeout=420)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    drain.join(timeout=30)
    return proc.returncode, "".join(seen), moving


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_lost_worker_node_loses_no_trial_and_doubles_no_epoch(s3_server, tmp_path):
    """A reclaimed spot worker mid-search: its trial continues from its last checkpoint on the head; and the
    same kill with --max-failures 0 leaves errored trials (so the test can fail)."""
    _boto3_client(s3_server).create_bucket(Bucket=LOST_BUCKET)
    space = tmp_path / "lost.yaml"
    space.write_text(yaml.safe_dump(LOST_SPACE))
    fs = _s3_fs(s3_server)

    def tables(name: str):
        run = f"{LOST_BUCKET}/lost/{name}"
        return tuple(pq.read_table(f"{run}/{t}.parquet", filesystem=fs).to_pandas() for t in ("trials", "epochs"))

    (tmp_path / "c").mkdir()
    with two_nodes(s3_server, tmp_path / "c") as cluster:
        rc, log, lost = _lost_node_run(cluster, space, fs, "survives")
        assert rc == 0, log[-4000:]
        trials, epochs = tables("survives")
        assert len(trials) == 4 and (trials["status"] == "completed").all(), trials[["trial_id", "status"]]
        assert not epochs.duplicated(["trial_id", "epoch"]).any() and len(epochs) == 24
        # the trial that was on the lost node: its first epochs are the lost node's (not trained again, which
        # would have replaced those rows), the rest the head's, from the checkpoint in the shared storage
        nodes = epochs.sort_values("epoch").groupby("trial_id")["node_id"].agg(list)
        moved = {t: n for t, n in nodes.items() if n[0] == cluster.worker_id and n[-1] == cluster.head_id}
        assert set(lost) <= set(moved), {t: [n[:8] for n in v] for t, v in nodes.items()} | {
            "worker": cluster.worker_id[:8],
            "lost": lost,
        }
        assert all(n == sorted(n, key=lambda x: x == cluster.head_id) for n in moved.values()), moved

        cluster.nodes.append(_start_node(cluster.join, cluster.env, cluster.tmp / "worker2.log"))  # a new worker
        up = _wait_for_nodes(cluster.address, cluster.env, 2)
        cluster.worker_id = next(n for n, head in up.items() if not head and n != cluster.worker_id)
        # this run only has to show that the same kill fails a trial: two trials, one on each node, suffice
        two = tmp_path / "two.yaml"
        two.write_text(yaml.safe_dump({**LOST_SPACE, "searcher": {**LOST_SPACE["searcher"], "num_samples": 2}}))
        rc, log, lost = _lost_node_run(cluster, two, fs, "fails", "--max-failures", "0")
        trials, _ = tables("fails")
        errored = set(trials.loc[trials["status"] == "errored", "trial_id"])
        assert set(lost) <= errored, (rc, lost, trials[["trial_id", "status"]], log[-3000:])
        assert re.search(r"trials errored .* run: python -m xray_ray\.search .*--resume$", log, re.M), log[-3000:]


HEAD_BUCKET = "xray-head"


def _freeze_when_resumable(proc: subprocess.Popen, fs: pafs.S3FileSystem, tune: str, seen: list[str]) -> list[str]:
    """Stop the driver (SIGSTOP) at a moment when the experiment state it last synced to S3 lets a new head
    resume a running trial from a checkpoint; returns those trials' folders, the driver left stopped.

    Tune uploads its experiment state after each checkpoint, but in the background; with num_to_keep=1 it
    deletes a trial's previous checkpoint once the next is registered. A kill between the two leaves a state
    on S3 that names a deleted checkpoint, and the resume then trains that trial again from its first epoch
    (forget_lost_checkpoints: nothing lost or doubled, but nothing continued either). On a loaded machine the
    upload takes long enough for the kill to land there. The driver deletes checkpoints and writes the state,
    so while it is stopped the state on S3 and the checkpoints it names cannot change under the check."""
    _drain(proc, seen)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        os.kill(proc.pid, signal.SIGSTOP)
        found = _resumable(fs, tune)
        if found:
            return found
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.5)
    return []


def _resumable(fs: pafs.S3FileSystem, tune: str) -> list[str]:
    """Trials RUNNING in the newest experiment state on S3, with epochs still to go, whose checkpoint that state
    names is whole on S3 (a state can record a trial's first epoch before Tune has registered its checkpoint;
    and frozen while Tune deleted the checkpoint, the folder is there without some files: either way the resume
    rightly starts the trial again from epoch 1)."""
    names = sorted(
        i.base_name
        for i in fs.get_file_info(pafs.FileSelector(tune, allow_not_found=True))
        if i.type == pafs.FileType.File
    )
    states = [n for n in names if re.fullmatch(r"experiment_state-.+\.json", n)]
    if not states:
        return []
    try:
        with fs.open_input_stream(f"{tune}/{states[-1]}") as f:
            trials = saved_trials(f.read())
    except (OSError, ValueError):
        return []
    out = []
    for t in trials:
        named = t["checkpoint"] and checkpoint_whole(fs, f"{tune}/{t['dir']}/{t['checkpoint']}")
        if t["status"] == "RUNNING" and t["iteration"] < EPOCHS and named:
            out.append(t["dir"])
    return out


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_lost_head_resumes_on_a_new_cluster_from_the_shared_storage(s3_server, tmp_path):
    """The driver and the head node SIGKILLed mid-search (the second node then stopped: the cluster is gone);
    the resume command the search printed, run on a new cluster, finishes the search from S3: every trial
    once, no epoch lost or doubled, the trials that were running going on from their checkpoints."""
    _boto3_client(s3_server).create_bucket(Bucket=HEAD_BUCKET)
    space = tmp_path / "head.yaml"
    space.write_text(yaml.safe_dump({**LOST_SPACE, "name": "head"}))
    args = ["--data", FAULT_DATA, "--space", str(space), "--results", f"s3://{HEAD_BUCKET}/runs"]
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    with two_nodes(s3_server, tmp_path / "old") as old:
        proc, seen = _search_until_both_trained(old, [*args, *PLACEMENT, "--no-export"])
        fs = _s3_fs(s3_server)
        running = _freeze_when_resumable(proc, fs, f"{HEAD_BUCKET}/runs/head/tune", seen)
        assert running, "".join(seen)[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, which runs on the head
        proc.wait()
        _kill_node(old.nodes[0])  # the head
        old_nodes = {old.head_id, old.worker_id}
        said = [line for line in seen if "continue it with: " in line]
        assert len(said) == 1, "".join(seen)[-3000:]
        resume = shlex.split(said[0].split("continue it with: ", 1)[1])
    with two_nodes(s3_server, tmp_path / "new") as new:
        assert resume[:3] == ["python", "-m", "xray_ray.search"] and resume[-1] == "--resume", resume
        at = resume.index("--address")
        # the new cluster's address in place of the old one (with `--address auto` on the head, as
        # docs/cluster.md runs it, the printed command is run as it is)
        argv = [*resume[3:at], "--address", new.address, *resume[at + 2 :]]
        done = subprocess.run(
            [sys.executable, "-u", "-m", "xray_ray.search", *argv],
            env=new.env | SLOW,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        new_nodes = {new.head_id, new.worker_id}
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "[xray_ray] resuming" in done.stdout, done.stdout[-3000:]
    fs = _s3_fs(s3_server)
    run = f"{HEAD_BUCKET}/runs/head"
    trials = pq.read_table(f"{run}/trials.parquet", filesystem=fs).to_pandas()
    epochs = pq.read_table(f"{run}/epochs.parquet", filesystem=fs).to_pandas()
    assert len(trials) == 4 and (trials["status"] == "completed").all(), (
        trials[["trial_id", "status", "error"]].to_string(),
        done.stdout[-3000:],
    )
    assert not epochs.duplicated(["trial_id", "epoch"]).any() and len(epochs) == 24
    assert set(epochs["node_id"]) <= old_nodes | new_nodes
    # the trials that were running when the head went: their first epochs trained on the old cluster, the
    # rest on the new one from their checkpoints on S3 (trained again from epoch 1, the old rows would be gone)
    nodes = epochs.sort_values("epoch").groupby("trial_id")["node_id"].agg(list)
    moved = [n for n in nodes if n[0] in old_nodes and n[-1] in new_nodes]
    assert moved, {t: [x[:8] for x in v] for t, v in nodes.items()}
    assert all(n == sorted(n, key=lambda x: x in new_nodes) for n in moved), moved


OUTAGE_BUCKET = "xray-outage"
OUTAGE_S = 30


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_storage_outage_mid_search_is_ridden_out(tmp_path):
    """The S3 server goes away for 30 s while trials train and checkpoint to it, and comes back: the search
    carries on and ends well, every trial once, no epoch lost or doubled (without R.PatientStorage the
    checkpoint uploads fail within seconds and the trials error)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()  # moto keeps its buckets in this process: a server started again on the port serves them
    _boto3_client(endpoint).create_bucket(Bucket=OUTAGE_BUCKET)
    space = tmp_path / "outage.yaml"
    space.write_text(yaml.safe_dump({**LOST_SPACE, "name": "outage"}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    env.update(_aws_env(endpoint), XRAY_RAY_CACHE=str(tmp_path / "cache"), RAY_USAGE_STATS_ENABLED="0", **SLOW)
    cmd = [sys.executable, "-u", "-m", "xray_ray.search", "--data", FAULT_DATA, "--space", str(space)]
    cmd += ["--results", f"s3://{OUTAGE_BUCKET}/runs", "--cache", str(tmp_path / "cache"), "--no-export"]
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    lines: list[str] = []
    training = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"trial \w+ epoch 2/6", line):
                training.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert training.wait(300), "".join(lines)[-4000:]
        server.stop()  # refused connections from here on, as from an endpoint that went away
        gone = time.monotonic()
        time.sleep(OUTAGE_S)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        back = time.monotonic()
        proc.wait(timeout=600)
        reader.join(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        server.stop()
        server.start()  # for the tables below
    log = "".join(lines)
    assert proc.returncode == 0, log[-4000:]
    assert back - gone >= OUTAGE_S
    fs = _s3_fs(endpoint)
    run = f"{OUTAGE_BUCKET}/runs/outage"
    trials = pq.read_table(f"{run}/trials.parquet", filesystem=fs).to_pandas()
    epochs = pq.read_table(f"{run}/epochs.parquet", filesystem=fs).to_pandas()
    server.stop()
    assert len(trials) == 4 and (trials["status"] == "completed").all(), trials[["trial_id", "status"]]
    assert not epochs.duplicated(["trial_id", "epoch"]).any() and len(epochs) == 24
    assert all(sorted(g) == list(range(1, 7)) for g in epochs.groupby("trial_id")["epoch"].agg(list))
    assert "storage does not answer" in log and "errored" not in log, log[-4000:]  # met, and waited out


# --------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(args: list[str], env: dict[str, str], log: Path, timeout: float = 180) -> subprocess.Popen:
    """`ray start --block ARGS` in a new process group; returns once the node says it started."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*RAY, "start", "--block", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_node(proc)
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    return proc


def _stop_node(proc: subprocess.Popen, grace: float = 20) -> None:
    """SIGTERM to `ray start --block` (it stops its node), then SIGKILL whatever is left of that node.

    The group is the one this test created (start_new_session); its id stays ours while the unreaped
    `ray start` holds the pid. Ray gives each worker process a group of its own, so the node's workers
    are noted by pid and start time first; they exit with their raylet, and any that do not are killed.
    """
    if proc.returncode is not None:
        return
    procs = _processes()
    group = {pid for pid, (_, pgid, _) in procs.items() if pgid == proc.pid}
    workers = {pid: start for pid, (ppid, pgid, start) in procs.items() if ppid in group and pgid != proc.pid}
    os.kill(proc.pid, signal.SIGTERM)  # not proc.send_signal: it would reap an exited `ray start` first
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not _exited(proc.pid):
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_processes().get(p, (0, 0, ""))[2] == s for p, s in workers.items()):
        time.sleep(0.2)
    now = _processes()
    for pid, start in workers.items():
        if now.get(pid, (0, 0, ""))[2] == start:  # still that very worker, not a reused pid
            os.kill(pid, signal.SIGKILL)


def _processes() -> dict[int, tuple[int, int, str]]:
    """{pid: (parent pid, process group, start time)} from /proc (Linux)."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            out[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[19])
    return out


def _exited(pid: int) -> bool:
    """Whether a child exited, without reaping it (so its pid, and group id, are not reused yet)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _ray_status(address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*RAY, "status", "-v", "--address", address], env=env, capture_output=True, text=True, timeout=120
    )


def _wait_for_nodes(address: str, env: dict[str, str], n: int, timeout: float = 60) -> dict[str, bool]:
    """{node id: is head} from `ray status -v` once n nodes are up; the head is the node with 'head'."""
    deadline = time.monotonic() + timeout
    while True:
        out = _ray_status(address, env).stdout
        blocks = re.split(r"^Node: ", out, flags=re.M)[1:]
        ids = {b.split()[0]: bool(re.search(r"/1\.0 head$", b, flags=re.M)) for b in blocks}
        if len(ids) >= n or time.monotonic() > deadline:
            assert len(ids) == n, out
            return ids
        time.sleep(1)


def _driver(cluster: Cluster, *args: str) -> list[str]:
    """`python -u -m xray_ray.search --address <cluster> --cache <its cache> ARGS`."""
    return [
        sys.executable,
        "-u",
        "-m",
        "xray_ray.search",
        "--address",
        cluster.address,
        "--cache",
        str(cluster.tmp / "cache"),
        *args,
    ]


def _search(cluster: Cluster, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    """The search as a driver with the cluster's environment, run to its end."""
    return subprocess.run(
        _driver(cluster, *args), env=cluster.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def _aws_env(endpoint: str) -> dict[str, str]:
    """What points a process's S3 clients (pyarrow's, boto3's) at the test server, with dummy credentials."""
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def _s3_fs(endpoint: str) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem on the test server, to read back what a search wrote there."""
    return pafs.S3FileSystem(
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        region="us-east-1",
        scheme="http",
        endpoint_override=endpoint.removeprefix("http://"),
    )


def _boto3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
