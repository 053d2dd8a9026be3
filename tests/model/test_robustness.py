"""The shift battery: fixed, seeded, every shift does what it says, scores and composites are right."""

import numpy as np
import pytest

from xray_ray.model.robustness import COMPOSITES, SHIFTS, apply_shift, battery, score, subset, summarize


def _images(n=12, s=32, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:s, 0:s]
    base = (60 + 120 * np.exp(-((xx - s / 2) ** 2 + (yy - s / 2) ** 2) / (2 * (s / 4) ** 2))).astype(np.uint8)
    return np.clip(base[None] + rng.integers(0, 40, (n, s, s)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(SHIFTS))
def test_each_shift_changes_the_images_and_keeps_the_contract(name):
    x = _images()
    out = apply_shift(name, x, seed=1)
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert (out != x).mean() > 0.05
    np.testing.assert_array_equal(out, apply_shift(name, x, seed=1))  # deterministic


def test_shifts_move_pixels_the_way_their_names_say():
    x = _images()
    assert apply_shift("exposure_+0.15", x).mean() > x.mean() + 20
    assert apply_shift("gamma_1.6", x).mean() < x.mean() - 10
    assert apply_shift("contrast_1.5", x).std() > x.std() * 1.3
    np.testing.assert_array_equal(apply_shift("hflip", x), x[:, :, ::-1])
    framed = apply_shift("border_0.08", x)
    assert (framed[:, :3, :] == 0).all() and (framed[:, 3:-3, 3:-3] == x[:, 3:-3, 3:-3]).all()
    zoomed_out = apply_shift("zoom_out_0.8", x)
    assert (zoomed_out[:, 0, :] == 0).all() and zoomed_out[:, 16, 16].mean() > 100  # black surround, content kept


def test_subset_is_stratified_fixed_and_whole_when_small():
    y = np.array([0] * 300 + [1] * 900)
    idx = subset(y, most=400, seed=0)
    assert len(idx) == 400 and abs(y[idx].mean() - 0.75) < 0.01
    np.testing.assert_array_equal(idx, subset(y, most=400, seed=0))
    np.testing.assert_array_equal(subset(y[:100], most=400), np.arange(100))


def test_battery_holds_every_shift_of_the_same_images():
    x, y = _images(20), np.array([0, 1] * 10)
    b = battery(x, y, seed=0, most=10)
    assert set(b) == {"labels", *SHIFTS}
    assert all(b[k].shape == (10, 32, 32) for k in SHIFTS)
    assert b["labels"].tolist().count(1) == 5


def test_score_reports_every_shift_and_the_worst():
    x, y = _images(40), np.array([0, 1] * 20)
    b = battery(x, y, seed=0)

    def predictor(images):  # knows the labels on clean-ish images, except under horizontal flip
        flipped = np.array([np.array_equal(im, f) for im, f in zip(images, b["hflip"])])
        return np.where(flipped, 0.5, b["labels"] * 0.8 + 0.1).astype(np.float32)

    out = score(predictor, b)
    assert all(f"shift_auc__{n}" in out and f"shift_loss__{n}" in out for n in SHIFTS)
    assert set(COMPOSITES) <= set(out)
    assert out["rob_worst_shift"] == "hflip" and out["rob_auc_min"] == pytest.approx(0.5)
    assert out["shift_auc__gamma_0.6"] == pytest.approx(1.0)


def test_summarize_ignores_undefined_aucs():
    s = summarize({"a": (0.9, 0.3), "b": (float("nan"), 0.5), "c": (0.7, 0.4)})
    assert s["rob_auc_min"] == pytest.approx(0.7) and s["rob_worst_shift"] == "c"
    assert s["rob_auc_mean"] == pytest.approx(0.8) and s["rob_loss_mean"] == pytest.approx(0.4)


def test_progress_says_when_a_robustness_metric_was_not_scored_this_epoch(capsys):
    from types import SimpleNamespace

    from xray_ray.search.tuner import ProgressPrinter

    progress = ProgressPrinter("rob_auc_min", "max", total=1)
    trial = SimpleNamespace(trial_id="t1", status="RUNNING")
    for epoch, value in ((1, float("nan")), (2, 0.91), (3, None)):
        result = {"epoch": epoch, "epochs": 3, **({"rob_auc_min": value} if value is not None else {})}
        progress.on_trial_result(epoch, [trial], trial, result)
    lines = capsys.readouterr().out.splitlines()
    assert "epoch 1/3 rob_auc_min=not scored this epoch" in lines[0] and "best rob_auc_min -" in lines[0]
    assert "epoch 2/3 rob_auc_min=0.9100" in lines[1]
    assert "rob_auc_min=not scored this epoch" in lines[2] and "best rob_auc_min 0.9100 (t1)" in lines[2]
