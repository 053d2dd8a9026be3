"""Result files: atomic writes, metadata inside Parquet, any pyarrow filesystem."""

import json
import os

import pandas as pd
import pytest

from xray_ray import results as R


def test_parquet_round_trip_with_metadata(tmp_path):
    df = pd.DataFrame({"trial_id": ["a", "b"], "best_val_auc": [0.9, 0.8]})
    loc = str(tmp_path / "run" / "trials.parquet")
    R.write_parquet(df, loc, {"seed": 3, "versions": R.versions()})
    back = pd.read_parquet(loc)
    pd.testing.assert_frame_equal(back, df)
    import pyarrow.parquet as pq

    meta = json.loads(pq.read_schema(loc).metadata[b"xray_ray"])
    assert meta["seed"] == 3 and meta["versions"]["torch"].startswith("2.14.1")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["trials.parquet"]  # no temp file left


def test_file_uri_and_json(tmp_path):
    uri = f"file://{tmp_path}/x/run.json"
    R.write_json({"a": 1}, uri)
    assert R.exists(uri) and R.read_json(uri) == {"a": 1}
    assert json.loads((tmp_path / "x" / "run.json").read_text()) == {"a": 1}


def test_unwritable_location_fails_early(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.access(ro, os.W_OK):  # root ignores permission bits: use a path under a file instead
            blocker = tmp_path / "file"
            blocker.write_text("x")
            target = str(blocker / "sub")
        else:
            target = str(ro / "sub")
        with pytest.raises(OSError):
            R.probe_writable(target)
    finally:
        ro.chmod(0o700)


def test_a_remote_storage_waits_out_an_outage_but_not_a_missing_file(tmp_path, monkeypatch):
    """results.PatientStorage on moto's S3 server: a write while the server is down lands once it is back;
    a missing file is an error at once; with little patience the outage is an error; the start-up probe
    never waits."""
    import socket
    import threading
    import time

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {
        "AWS_ACCESS_KEY_ID": "AKIAXRAYRAYDUMMYKEY2",
        "AWS_SECRET_ACCESS_KEY": "dummy",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }.items():
        monkeypatch.setenv(k, v)
    servers = [ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)]
    servers[0].start()
    try:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="patient")
        R.write_json({"a": 1}, "s3://patient/run/run.json")
        servers[0].stop()

        def back() -> None:
            time.sleep(8)
            servers.append(ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False))
            servers[-1].start()

        threading.Thread(target=back, daemon=True).start()
        t0 = time.monotonic()
        R.write_json({"a": 2}, "s3://patient/run/run.json")  # waits for the server
        assert time.monotonic() - t0 >= 7
        assert R.read_json("s3://patient/run/run.json") == {"a": 2}
        t0 = time.monotonic()
        with pytest.raises(FileNotFoundError):
            R.read_json("s3://patient/run/missing.json")
        assert time.monotonic() - t0 < 5  # not retried

        servers[-1].stop()
        monkeypatch.setenv(R.PATIENCE_ENV, "1")
        with pytest.raises(OSError, match="NETWORK_CONNECTION"):
            R.write_json({"a": 3}, "s3://patient/run/run.json")
        monkeypatch.setenv(R.PATIENCE_ENV, "300")
        t0 = time.monotonic()
        with pytest.raises(OSError):
            R.probe_writable("s3://patient/run")
        assert time.monotonic() - t0 < 60  # pyarrow's own few retries, not the patience
    finally:
        servers[-1].stop()
