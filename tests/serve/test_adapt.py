"""`xray-ray adapt`: the site check (label-free prevalence estimates, is the site's difference only its
prevalence?), the re-expressed and re-picked thresholds, and its refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REAL_DATA, model_copy, one_error_line
from xray_ray.serve import prior_shift as P
from xray_ray.serve.adapt import MIN_SITE_IMAGES, main
from xray_ray.serve.runtime import VAL_SCORES_FILE, load_exported

# ------------------------------------------------------------------ the statistics, on drawn scores


def _scores(rng, n, prevalence, neg=(1.5, 5.0), pos=(5.0, 1.5)):
    y = (rng.random(n) < prevalence).astype(np.int64)
    return y, np.where(y == 1, rng.beta(*pos, n), rng.beta(*neg, n))


@pytest.mark.parametrize("prevalence", [0.4, 0.9])
def test_a_pure_change_of_prevalence_is_recognised_and_estimated(prevalence):
    rng = np.random.default_rng(1)
    y, s = _scores(rng, 600, 0.74)
    val = P.Validation(y, s, threshold=0.5)
    _, site = _scores(rng, 500, prevalence)
    r = P.site_check(site, val, n_boot=100, seed=0)
    assert r["label_shift_plausible"], r
    assert abs(r["prevalence"]["em"] - prevalence) < 0.05 and abs(r["prevalence"]["bbse"] - prevalence) < 0.07
    lo, hi = r["prevalence"]["interval"]
    assert lo <= r["prevalence"]["em"] <= hi and hi - lo < 0.15


def test_scores_that_moved_are_not_a_change_of_prevalence():
    rng = np.random.default_rng(2)
    y, s = _scores(rng, 600, 0.74)
    val = P.Validation(y, s, threshold=0.5)
    _, site = _scores(rng, 500, 0.625, neg=(3.0, 3.0))  # the NORMAL images score higher, as elsewhere
    r = P.site_check(site, val, n_boot=100, seed=0)
    assert not r["label_shift_plausible"], r


def test_at_the_site_prevalence_the_rule_keeps_its_threshold_and_the_predictive_values_move():
    rng = np.random.default_rng(3)
    y, s = _scores(rng, 2000, 0.5)
    val = P.Validation(y, s, threshold=0.4)
    low, high = P.at_site_prevalence(val, 0.2), P.at_site_prevalence(val, 0.9)
    assert low["threshold"] == high["threshold"] == 0.4 and low["sensitivity"] == high["sensitivity"]
    assert low["ppv"] < high["ppv"] and low["npv"] > high["npv"]
    assert high["accuracy"] == pytest.approx(0.9 * high["sensitivity"] + 0.1 * high["specificity"])


def test_em_and_bbse_by_hand():
    assert P.em_prior(np.full(10, 0.5), 0.5) == pytest.approx(0.5)
    assert P.bbse_prior(0.5, 0.9, 0.9) == pytest.approx(0.5)
    assert np.isnan(P.bbse_prior(0.5, 0.5, 0.52))  # no signal in the confusion matrix


# ------------------------------------------------------------------ refusals


def _site(folder: Path, n: int, size: int = 32) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(folder / f"s{i}.png")
    return folder


def test_too_few_images_is_one_sentence(tiny_model, tmp_path, capsys):
    site = _site(tmp_path / "site", 5)
    assert main(["--model", str(tiny_model), "--images", str(site)]) == 2
    assert f"at least {MIN_SITE_IMAGES} readable images" in one_error_line(capsys.readouterr().err)


def test_a_model_without_validation_scores_cannot_be_adapted(tiny_model, tmp_path, capsys):
    old = model_copy(tiny_model, tmp_path / "old")
    (old / VAL_SCORES_FILE).unlink()
    site = _site(tmp_path / "site", 5)
    assert main(["--model", str(old), "--images", str(site)]) == 2
    assert f"has no {VAL_SCORES_FILE}" in one_error_line(capsys.readouterr().err)


def test_an_existing_out_is_refused_before_any_work(tiny_model, tmp_path, capsys):
    site = _site(tmp_path / "site", 5)
    (tmp_path / "taken").mkdir()
    assert main(["--model", str(tiny_model), "--images", str(site), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in one_error_line(capsys.readouterr().err)


def test_labelled_needs_class_folders_and_enough_of_each(tiny_model, tmp_path, capsys):
    site = _site(tmp_path / "site", 5)
    args = ["--model", str(tiny_model), "--labelled", "--out", str(tmp_path / "new"), "--images"]
    assert main([*args, str(site)]) == 2
    assert "NORMAL/ and PNEUMONIA/" in one_error_line(capsys.readouterr().err)
    _site(tmp_path / "lab" / "NORMAL", 3), _site(tmp_path / "lab" / "PNEUMONIA", 30)
    assert main([*args, str(tmp_path / "lab")]) == 2
    assert "at least 20 readable images of each class" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ on real images


# long enough for calibrated scores, which EM's estimate leans on: after 3 epochs it missed pure prior shifts
# of 0.4 and 0.9 by 0.06 and 0.11 on this machine's current libraries, while the confusion-matrix one held
EPOCHS = 4


@pytest.fixture(scope="module")
def real_model(tmp_path_factory):
    """A small CNN trained for a few epochs on the real images (seed 0), exported with its validation scores,
    and the patient-grouped test hold-out it never saw."""
    import pandas as pd
    import torch

    from xray_ray.config import TrialConfig
    from xray_ray.data.prepare import prepare
    from xray_ray.data.sources import load_source
    from xray_ray.data.splits import assign_splits
    from xray_ray.model.cnn import build_model
    from xray_ray.model.train import array_batches, make_loss, train_one_epoch
    from xray_ray.ship.export import save_config
    from xray_ray.ship.winner import finalize

    if not REAL_DATA.is_dir():
        pytest.skip(f"real data not found at {REAL_DATA}")
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("real_model")
    df, _ = assign_splits(load_source(str(REAL_DATA)).df, seed=0)
    splits = prepare(df, 48, tmp / "cache").splits
    train = splits["train"]
    model = build_model("small", image_size=48)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    loss = make_loss(TrialConfig.from_dict({"class_weighting": "balanced"}), float(train.labels.mean()))
    rng = np.random.default_rng(0)
    for _ in range(EPOCHS):
        order = rng.permutation(len(train))
        train_one_epoch(model, array_batches(train.images[order], train.labels[order], 64), opt, loss_fn=loss)
    out = tmp / "best"
    finalize(
        out, model, {k: splits[k] for k in ("val", "test")}, {"seed": 0}, pd.DataFrame(), pd.DataFrame(), n_boot=50
    )
    save_config(model.config, out / "config.json")  # as the search's export writes it beside the weights
    return out, splits["test"]


def _write_site(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"scan_{i:04d}.png")
    return folder


def _resampled(test, prevalence: float, n: int, seed: int, replace: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A site of n hold-out images at the given prevalence; with `replace` False, n distinct images (a pure
    change of prevalence: copies of the hold-out's few NORMAL images, 134, would make the site's scores differ
    from validation's by that small sample's own noise, which a change of prevalence does not have)."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(test.labels == 1), np.flatnonzero(test.labels == 0)
    n_pos = int(round(prevalence * n))
    idx = np.concatenate([rng.choice(pos, n_pos, replace=replace), rng.choice(neg, n - n_pos, replace=replace)])
    return test.images[idx], test.labels[idx]


def _adapt(capsys, *args: str) -> dict:
    rc = main([*args, "--json", "--n-boot", "100"])
    out = capsys.readouterr()
    assert rc in (0, 1), out.err
    return json.loads(out.out)


def _accuracy(model_dir: Path, images: np.ndarray, labels: np.ndarray) -> float:
    m = load_exported(model_dir)
    p = m.predict(images.astype(np.float32)[:, None] / 255.0)
    return float(np.mean((p >= m.threshold) == labels))


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("prevalence", [0.4, 0.9])
def test_adapt_on_a_pure_prior_shift_of_real_images(real_model, tmp_path, capsys, prevalence):
    model_dir, test = real_model
    # as many images as the hold-out's 393 PNEUMONIA and 134 NORMAL images allow, none twice
    n = {0.4: 220, 0.9: 400}[prevalence]
    images, labels = _resampled(test, prevalence, n, seed=int(prevalence * 10), replace=False)
    site = _write_site(tmp_path / "site", images)
    r = _adapt(capsys, "--model", str(model_dir), "--images", str(site), "--out", str(tmp_path / "adapted"))
    assert r["label_shift_plausible"], r
    assert abs(r["prevalence"]["em"] - prevalence) < 0.05, r["prevalence"]
    adapted = tmp_path / "adapted"
    card = json.loads((adapted / "model.json").read_text())
    assert card["adaptation"]["method"].startswith("prior shift") and card["threshold"]["adapted_from"] > 0
    assert card["adaptation"]["at_site_prevalence"]["prevalence"] == pytest.approx(r["prevalence"]["em"])
    assert _accuracy(adapted, images, labels) >= _accuracy(model_dir, images, labels) - 0.005


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("shift", ["gamma_0.6", "contrast_0.6", "zoom_out_0.8", "zoom_in_1.25"])
def test_adapt_says_a_shifted_site_is_not_a_prior_shift(real_model, tmp_path, capsys, shift):
    from xray_ray.model.robustness import apply_shift

    model_dir, test = real_model
    images, _ = _resampled(test, 0.625, 400, seed=7)
    site = _write_site(tmp_path / "site", apply_shift(shift, images, seed=0))
    out = tmp_path / "adapted"
    r = _adapt(capsys, "--model", str(model_dir), "--images", str(site), "--out", str(out))
    assert not r["label_shift_plausible"], (shift, r["prevalence"], r["reweighting"])
    assert "labelled images" in r["advice"] and not out.exists()


@pytest.mark.slow
@pytest.mark.realdata
def test_adapt_repicks_the_threshold_on_labelled_images(real_model, tmp_path, capsys):
    model_dir, test = real_model
    for cls, label in (("NORMAL", 0), ("PNEUMONIA", 1)):
        _write_site(tmp_path / "lab" / cls, test.images[test.labels == label][:80])
    out = tmp_path / "adapted"
    r = _adapt(capsys, "--model", str(model_dir), "--images", str(tmp_path / "lab"), "--labelled", "--out", str(out))
    assert r["sensitivity"] >= 0.95 and r["sensitivity_interval"][0] <= r["sensitivity"]
    m = load_exported(out)  # a complete model folder under the unchanged contract
    assert m.threshold == pytest.approx(r["threshold"]["repicked"])
    assert m.card["adaptation"]["counts"] == {"NORMAL": 80, "PNEUMONIA": 80}
    # evaluate gives the adapted threshold's figures and the card's side by side
    from xray_ray.serve.evaluate import evaluate, format_table

    for cls, label in (("NORMAL", 0), ("PNEUMONIA", 1)):
        _write_site(tmp_path / "kaggle" / "test" / cls, test.images[test.labels == label][80:140])
    adapted = evaluate(str(out), str(tmp_path / "kaggle"), n_boot=50)
    original = evaluate(str(model_dir), str(tmp_path / "kaggle"), n_boot=50)
    assert adapted["threshold_before_adaptation"] == pytest.approx(original["threshold"])
    before = adapted["metrics"]["at_threshold_before_adaptation"]
    assert before["accuracy"] == pytest.approx(original["metrics"]["at_threshold"]["accuracy"])
    table = format_table(adapted["metrics"], adapted["threshold"], adapted["threshold_before_adaptation"])
    assert "(adapted)" in table.splitlines()[0] and f"card's {original['threshold']:.4f}" in table
    shutil.rmtree(out)


@pytest.mark.slow
@pytest.mark.realdata
def test_batchnorm_reestimation_writes_a_complete_model_folder(real_model, tmp_path, capsys):
    """`xray-ray adapt --batchnorm` (the ship wing's, torch): only BatchNorm statistics change; ONNX and
    TorchScript agree on real images; the card records it and passes the contract."""
    import torch
    from safetensors.torch import load_file

    from xray_ray.cli import main as xray_ray
    from xray_ray.model.robustness import apply_shift
    from xray_ray.ship.export import check_agreement

    model_dir, test = real_model
    images, _ = _resampled(test, 0.625, 200, seed=3)
    site = _write_site(tmp_path / "site", apply_shift("gamma_0.6", images, seed=0))
    out = tmp_path / "adabn"
    assert xray_ray(["adapt", "--model", str(model_dir), "--images", str(site), "--batchnorm", "--out", str(out)]) == 0
    m = load_exported(out)
    assert m.card["adaptation"]["images"] == 200 and m.card["adaptation"]["batchnorm_layers"] > 0
    assert m.threshold == load_exported(model_dir).threshold
    before, after = load_file(model_dir / "weights.safetensors"), load_file(out / "weights.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("running_" in k or "num_batches_tracked" in k for k in changed), sorted(changed)[:5]
    assert check_agreement(out) < 1e-4
    x = images.astype(np.float32)[:, None] / 255.0
    assert not np.allclose(m.predict(x), load_exported(model_dir).predict(x))  # the re-estimate did something
    capsys.readouterr()
    # refusals of the torch side: --out required, and not with --labelled
    assert xray_ray(["adapt", "--model", str(model_dir), "--images", str(site), "--batchnorm"]) == 2
    assert "give --out" in one_error_line(capsys.readouterr().err)
