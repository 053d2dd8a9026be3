"""Result files: atomic writes, metadata inside Parquet, any pyarrow filesystem."""

import json

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
