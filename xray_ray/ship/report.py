"""One self-contained report.html that ties the winner's pictures (:mod:`xray_ray.ship.pictures`) to its numbers.

The pictures' names stay reachable here (``report.write_pictures``, ``report.grad_cam``, ...), as before the split.
A card with K > 2 classes (``threshold`` null, ``decision`` arg-max) gets the rule, the K-class metrics and intervals,
per-class figures and the confusion matrices as tables in place of the threshold and the two-class metric table.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from xray_ray import CLASSES
from xray_ray.common import SHOWN_METRICS, write_text
from xray_ray.ship.pictures import (
    PICTURES,
    plot_calibration,
    plot_confusion,
    plot_learning_curves,
    plot_roc_pr,
    plot_search_history,
    pr_curve,
    roc_curve,
    top_trials,
    write_pictures,
)
from xray_ray.ship.pictures_k import PICTURES_K, one_vs_rest, plot_roc_pr_k
from xray_ray.ship.saliency import grad_cam, pick_examples, plot_saliency

__all__ = [
    "PICTURES",
    "PICTURES_K",
    "REPORT_METRICS",
    "grad_cam",
    "one_vs_rest",
    "pick_examples",
    "plot_calibration",
    "plot_confusion",
    "plot_learning_curves",
    "plot_roc_pr",
    "plot_roc_pr_k",
    "plot_saliency",
    "plot_search_history",
    "pr_curve",
    "roc_curve",
    "top_trials",
    "write_html",
    "write_pictures",
]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _fmt_g(v: Any) -> str:
    """Settings such as a learning rate of 1.3e-4: significant digits, not decimals."""
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else _fmt(v)


def _metric_cell(block: Mapping[str, Any], name: str) -> str:
    return _cell(block.get(name), (block.get("ci") or {}).get(name))


REPORT_METRICS = SHOWN_METRICS


def _metrics_table(metrics: Mapping[str, Any]) -> str:
    cols = [(split, key) for key in ("at_threshold", "at_0.5") for split in metrics]
    head = "".join(
        f"<th>{html.escape(s)}<br><small>{'chosen t' if k == 'at_threshold' else 't = 0.5'}</small></th>"
        for s, k in cols
    )
    rows = [
        "<tr><th>images / patients</th>"
        + "".join(f"<td>{metrics[s]['n']} / {metrics[s].get('patients', 'n/a')}</td>" for s, _ in cols)
        + "</tr>",
        "<tr><th>prevalence</th>" + "".join(f"<td>{_fmt(metrics[s]['prevalence'])}</td>" for s, _ in cols) + "</tr>",
    ]
    for name in REPORT_METRICS:
        label = "recall (sensitivity)" if name == "recall" else name
        rows.append(
            f"<tr><th>{label}</th>"
            + "".join(f"<td>{_metric_cell(metrics[s][k], name)}</td>" for s, k in cols)
            + "</tr>"
        )
    return f"<table><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def _leaderboard(trials: pd.DataFrame, winner: str | None, k: int = 10) -> str:
    if trials is None or trials.empty:
        return "<p>No trials recorded.</p>"
    cols = [
        c
        for c in (
            "trial_id",
            "status",
            "epochs_run",
            "best_epoch",
            "best_val_auc",
            "best_val_loss",
            "best_val_acc",
            "wall_seconds",
            "images_per_s",
        )
        if c in trials
    ]
    cols += [c for c in trials.columns if str(c).startswith("p_")]  # the searched parameters
    ids = top_trials(trials, k)
    table = trials.set_index(trials["trial_id"].astype(str))
    rows = []
    for tid in ids:
        r = table.loc[tid]
        cls = ' class="winner"' if tid == winner else ""
        rows.append(
            f"<tr{cls}>"
            + "".join(f"<td>{_fmt_g(r[c]) if c.startswith('p_') else _fmt(r[c])}</td>" for c in cols)
            + "</tr>"
        )
    head = "".join(f"<th>{c}</th>" for c in cols)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table><p>{len(trials)} trials in all; top {len(ids)} shown.</p>"


def _kv_table(d: Mapping[str, Any], limit: int = 400) -> str:
    """Two-column table; nested values as compact JSON, cut at `limit` characters (leakage lists get long)."""
    rows = []
    for k, v in d.items():
        if isinstance(v, (dict, list)):
            text = json.dumps(v, default=str)
            text = html.escape(text if len(text) <= limit else text[:limit] + " ...")
        else:
            text = _fmt_g(v)
        rows.append(f"<tr><th>{html.escape(str(k))}</th><td>{text}</td></tr>")
    return f"<table>{''.join(rows)}</table>"


def _figures(out_dir: Path, pictures: Sequence[str], captions: Mapping[str, str]) -> list[str]:
    """One <figure> per picture, the PNG embedded as base64, captioned."""
    figures = []
    for name in pictures:
        png = (out_dir / name).read_bytes()
        caption = f"{html.escape(captions.get(name, name))} <small>({name})</small>"
        figures.append(
            f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return figures


def _named(classes: Sequence[str]) -> str:
    """0 = NORMAL, 1 = PNEUMONIA: each class by its output index."""
    return ", ".join(f"{i} = {html.escape(c)}" for i, c in enumerate(classes))


def _cell(value: Any, ci: Sequence[Any] | None) -> str:
    """A value and, when known, its bootstrap interval in brackets."""
    if ci and all(c is not None for c in ci):
        return f"{_fmt(value)} <small>[{_fmt(ci[0])}, {_fmt(ci[1])}]</small>"
    return _fmt(value)


K_METRICS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "macro_auc": "macro AUC (one vs rest)",
    "log_loss": "log-loss",
}
NORMAL_VS_REST = {
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "roc_auc": "roc_auc",
    "accuracy": "accuracy",
}


def _k_metrics_table(metrics: Mapping[str, Any]) -> str:
    """Splits as columns, the K-class summary metrics as rows, each with its interval where it has one."""
    head = "".join(f"<th>{html.escape(s)}</th>" for s in metrics)
    if any("patients" in m for m in metrics.values()):
        cells = {"images / patients": [f"{m.get('n')} / {m.get('patients', 'n/a')}" for m in metrics.values()]}
    else:  # the patients are in the data table below
        cells = {"images": [f"{m.get('n')}" for m in metrics.values()]}
    cells |= {label: [_metric_cell(m, key) for m in metrics.values()] for key, label in K_METRICS.items()}
    rows = "".join(f"<tr><th>{label}</th>{''.join(f'<td>{c}</td>' for c in row)}</tr>" for label, row in cells.items())
    return f"<table><tr><th></th>{head}</tr>{rows}</table>"


def _per_class_table(metrics: Mapping[str, Any], classes: Sequence[str]) -> str:
    """One row per split and class: its images and its one-vs-rest sensitivity, specificity, precision, AUC."""
    rows = []
    for split, m in metrics.items():
        ci, per = m.get("ci") or {}, m.get("per_class") or {}
        for i, name in enumerate(classes):
            c = per.get(name, {})
            first = f'<th rowspan="{len(classes)}">{html.escape(split)}</th>' if i == 0 else ""
            rows.append(
                f"<tr>{first}<th>{html.escape(name)}</th><td>{c.get('n')}</td>"
                + "".join(f"<td>{_cell(c.get(k), ci.get(f'{k}__{name}'))}</td>" for k in ("sensitivity", "specificity"))
                + f"<td>{_fmt(c.get('precision'))}</td><td>{_cell(c.get('auc'), ci.get(f'auc__{name}'))}</td></tr>"
            )
    head = "".join(
        f"<th>{h}</th>" for h in ("split", "class", "images", "sensitivity", "specificity", "precision", "AUC")
    )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _confusion_table(split: str, m: Mapping[str, Any], classes: Sequence[str]) -> str:
    """The K x K confusion matrix of one split: rows true, columns called; count and share of the row, shaded."""
    cm = m.get("confusion") or [[0] * len(classes) for _ in classes]
    rows = []
    for r, (name, counts) in enumerate(zip(classes, cm)):
        total = sum(counts)
        cells = []
        for c, v in enumerate(counts):
            share = v / total if total else 0.0
            weight = "font-weight:bold;" if r == c else ""
            style = f"{weight}background:rgba(31,119,180,{0.6 * share:.2f})"
            cells.append(f'<td style="{style}">{v} <small>({share:.0%})</small></td>')
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}<td>{total}</td></tr>")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    return (
        f'<table class="confusion" style="display:inline-table;margin:0.5em 2em 0.5em 0;vertical-align:top">'
        f"<caption>{html.escape(split)} (n={m.get('n')})</caption>"
        f"<tr><th>true \\ called</th>{head}<th>images</th></tr>{''.join(rows)}</table>"
    )


def _normal_vs_rest(metrics: Mapping[str, Any]) -> str:
    """NORMAL against every other class, per split, when the card has it (empty otherwise)."""
    blocks = {s: m["normal_vs_rest"] for s, m in metrics.items() if m.get("normal_vs_rest")}
    if not blocks:
        return ""
    head = "".join(f"<th>{html.escape(s)}</th>" for s in blocks)
    rows = "".join(
        f"<tr><th>{label}</th>" + "".join(f"<td>{_metric_cell(b, key)}</td>" for b in blocks.values()) + "</tr>"
        for key, label in NORMAL_VS_REST.items()
    )
    return f"""<h3>NORMAL against the rest</h3>
<p>The binary question a radiologist reads first: an image counts as positive when its arg-max class is not NORMAL;
the AUC ranks images by 1 - P(NORMAL).</p>
<table><tr><th></th>{head}</tr>{rows}</table>
"""


def _k_head(card: Mapping[str, Any], classes: Sequence[str]) -> str:
    """Title, the arg-max rule and the K-class metrics, per-class figures and confusion matrices."""
    trial = card.get("trial", {})
    decision = card.get("decision") or {}
    decision = {"rule": decision} if isinstance(decision, str) else decision
    meaning = decision.get("meaning") or "the class with the highest probability"
    output = card.get("output", {})
    metrics = card["metrics"]
    confusion = "".join(_confusion_table(s, m, classes) for s, m in metrics.items())
    return f"""
<h1>xray_ray winner: trial {html.escape(str(trial.get("id")))}</h1>
<p>Created {html.escape(card.get("created", ""))}. {len(classes)} classes, in output order: {_named(classes)}.
The winner was chosen on validation only ({html.escape(str(trial.get("selection_metric") or "val_auc"))}; validation
AUC is the macro one-vs-rest AUC), and the test split was scored once, after that.</p>
<h2>Decision</h2>
<p><b>{html.escape(str(decision.get("rule", "argmax")))}</b>: {html.escape(meaning)}. The model outputs
{html.escape(str(output.get("name", "probs")))}, one probability per class in the order above, and an image is called
the class whose probability is highest; there is no threshold.</p>
<h2>Metrics</h2>
<p>95% bootstrap intervals in brackets, resampling patients ({card.get("bootstrap", {}).get("n_boot", "?")} draws).</p>
{_k_metrics_table(metrics)}
<h3>Per class (one class against the rest)</h3>
{_per_class_table(metrics, classes)}
<h3>Confusion matrices</h3>
<p>Rows: the true class; columns: the class called; each cell's count and its share of the row.</p>
<div>{confusion}</div>
{_normal_vs_rest(metrics)}"""


def _counts_table(data: Mapping[str, Any], classes: Sequence[str]) -> str:
    """Images, each class's images and patients per split."""
    rows = "".join(
        f"<tr><th>{html.escape(s)}</th><td>{c.get('n')}</td>"
        + "".join(f"<td>{c.get(k)}</td>" for k in classes)
        + f"<td>{c.get('patients', 'n/a')}</td></tr>"
        for s, c in data.get("counts", {}).items()
    )
    head = "".join(f"<th>{html.escape(k)}</th>" for k in classes)
    return f"<table><tr><th>split</th><th>images</th>{head}<th>patients</th></tr>{rows}</table>"


def _binary_head(card: Mapping[str, Any], classes: Sequence[str]) -> str:
    """Title, the threshold and the two-class metric table."""
    th = card["threshold"]
    trial = card.get("trial", {})
    return f"""
<h1>xray_ray winner: trial {html.escape(str(trial.get("id")))}</h1>
<p>Created {html.escape(card.get("created", ""))}. Classes: {_named(classes)}. The winner was chosen on
validation only ({html.escape(str(trial.get("selection_metric") or "val_auc"))}); the threshold was then fixed on
validation, and the test split was scored once, after that.</p>
<h2>Threshold</h2>
<p><b>{_fmt(th["value"], 4)}</b>: {html.escape(th["method"])} (target sensitivity {_fmt(th.get("target_sensitivity"))});
on validation it gives sensitivity {_fmt(th.get("val_sensitivity"))} and specificity {_fmt(th.get("val_specificity"))}.
An image is called {html.escape(classes[1])} when its probability is at or above the threshold.</p>
<h2>Metrics</h2>
<p>95% bootstrap intervals in brackets, resampling patients ({card.get("bootstrap", {}).get("n_boot", "?")} draws).</p>
{_metrics_table(card["metrics"])}
"""


def write_html(out_dir: Path, card: Mapping[str, Any], trials: pd.DataFrame, pictures: Sequence[str]) -> Path:
    """report.html with every picture embedded (base64), so the one file can be mailed or archived.

    A card with K > 2 classes (arg-max decision, no threshold) shows the rule, the K-class metrics with their
    intervals, each class's figures, the confusion matrices and, when NORMAL is a class, NORMAL against the rest.
    """
    classes = [str(c) for c in card.get("classes") or CLASSES]
    many = len(classes) > 2
    head = _k_head(card, classes) if many else _binary_head(card, classes)
    trial = card.get("trial", {})
    data = card.get("data", {})
    figures = _figures(out_dir, pictures, PICTURES_K if many else PICTURES)
    check = card.get("export", {})
    body = f"""{head}<h2>Pictures</h2>
{"".join(figures)}
<h2>Data</h2>
{_counts_table(data, classes)}
{_kv_table({k: v for k, v in data.items() if k != "counts"})}
<h2>Leaderboard</h2>
{_leaderboard(trials, str(trial.get("id")))}
<h2>Model</h2>
{_kv_table(card.get("model", {}))}
<h3>Input contract</h3>
{_kv_table(card["input"])}
<p>Export: {html.escape(str(check.get("onnx")))} and {html.escape(str(check.get("torchscript")))} output
{html.escape(str(card.get("output", {}).get("name")))}; they differ by at most {check.get("max_abs_diff", math.nan):.1e}
on {check.get("images")} images (tolerance {check.get("tolerance")}).</p>
<h2>Trial configuration</h2>
{_kv_table(trial.get("config", {}))}
<h2>Versions</h2>
{_kv_table(card.get("versions", {}))}
"""
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
        "font-size:13px;text-align:left}tr.winner{background:#fff3c4}figure{margin:1em 0}"
        "img{max-width:100%}figcaption{font-size:13px;color:#444}"
    )
    doc = (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>xray_ray report</title>"
        f"<style>{style}</style></head><body>{body}</body></html>\n"
    )
    path = out_dir / "report.html"
    write_text(path, doc)
    return path
