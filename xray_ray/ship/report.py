"""One self-contained report.html that ties the winner's pictures (:mod:`xray_ray.ship.pictures`) to its numbers.

The pictures' names stay reachable here (``report.write_pictures``, ``report.grad_cam``, ...), as before the split.
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

from xray_ray.common import SHOWN_METRICS, write_text
from xray_ray.ship.pictures import (
    PICTURES,
    grad_cam,
    pick_examples,
    plot_calibration,
    plot_confusion,
    plot_learning_curves,
    plot_roc_pr,
    plot_saliency,
    plot_search_history,
    pr_curve,
    roc_curve,
    top_trials,
    write_pictures,
)

__all__ = [
    "PICTURES",
    "REPORT_METRICS",
    "grad_cam",
    "pick_examples",
    "plot_calibration",
    "plot_confusion",
    "plot_learning_curves",
    "plot_roc_pr",
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
    value = _fmt(block.get(name))
    ci = (block.get("ci") or {}).get(name)
    if ci and all(c is not None for c in ci):
        return f"{value} <small>[{_fmt(ci[0])}, {_fmt(ci[1])}]</small>"
    return value


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


def _figures(out_dir: Path, pictures: Sequence[str]) -> list[str]:
    """One <figure> per picture, the PNG embedded as base64, captioned."""
    figures = []
    for name in pictures:
        png = (out_dir / name).read_bytes()
        caption = f"{html.escape(PICTURES.get(name, name))} <small>({name})</small>"
        figures.append(
            f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    return figures


def write_html(out_dir: Path, card: Mapping[str, Any], trials: pd.DataFrame, pictures: Sequence[str]) -> Path:
    """report.html with every picture embedded (base64), so the one file can be mailed or archived."""
    th = card["threshold"]
    trial = card.get("trial", {})
    data = card.get("data", {})
    counts = "".join(
        f"<tr><th>{html.escape(s)}</th><td>{c.get('n')}</td><td>{c.get('NORMAL')}</td><td>{c.get('PNEUMONIA')}</td>"
        f"<td>{c.get('patients', 'n/a')}</td></tr>"
        for s, c in data.get("counts", {}).items()
    )
    figures = _figures(out_dir, pictures)
    check = card.get("export", {})
    body = f"""
<h1>xray_ray winner: trial {html.escape(str(trial.get("id")))}</h1>
<p>Created {html.escape(card.get("created", ""))}. Classes: 0 = NORMAL, 1 = PNEUMONIA. The winner was chosen on
validation only ({html.escape(str(trial.get("selection_metric") or "val_auc"))}); the threshold was then fixed on
validation, and the test split was scored once, after that.</p>
<h2>Threshold</h2>
<p><b>{_fmt(th["value"], 4)}</b>: {html.escape(th["method"])} (target sensitivity {_fmt(th.get("target_sensitivity"))});
on validation it gives sensitivity {_fmt(th.get("val_sensitivity"))} and specificity {_fmt(th.get("val_specificity"))}.
An image is called PNEUMONIA when its probability is at or above the threshold.</p>
<h2>Metrics</h2>
<p>95% bootstrap intervals in brackets, resampling patients ({card.get("bootstrap", {}).get("n_boot", "?")} draws).</p>
{_metrics_table(card["metrics"])}
<h2>Pictures</h2>
{"".join(figures)}
<h2>Data</h2>
<table><tr><th>split</th><th>images</th><th>NORMAL</th><th>PNEUMONIA</th><th>patients</th></tr>{counts}</table>
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
