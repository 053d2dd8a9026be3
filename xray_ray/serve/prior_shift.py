"""Is a new site's difference only its prevalence? Label-free estimates from an exported model's scores.

Two estimates of the site's PNEUMONIA prevalence, each valid when the site differs from validation by its
prior alone (label shift: the class-conditional images, so the class-conditional scores, unchanged):
- EM on validation-calibrated outputs (Saerens, Latinne and Decaestecker, Neural Computation 14, 2002):
  Platt scaling fitted on the validation scores, then the prior re-estimated until it is a fixed point.
- The confusion-matrix estimate (black-box shift estimation, Lipton, Wang and Smola, ICML 2018): the site's
  positive rate at the card's threshold solved through validation's sensitivity and specificity.
Under label shift both land near the truth and the site's scores are validation's re-weighted. When the
two disagree, or the scores are not such a re-weighting, the assumption fails, and so may the card's
threshold. Numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EPS = 1e-6
EDGE = 0.02  # an EM prevalence this close to 0 or 1: the model sees (nearly) one class only


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def platt_fit(scores: np.ndarray, labels: np.ndarray, ridge: float = 1e-3) -> tuple[float, float]:
    """(a, b) of P(y=1 | s) = sigmoid(a * logit(s) + b), by Newton's method on the log-likelihood."""
    z, y = _logit(scores), np.asarray(labels, np.float64)
    a, b = 1.0, 0.0
    for _ in range(50):
        p = _sigmoid(a * z + b)
        w = p * (1 - p)
        grad = np.array([np.sum((p - y) * z) + ridge * (a - 1), np.sum(p - y)])
        hess = np.array([[np.sum(w * z * z) + ridge, np.sum(w * z)], [np.sum(w * z), np.sum(w) + ridge]])
        step = np.linalg.solve(hess, grad)
        a, b = a - step[0], b - step[1]
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(a), float(b)


def calibrated(scores: np.ndarray, ab: tuple[float, float]) -> np.ndarray:
    return _sigmoid(ab[0] * _logit(scores) + ab[1])


def em_prior(posteriors: np.ndarray, prior: float, iters: int = 1000) -> float:
    """Saerens et al.'s EM: the site prior that the re-weighted posteriors average to."""
    p = np.clip(np.asarray(posteriors, np.float64), EPS, 1 - EPS)
    pi = prior
    for _ in range(iters):
        w1, w0 = pi / prior, (1 - pi) / (1 - prior)
        new = float(np.mean(w1 * p / (w1 * p + w0 * (1 - p))))
        if abs(new - pi) < 1e-10:
            return new
        pi = new
    return pi


def bbse_prior(positive_rate: float, sensitivity: float, specificity: float) -> float:
    """Lipton et al.'s estimate for two classes: q = pi * TPR + (1 - pi) * FPR, solved for pi, kept in [0, 1]."""
    fpr = 1 - specificity
    if sensitivity - fpr < 0.05:  # the confusion matrix is (nearly) singular: no estimate
        return float("nan")
    return float(np.clip((positive_rate - fpr) / (sensitivity - fpr), 0.0, 1.0))


def reweighting_distance(site: np.ndarray, val_scores: np.ndarray, val_labels: np.ndarray, prior: float) -> float:
    """Kolmogorov-Smirnov distance between the site's scores and validation's re-weighted to `prior`."""
    pos, neg = np.sort(val_scores[val_labels == 1]), np.sort(val_scores[val_labels == 0])
    grid = np.sort(np.concatenate([site, val_scores]))
    mix = prior * np.searchsorted(pos, grid, "right") / len(pos) + (1 - prior) * np.searchsorted(
        neg, grid, "right"
    ) / len(neg)
    ecdf = np.searchsorted(np.sort(site), grid, "right") / len(site)
    return float(np.max(np.abs(ecdf - mix)))


@dataclass(frozen=True)
class Validation:
    """What an exported model's validation says about its scores: labels, scores, the card's threshold."""

    labels: np.ndarray
    scores: np.ndarray
    threshold: float

    @property
    def prior(self) -> float:
        return float(np.mean(self.labels))

    def rates(self) -> tuple[float, float]:
        """(sensitivity, specificity) at the threshold."""
        pred = self.scores >= self.threshold
        return float(np.mean(pred[self.labels == 1])), float(np.mean(~pred[self.labels == 0]))


def point_estimates(site: np.ndarray, val: Validation) -> dict[str, float]:
    ab = platt_fit(val.scores, val.labels)
    prior_cal = float(np.mean(calibrated(val.scores, ab)))  # the prior the calibrated outputs carry
    sens, spec = val.rates()
    return {
        "em": em_prior(calibrated(site, ab), prior_cal),
        "bbse": bbse_prior(float(np.mean(site >= val.threshold)), sens, spec),
    }


def _resample(rng: np.random.Generator, val: Validation) -> Validation:
    """A bootstrap copy of validation, drawn class by class so that both classes stay."""
    idx = np.concatenate([rng.choice(np.flatnonzero(val.labels == c), int(np.sum(val.labels == c))) for c in (0, 1)])
    return Validation(val.labels[idx], val.scores[idx], val.threshold)


def site_check(site: np.ndarray, val: Validation, *, n_boot: int = 200, seed: int = 0, alpha: float = 0.05) -> dict:
    """Both prevalence estimates with bootstrap intervals (site and validation resampled), and whether a pure
    change of prevalence explains the site: the two intervals overlap and the site's scores are validation's
    re-weighted to the EM prior (the KS distance within what site-sized samples of that mixture show)."""
    site = np.asarray(site, np.float64)
    rng = np.random.default_rng(seed)
    est = point_estimates(site, val)
    boots, null = [], []
    for _ in range(n_boot):
        v = _resample(rng, val)
        s = site[rng.integers(0, len(site), len(site))]
        boots.append(point_estimates(s, v))
        # a site of the same size that IS validation re-weighted: how far its scores fall from the mixture
        pick = rng.random(len(site)) < est["em"]
        fake = np.where(
            pick, rng.choice(val.scores[val.labels == 1], len(site)), rng.choice(val.scores[val.labels == 0], len(site))
        )
        null.append(reweighting_distance(fake, v.scores, v.labels, est["em"]))
    lo, hi = 100 * alpha / 2, 100 * (1 - alpha / 2)
    intervals = {}
    for k in ("em", "bbse"):
        values = np.array([b[k] for b in boots], np.float64)
        values = values[np.isfinite(values)]
        intervals[k] = [float(np.percentile(values, lo)), float(np.percentile(values, hi))] if len(values) else None
    distance = reweighting_distance(site, val.scores, val.labels, est["em"])
    p_value = float((1 + np.sum(np.array(null) >= distance)) / (1 + len(null)))
    agree = bool(
        intervals["em"]
        and intervals["bbse"]
        and intervals["em"][0] <= intervals["bbse"][1]
        and intervals["bbse"][0] <= intervals["em"][1]
    )
    return {
        "n": len(site),
        "prevalence": {"em": est["em"], "bbse": est["bbse"], "interval": intervals["em"], "intervals": intervals},
        "validation_prevalence": val.prior,
        "estimates_agree": agree,
        "reweighting": {"ks_distance": distance, "p_value": p_value},
        # the two estimates agree, the scores are validation's re-weighted, and the site is not (nearly) one
        # class only: there, a site of that class and a shift that moves every image to one side look alike
        "label_shift_plausible": bool(
            agree and p_value >= 0.05 and math.isfinite(est["bbse"]) and EDGE < est["em"] < 1 - EDGE
        ),
    }


def at_site_prevalence(val: Validation, site_prior: float) -> dict[str, float]:
    """The card's threshold re-expressed at a site's prevalence, and what it gives there.

    Under a pure change of prevalence the class-conditional scores, so sensitivity and specificity at any
    threshold, are validation's; the card's rule (the highest threshold whose validation sensitivity meets
    its target) does not depend on prevalence, so it gives the same threshold at the site. What the
    prevalence changes is what a call means: the positive and negative predictive values and the accuracy,
    given here at the site's prevalence. (Moving the threshold for the site's accuracy instead was tried
    and dropped: validation's few NORMAL images make the gain it promises unreliable on another sample.)
    """
    sens, spec = val.rates()
    pi = float(np.clip(site_prior, 0.0, 1.0))
    called = pi * sens + (1 - pi) * (1 - spec)
    return {
        "threshold": float(val.threshold),
        "prevalence": pi,
        "sensitivity": sens,
        "specificity": spec,
        "ppv": pi * sens / called if called > 0 else float("nan"),
        "npv": (1 - pi) * spec / (1 - called) if called < 1 else float("nan"),
        "accuracy": pi * sens + (1 - pi) * spec,
    }
