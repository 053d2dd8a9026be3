"""Metrics against hand-computed cases and brute force; bootstrap and threshold choice."""

import math
import time

import numpy as np
import pytest

from xray_ray import metrics as M
from xray_ray.errors import UserError
from xray_ray.metrics import (
    CI_METRICS,
    _weighted_metrics,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    pr_auc,
    roc_auc,
)


def _brute_auc(y, p):
    pos, neg = p[y == 1], p[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def _brute_ap(y, p):
    ap, last_recall = 0.0, 0.0
    for t in np.unique(p)[::-1]:
        called = p >= t
        tp = (called & (y == 1)).sum()
        recall = tp / y.sum()
        ap += (recall - last_recall) * tp / called.sum()
        last_recall = recall
    return ap


def _scores(n, seed=0, separation=0.3):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.random(n) * 0.7 + separation * y, 0, 1)
    return y, p


def test_roc_auc_hand_cases():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75  # 0.35 beats 0.1 only; 0.8 beats both
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5  # a tie counts one half
    assert roc_auc([0, 0, 1], [0.2, 0.5, 0.5]) == 0.75  # (1 win + 1/2 tie) / 2 pairs
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert roc_auc([0, 0, 1, 1], [0.5] * 4) == 0.5
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.5, 0.9]))
    assert math.isnan(roc_auc([], []))
    assert roc_auc([0, 1], [-3.0, 7.0]) == 1.0  # any scores, not only probabilities


def test_pr_auc_hand_cases():
    # Thresholds 0.9 (P=1, R=1/2), 0.8 (R unchanged), 0.7 (P=2/3, R=1): AP = 1/2 * 1 + 1/2 * 2/3.
    assert pr_auc([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert pr_auc([1, 0], [0.5, 0.5]) == 0.5
    assert pr_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert pr_auc([1, 1], [0.2, 0.3]) == 1.0
    assert math.isnan(pr_auc([0, 0], [0.2, 0.3]))


@pytest.mark.parametrize("seed", range(5))
def test_rank_metrics_match_brute_force_with_many_ties(seed):
    y, p = _scores(120, seed)
    p = np.round(p, 1)  # few distinct scores -> many ties
    assert roc_auc(y, p) == pytest.approx(_brute_auc(y, p), abs=1e-12)
    assert pr_auc(y, p) == pytest.approx(_brute_ap(y, p), abs=1e-12)


def test_binary_metrics_hand_case():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.6, 0.4, 0.2, 0.7, 0.3, 0.1, 0.5 - 1e-9])
    m = binary_metrics(y, p, threshold=0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["n"]) == (2, 2, 1, 3, 8)
    assert m["accuracy"] == 5 / 8 and m["precision"] == 2 / 3 and m["recall"] == 0.5
    assert m["sensitivity"] == m["recall"] and m["specificity"] == 3 / 4 and m["f1"] == 4 / 7
    assert m["prevalence"] == 0.5 and m["threshold"] == 0.5
    assert m["brier"] == pytest.approx(np.mean((p - y) ** 2))
    assert m["roc_auc"] == pytest.approx(_brute_auc(y, p))
    assert all(type(m[k]) is int for k in ("tp", "fp", "tn", "fn", "n"))
    assert binary_metrics([1], [0.5], threshold=0.5)["tp"] == 1  # p == threshold calls PNEUMONIA


def test_undefined_ratios_are_nan_not_errors():
    none_called = binary_metrics([0, 1, 1], [0.1, 0.2, 0.3], threshold=0.9)
    assert math.isnan(none_called["precision"]) and none_called["recall"] == 0.0
    all_normal = binary_metrics([0, 0], [0.1, 0.7])
    assert math.isnan(all_normal["recall"]) and math.isnan(all_normal["roc_auc"])
    assert math.isnan(all_normal["pr_auc"]) and all_normal["specificity"] == 0.5
    empty = binary_metrics([], [])
    assert empty["n"] == 0 and math.isnan(empty["accuracy"]) and math.isnan(empty["ece"])


def test_ece_of_calibrated_and_miscalibrated_scores():
    # Bin of 0.25 with 1 of 4 positive, bin of 0.75 with 3 of 4: perfectly calibrated.
    y = [1, 0, 0, 0, 1, 1, 1, 0]
    p = [0.25] * 4 + [0.75] * 4
    assert binary_metrics(y, p)["ece"] == pytest.approx(0.0, abs=1e-12)
    confident_wrong = binary_metrics([0, 0, 0, 0], [0.9] * 4)
    assert confident_wrong["ece"] == pytest.approx(0.9) and confident_wrong["brier"] == pytest.approx(0.81)
    # Half the images at 0.1 (all negative: gap 0.1), half at 1.0 in the last bin (all positive: gap 0).
    assert binary_metrics([0, 0, 1, 1], [0.1, 0.1, 1.0, 1.0])["ece"] == pytest.approx(0.05)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="labels"):
        binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="1-D"):
        binary_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0, 1], [0.1, float("nan")])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binary_metrics([0, 1], [0.1, 1.2])


def test_bootstrap_weights_equal_explicit_resampling():
    # The vectorised bootstrap weighs images by how often they were drawn; check that this equals
    # computing the metrics on the explicitly resampled arrays.
    y, p = _scores(300, seed=3)
    rng = np.random.default_rng(0)
    for _ in range(5):
        idx = rng.integers(0, y.size, y.size)
        counts = np.bincount(idx, minlength=y.size).astype(float)[None, :]
        weighted = _weighted_metrics(y, p, 0.5, counts)
        explicit = binary_metrics(y[idx], p[idx], 0.5)
        for k, v in weighted.items():
            assert v[0] == pytest.approx(explicit[k], abs=1e-12), k


def test_bootstrap_ci_contains_the_estimate_and_is_seeded():
    y, p = _scores(400, seed=1)
    point = binary_metrics(y, p, 0.5)
    ci = bootstrap_ci(y, p, 0.5, n_boot=500, seed=0)
    assert set(ci) == set(CI_METRICS)
    for k, (lo, hi) in ci.items():
        assert lo <= point[k] <= hi, k
        assert hi - lo < 0.2, k
    assert bootstrap_ci(y, p, 0.5, n_boot=500, seed=0) == ci
    assert bootstrap_ci(y, p, 0.5, n_boot=500, seed=1) != ci
    narrow = bootstrap_ci(y, p, 0.5, n_boot=500, seed=0, alpha=0.5)
    assert ci["roc_auc"][0] < narrow["roc_auc"][0] < narrow["roc_auc"][1] < ci["roc_auc"][1]


def test_patient_resampling_widens_intervals_when_images_are_correlated():
    # 40 patients x 10 near-identical images: 400 images carry the information of only 40.
    rng = np.random.default_rng(0)
    patient_y = rng.integers(0, 2, 40)
    patient_p = np.clip(rng.random(40) * 0.7 + 0.3 * patient_y, 0, 1)
    y = np.repeat(patient_y, 10)
    p = np.clip(np.repeat(patient_p, 10) + rng.normal(0, 0.01, 400), 0, 1)
    groups = np.repeat([f"person{i}" for i in range(40)], 10)
    by_image = bootstrap_ci(y, p, 0.5, n_boot=400)
    by_patient = bootstrap_ci(y, p, 0.5, groups=groups, n_boot=400)
    for k in ("roc_auc", "accuracy", "sensitivity", "brier"):
        width_image = by_image[k][1] - by_image[k][0]
        width_patient = by_patient[k][1] - by_patient[k][0]
        assert width_patient > 2 * width_image, k


def test_bootstrap_is_fast_enough_for_a_test_set():
    y, p = _scores(600, seed=2)
    groups = np.random.default_rng(0).integers(0, 200, 600).astype(str)
    start = time.perf_counter()
    ci = bootstrap_ci(y, p, 0.5, groups=groups, n_boot=1000)
    assert time.perf_counter() - start < 3.0
    assert all(lo <= hi for lo, hi in ci.values())


def test_bootstrap_skips_resamples_where_a_metric_is_undefined():
    ci = bootstrap_ci([0, 1], [0.2, 0.8], 0.5, n_boot=200)  # a quarter of the resamples lack a positive
    assert ci["roc_auc"] == (1.0, 1.0) and ci["recall"] == (1.0, 1.0)
    nothing = bootstrap_ci([0, 0], [0.2, 0.3], 0.5, n_boot=50)
    assert all(math.isnan(v) for v in nothing["recall"])


def _sensitivity(y, p, t):
    return binary_metrics(y, p, t)["sensitivity"]


def test_choose_threshold_hits_the_target_exactly():
    # Ten positives scored 0.1 .. 1.0; 80 % sensitivity needs the 8 highest, so t = 0.3.
    pos = np.round(np.arange(1, 11) / 10, 1)
    y = np.r_[np.ones(10), np.zeros(5)]
    p = np.r_[pos, [0.05, 0.15, 0.25, 0.35, 0.95]]
    t = choose_threshold(y, p, 0.8)
    assert t == 0.3 and _sensitivity(y, p, t) == 0.8
    assert _sensitivity(y, p, np.nextafter(t, 1)) < 0.8  # nothing higher reaches the target
    assert choose_threshold(y, p, 1.0) == 0.1
    assert choose_threshold(y, p, 0.05) == 1.0
    # 20 positives and 0.95 -> exactly 19 must be called, even though 0.95 * 20 is inexact in floats.
    y20, p20 = np.ones(20), np.linspace(0.01, 0.99, 20)
    t20 = choose_threshold(y20, p20, 0.95)
    assert t20 == p20[1] and _sensitivity(y20, p20, t20) >= 0.95


def test_choose_threshold_with_ties_and_random_data():
    y = np.array([1, 1, 1, 1, 0])
    p = np.array([0.9, 0.6, 0.6, 0.2, 0.7])
    assert choose_threshold(y, p, 0.5) == 0.6  # the tie at 0.6 brings 3/4, still the highest threshold
    for seed in range(5):
        ys, ps = _scores(200, seed)
        ps = np.round(ps, 2)
        for target in (0.8, 0.9, 0.95, 0.99):
            t = choose_threshold(ys, ps, target)
            assert _sensitivity(ys, ps, t) >= target
            above = ps[ps > t]
            if above.size:
                assert _sensitivity(ys, ps, above.min()) < target


def test_choose_threshold_refuses_impossible_requests():
    with pytest.raises(UserError, match="no PNEUMONIA"):
        choose_threshold([0, 0], [0.1, 0.2])
    with pytest.raises(UserError, match="target sensitivity"):
        choose_threshold([0, 1], [0.1, 0.2], 0.0)


def _three_class_sample(n=300, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    probs = rng.dirichlet([1, 1, 1], n)
    probs[np.arange(n), y] += 0.3
    return y, probs / probs.sum(axis=1, keepdims=True)


def test_multiclass_metrics_agree_with_their_definitions():
    y, probs = _three_class_sample()
    m = M.multiclass_metrics(y, probs, ["NORMAL", "BACTERIA", "VIRUS"])
    pred = probs.argmax(axis=1)

    def pairwise_auc(pos, neg):
        return np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])

    aucs = [pairwise_auc(probs[y == c, c], probs[y != c, c]) for c in range(3)]
    assert m["macro_auc"] == pytest.approx(np.mean(aucs)) == pytest.approx(M.macro_auc(y, probs))
    assert m["balanced_accuracy"] == pytest.approx(np.mean([np.mean(pred[y == c] == c) for c in range(3)]))
    f1 = [2 * np.sum((pred == c) & (y == c)) / (np.sum(pred == c) + np.sum(y == c)) for c in range(3)]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["log_loss"] == pytest.approx(-np.mean(np.log(probs[np.arange(len(y)), y])))
    assert m["accuracy"] == pytest.approx(np.mean(pred == y))
    assert m["confusion"] == [[int(np.sum((y == t) & (pred == p))) for p in range(3)] for t in range(3)]
    virus = m["per_class"]["VIRUS"]
    assert virus["n"] == int(np.sum(y == 2)) and virus["auc"] == pytest.approx(aucs[2])
    assert virus["specificity"] == pytest.approx(np.mean(pred[y != 2] != 2))


def test_multiclass_bootstrap_brackets_the_estimate_and_resamples_patients():
    y, probs = _three_class_sample()
    classes = ["NORMAL", "BACTERIA", "VIRUS"]
    m = M.multiclass_metrics(y, probs, classes)
    ci = M.multiclass_bootstrap(y, probs, classes, groups=np.arange(len(y)) // 3, n_boot=300)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
        assert ci[key][0] < m[key] < ci[key][1], key
    assert ci["sensitivity__VIRUS"][0] < m["per_class"]["VIRUS"]["sensitivity"] < ci["sensitivity__VIRUS"][1]
    # a patient's images move together, so intervals widen when each patient is 30 copies of one image
    wide = M.multiclass_bootstrap(
        np.repeat(y[:10], 30),
        np.repeat(probs[:10], 30, axis=0),
        classes,
        groups=np.repeat(np.arange(10), 30),
        n_boot=300,
    )
    narrow = M.multiclass_bootstrap(np.repeat(y[:10], 30), np.repeat(probs[:10], 30, axis=0), classes, n_boot=300)
    assert wide["accuracy"][1] - wide["accuracy"][0] > 2 * (narrow["accuracy"][1] - narrow["accuracy"][0])
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        M.multiclass_metrics(y, probs[:, :2], classes)
