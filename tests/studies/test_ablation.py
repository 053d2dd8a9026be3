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


@pytest.mark.slow  # starts a local Ray and trains 4 tiny models (2 trained runs x 2 seeds) for 3 epochs
def test_an_ablation_trains_each_arm_with_each_seed_and_scores_them_alike(tmp_path, capsys):
    """Every arm with every seed, scored alike; and the arms that differ only in `keep_metric` share one
    training per seed, each scored with the weights of the epoch its own metric keeps."""
    arms = {
        "base": {},
        "mixup": {"mixup": 0.4},
        "rob": {"keep_metric": "rob_auc_min"},
        "loss": {"keep_metric": "val_loss"},
    }
    spec = load_arms(arms_file(tmp_path, arms, {**BASE, "epochs": 3}))
    shared = spec["source"]["base"]
    assert set(spec["trained"]) == {shared, "mixup"}  # one run for base, rob and loss; mixup trains its own
    assert spec["source"] == {"base": shared, "rob": shared, "loss": shared, "mixup": "mixup"}
    assert spec["trained"][shared]["keep_metric"] == "rob_auc_min"  # so the battery is scored every epoch
    args = ["--data", "synthetic:80", "--arms", str(tmp_path / "arms.yaml"), "--seeds", "1", "2"]
    assert main([*args, "--results", str(tmp_path / "out"), "--name", "abl"]) == 0
    out = tmp_path / "out" / "abl"
    runs = pd.read_parquet(out / "runs.parquet")
    seeds = runs[runs["kind"] == "seed"]
    assert sorted(zip(seeds["arm"], seeds["seed"])) == sorted((a, s) for a in arms for s in (1, 2))
    assert (runs["kind"] == "ensemble").sum() == len(arms)
    for col in ("val_auc", "rob_auc_min", "test_auc", "shifted_test_accuracy", "threshold_shifted_rule"):
        assert runs[col].between(0, 1).all(), col
    info = json.loads((out / "ablation.json").read_text())
    assert info["seeds"] == [1, 2] and "| base |" in info["table"] and info["versions"]["torch"]
    assert "| mixup |" in capsys.readouterr().out

    checked = set()
    for trial in (out / "tune").glob("*/params.json"):
        params = json.loads(trial.read_text())
        if params["arm"] != shared:
            continue
        result = trial.parent / "result.json"
        history = pd.DataFrame([json.loads(line) for line in result.read_text().splitlines() if line.strip()])
        history = history.set_index("epoch")
        assert history["rob_auc_min"].notna().all()
        expected = {
            "base": history["val_auc"].idxmax(),
            "rob": history["rob_auc_min"].idxmax(),
            "loss": history["val_loss"].idxmin(),
        }
        mine = seeds[seeds["seed"] == params["seed"]].set_index("arm")
        for arm, epoch in expected.items():
            assert mine.loc[arm, "best_epoch"] == epoch, (arm, params["seed"])
            # scored with that epoch's weights: the clean validation AUC is the one the trial reported then
            assert mine.loc[arm, "val_auc"] == pytest.approx(history.loc[epoch, "val_auc"], abs=1e-9), arm
        checked.add(params["seed"])
    assert checked == {1, 2}
