"""`xray-ray ablation`: one configuration, each idea on or off, several seeds each, scored the same way."""

import json

import pandas as pd
import pytest
import yaml

from xray_ray.errors import UserError
from xray_ray.studies.ablation import load_arms, main, markdown, summarize_runs

BASE = {"image_size": 32, "blocks": 2, "double_conv": False, "width": 4, "fc": [], "epochs": 1, "batch_size": 16}


def arms_file(tmp_path, arms, base=BASE):
    path = tmp_path / "arms.yaml"
    path.write_text(
        yaml.safe_dump(
            {"name": "tiny", "data": {"val_fraction": 0.2, "test_fraction": 0.2}, "base": base, "arms": arms}
        )
    )
    return path


def test_every_arm_is_the_base_with_its_changes_and_bad_arms_are_named(tmp_path):
    spec = load_arms(arms_file(tmp_path, {"base": {}, "erase": {"erase": 0.5}}))
    assert spec["arms"]["base"]["erase"] == 0.0 and spec["arms"]["erase"]["erase"] == 0.5
    assert {k: v for k, v in spec["arms"]["erase"].items() if k != "erase"} == {
        k: v for k, v in spec["arms"]["base"].items() if k != "erase"
    }
    with pytest.raises(UserError, match="arm 'bad'"):
        load_arms(arms_file(tmp_path, {"bad": {"mixup": 5}}))
    with pytest.raises(UserError, match="does not exist"):
        load_arms(tmp_path / "missing.yaml")


def test_the_summary_gives_mean_spread_and_the_ensemble_per_arm():
    runs = pd.DataFrame(
        [{"arm": "a", "kind": "seed", "val_auc": v} for v in (0.90, 0.94, 0.92)]
        + [{"arm": "a", "kind": "ensemble", "val_auc": 0.95}]
    )
    s = summarize_runs(runs).iloc[0]
    assert s["seeds"] == 3 and s["val_auc_mean"] == pytest.approx(0.92) and s["val_auc_spread"] == pytest.approx(0.04)
    assert s["val_auc_ensemble"] == pytest.approx(0.95)
    assert "| a | 0.9200 (0.9000-0.9400); ens 0.9500 |" in markdown(summarize_runs(runs), ("val_auc",))


@pytest.mark.slow  # starts a local Ray and trains 4 tiny models
def test_an_ablation_trains_each_arm_with_each_seed_and_scores_them_alike(tmp_path, capsys):
    path = arms_file(tmp_path, {"base": {}, "mixup": {"mixup": 0.4}})
    assert (
        main(
            [
                "--data",
                "synthetic:80",
                "--arms",
                str(path),
                "--seeds",
                "1",
                "2",
                "--results",
                str(tmp_path / "out"),
                "--name",
                "abl",
            ]
        )
        == 0
    )
    out = tmp_path / "out" / "abl"
    runs = pd.read_parquet(out / "runs.parquet")
    seeds = runs[runs["kind"] == "seed"]
    assert sorted(zip(seeds["arm"], seeds["seed"])) == [("base", 1), ("base", 2), ("mixup", 1), ("mixup", 2)]
    assert (runs["kind"] == "ensemble").sum() == 2
    for col in ("val_auc", "rob_auc_min", "test_auc", "shifted_test_accuracy", "threshold_shifted_rule"):
        assert runs[col].between(0, 1).all(), col
    info = json.loads((out / "ablation.json").read_text())
    assert info["seeds"] == [1, 2] and "| base |" in info["table"] and info["versions"]["torch"]
    assert "| mixup |" in capsys.readouterr().out


@pytest.mark.slow  # starts a local Ray and trains one tiny model for 3 epochs
def test_arms_differing_only_in_keep_metric_share_one_run_and_each_keeps_its_own_epoch(tmp_path):
    base = {**BASE, "epochs": 3}
    arms = {"val_auc": {}, "rob": {"keep_metric": "rob_auc_min"}, "loss": {"keep_metric": "val_loss"}}
    spec = load_arms(arms_file(tmp_path, arms, base))
    (trained,) = spec["trained"]  # one run for the three arms
    assert spec["source"] == {arm: trained for arm in arms}
    assert spec["trained"][trained]["keep_metric"] == "rob_auc_min"  # so the battery is scored every epoch
    args = ["--data", "synthetic:80", "--arms", str(tmp_path / "arms.yaml"), "--seeds", "1"]
    assert main([*args, "--results", str(tmp_path / "out"), "--name", "sel"]) == 0
    (result,) = (tmp_path / "out" / "sel" / "tune").glob("*/result.json")
    history = pd.DataFrame([json.loads(line) for line in result.read_text().splitlines() if line.strip()])
    history = history.set_index("epoch")
    assert history["rob_auc_min"].notna().all()
    runs = pd.read_parquet(tmp_path / "out" / "sel" / "runs.parquet").set_index("arm")
    expected = {
        "val_auc": history["val_auc"].idxmax(),
        "rob": history["rob_auc_min"].idxmax(),
        "loss": history["val_loss"].idxmin(),
    }
    for arm, epoch in expected.items():
        row = runs[runs["kind"] == "seed"].loc[arm]
        assert row["best_epoch"] == epoch, arm
        # scored with that epoch's weights: the clean validation AUC is the one the trial reported then
        assert row["val_auc"] == pytest.approx(history.loc[epoch, "val_auc"], abs=1e-9), arm
