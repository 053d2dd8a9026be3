"""A site check for an exported model: will its threshold hold on another site's images, and adaptation
where that is sound (onnxruntime, no torch).

    xray-ray adapt --model results/my-run/best --images /site/scans/ [--out site-model] [--json]
    xray-ray adapt --model results/my-run/best --images /site/labelled/ --labelled --out site-model
    xray-ray adapt --model results/my-run/best --images /site/scans/ --batchnorm --out site-model

Unlabelled: the site's scores against validation's, its prevalence by EM and by the confusion-matrix
estimate (each with a bootstrap interval), and whether a pure change of prevalence explains the site.
With --out and a plausible change of prevalence, a model folder whose threshold is the card's re-expressed
at the site's prevalence; otherwise nothing is written, and the reason is said. --labelled (NORMAL/ and
PNEUMONIA/ folders): the threshold re-picked by the card's own rule on the site's images. --batchnorm
(needs torch: run by ship.batchnorm) re-estimates BatchNorm statistics on the site's images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from xray_ray.common import DEFAULT_MAX_FILE_MB, cli, json_safe, write_text
from xray_ray.data.images import IMAGE_EXTENSIONS
from xray_ray.data.splits import patient_from_name
from xray_ray.errors import UserError
from xray_ray.metrics import bootstrap_ci, choose_threshold
from xray_ray.serve import prior_shift as P
from xray_ray.serve.predict import find_images
from xray_ray.serve.runtime import CARD_FILE, VAL_SCORES_FILE, ExportedModel, load_exported

MIN_SITE_IMAGES = 100  # below this the two prevalence estimates' intervals are too wide to tell anything
MIN_LABELLED_PER_CLASS = 20  # a re-picked threshold needs at least this many images of each class
ADVISED_LABELLED_PER_CLASS = 75  # sensitivity 0.95 within about +-0.05 (95% interval) needs ~75 positives


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="xray-ray adapt", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="an exported model folder (best/)")
    ap.add_argument("--images", nargs="+", required=True, help="the site's image files or folders")
    ap.add_argument("--labelled", action="store_true", help="the folder holds NORMAL/ and PNEUMONIA/")
    ap.add_argument("--batchnorm", action="store_true", help="re-estimate BatchNorm statistics (needs torch)")
    ap.add_argument("--out", default=None, help="write the adapted model folder here (must not exist)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--seed", type=int, default=0, help="fixes the bootstrap draws")
    ap.add_argument("--n-boot", type=int, default=200, help="bootstrap draws for the intervals")
    ap.add_argument("--max-file-mb", type=float, default=DEFAULT_MAX_FILE_MB)
    return ap


def validation_of(model: ExportedModel, model_dir: Path) -> P.Validation:
    """The validation scores an export keeps beside its card; a folder without them cannot be adapted."""
    path = model_dir / VAL_SCORES_FILE
    if not path.is_file():
        raise UserError(
            f"{model_dir} has no {VAL_SCORES_FILE} (it was exported before the site check existed), so its "
            "scores cannot be compared with validation's; re-export it with this version "
            "(xray-ray search ... --resume --export-only)."
        )
    doc = json.loads(path.read_text())
    labels, scores = np.asarray(doc["labels"], np.int64), np.asarray(doc["prob_pneumonia"], np.float64)
    if labels.shape != scores.shape or len(set(labels.tolist())) < 2:
        raise UserError(f"{path} does not hold validation labels of both classes with their scores; re-export.")
    return P.Validation(labels, scores, float(model.threshold))


def score(model: ExportedModel, paths: Sequence[Path], max_mb: float) -> tuple[list[Path], np.ndarray, list[dict]]:
    """(scored paths, their scores, the files that could not be read)."""
    ok, probs, bad = [], [], []
    for r in model.predict_files(paths, max_bytes=int(max_mb * (1 << 20))):
        if "error" in r:
            bad.append({"path": r["path"], "error": r["error"]})
        else:
            ok.append(Path(r["path"]))
            probs.append(r[model.score_columns[0]])
    return ok, np.asarray(probs, np.float64), bad


def labelled_images(folder: Path) -> tuple[list[Path], np.ndarray]:
    """The images under folder/NORMAL and folder/PNEUMONIA (names matched ignoring case), with labels."""
    classes = {p.name.upper(): p for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else {}
    if set(classes) & {"NORMAL", "PNEUMONIA"} != {"NORMAL", "PNEUMONIA"}:
        raise UserError(f"--labelled needs {folder} to hold NORMAL/ and PNEUMONIA/ folders of images.")
    paths, labels = [], []
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        found = [p for p in find_images([classes[name]]) if p.suffix.lower() in IMAGE_EXTENSIONS]
        paths += found
        labels += [label] * len(found)
    return paths, np.asarray(labels, np.int64)


def check_out(out: str | None) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if path.exists():
        raise UserError(f"--out {path} already exists; choose a new folder (an adapted model never overwrites one).")
    if not path.parent.is_dir():
        raise UserError(f"the folder of --out {path} does not exist; create it first.")
    return path


def write_adapted(model_dir: Path, out: Path, card: dict[str, Any], threshold: float, adaptation: dict) -> None:
    """A complete model folder at `out`: the model's files, its card with the new threshold and the record."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    new = json.loads(json.dumps(card))
    new["threshold"] = {
        **new["threshold"],
        "value": float(threshold),
        "adapted_from": float(card["threshold"]["value"]),
    }
    new["adaptation"] = adaptation
    write_text(tmp / CARD_FILE, json.dumps(json_safe(new), indent=1))
    load_exported(tmp)  # the folder passes the contract before it is given its name
    tmp.rename(out)


def unlabelled(args: argparse.Namespace, model: ExportedModel, model_dir: Path, out: Path | None) -> dict:
    val = validation_of(model, model_dir)
    paths, scores, bad = score(model, find_images(args.images), args.max_file_mb)
    if len(scores) < MIN_SITE_IMAGES:
        raise UserError(
            f"the site check needs at least {MIN_SITE_IMAGES} readable images of the site, got {len(scores)} "
            f"({len(bad)} unreadable); give more images."
        )
    report = P.site_check(scores, val, n_boot=args.n_boot, seed=args.seed)
    report.update(
        unreadable=bad,
        scores={"site_mean": float(scores.mean()), "validation_mean": float(val.scores.mean())},
        threshold={"card": val.threshold, "positive_rate_at_card": float(np.mean(scores >= val.threshold))},
    )
    if report["label_shift_plausible"]:
        site = P.at_site_prevalence(val, report["prevalence"]["em"])
        report["threshold"]["reexpressed"] = site["threshold"]
        report["at_site_prevalence"] = site
        if out is not None:
            record = {
                "method": "prior shift: the card's threshold re-expressed at the EM prevalence",
                "images": len(scores),
                "at_site_prevalence": site,
            }
            write_adapted(model_dir, out, model.card, site["threshold"], {**record, **_estimates(report)})
            report["written"] = str(out)
    else:
        report["advice"] = (
            "a pure change of prevalence does not explain this site's scores, so the card's threshold may not "
            f"hold there; a re-picked threshold needs labelled images (--labelled): at least "
            f"{MIN_LABELLED_PER_CLASS} of each class, about {ADVISED_LABELLED_PER_CLASS} for a sensitivity "
            "known to +-0.05."
        )
    return report


def _estimates(report: dict) -> dict:
    return {k: report[k] for k in ("prevalence", "estimates_agree", "reweighting", "validation_prevalence")}


def labelled(args: argparse.Namespace, model: ExportedModel, model_dir: Path, out: Path | None) -> dict:
    if len(args.images) != 1:
        raise UserError("--labelled takes one folder (holding NORMAL/ and PNEUMONIA/).")
    if out is None:
        raise UserError("--labelled writes the adapted model folder; give --out.")
    paths, labels = labelled_images(Path(args.images[0]))
    label_of = dict(zip(map(str, paths), labels))
    scored, scores, bad = score(model, paths, args.max_file_mb)
    y = np.asarray([label_of[str(p)] for p in scored], np.int64)
    counts = [int(np.sum(y == c)) for c in (0, 1)]
    if min(counts) < MIN_LABELLED_PER_CLASS:
        raise UserError(
            f"a re-picked threshold needs at least {MIN_LABELLED_PER_CLASS} readable images of each class "
            f"(about {ADVISED_LABELLED_PER_CLASS} for a sensitivity known to +-0.05), got {counts[0]} NORMAL "
            f"and {counts[1]} PNEUMONIA; add images."
        )
    target = float(model.card["threshold"].get("target_sensitivity", 0.95))
    t = choose_threshold(y, scores, target)
    patients = [patient_from_name(p.name) for p in scored]
    ci = bootstrap_ci(y, scores, t, groups=patients, n_boot=max(args.n_boot, 200), seed=args.seed)
    sens = float(np.mean(scores[y == 1] >= t))
    spec = float(np.mean(scores[y == 0] < t))
    record = {
        "method": f"threshold re-picked on labelled site images by the card's rule (sensitivity >= {target:g})",
        "images": int(len(y)),
        "counts": {"NORMAL": counts[0], "PNEUMONIA": counts[1]},
        "patients": len(set(patients)),
        "sensitivity": sens,
        "sensitivity_interval": list(ci["sensitivity"]),
        "specificity": spec,
        "specificity_interval": list(ci["specificity"]),
    }
    write_adapted(model_dir, out, model.card, t, record)
    return {
        "threshold": {"card": float(model.threshold), "repicked": t},
        **record,
        "unreadable": bad,
        "written": str(out),
    }


def format_report(r: dict) -> str:
    if "repicked" in r["threshold"]:
        lo, hi = r["sensitivity_interval"]
        return (
            f"threshold re-picked on {r['images']} labelled images ({r['patients']} patients): "
            f"{r['threshold']['card']:.4f} -> {r['threshold']['repicked']:.4f}; sensitivity {r['sensitivity']:.3f} "
            f"[{lo:.3f}, {hi:.3f}], specificity {r['specificity']:.3f}\nwritten: {r['written']}"
        )
    pv = r["prevalence"]
    em, bb = pv["intervals"]["em"], pv["intervals"]["bbse"]
    lines = [
        f"site: {r['n']} images; validation prevalence {r['validation_prevalence']:.3f}",
        f"prevalence by EM: {pv['em']:.3f} [{em[0]:.3f}, {em[1]:.3f}]",
        f"prevalence by the confusion-matrix estimate: {pv['bbse']:.3f}"
        + (f" [{bb[0]:.3f}, {bb[1]:.3f}]" if bb else " (no estimate)"),
        f"scores as validation's re-weighted: KS {r['reweighting']['ks_distance']:.3f} "
        f"(p {r['reweighting']['p_value']:.3f})",
        f"a pure change of prevalence explains the site: {'yes' if r['label_shift_plausible'] else 'no'}",
    ]
    if "at_site_prevalence" in r:
        a = r["at_site_prevalence"]
        lines.append(
            f"at the site's prevalence, threshold {a['threshold']:.4f} (the card's rule does not depend on it): "
            f"sensitivity {a['sensitivity']:.3f}, specificity {a['specificity']:.3f}, PPV {a['ppv']:.3f}, "
            f"NPV {a['npv']:.3f}, accuracy {a['accuracy']:.3f} expected"
        )
    lines += [f"note: {r['advice']}"] if "advice" in r else []
    lines += [f"written: {r['written']}"] if "written" in r else []
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    if args.batchnorm:
        raise UserError("--batchnorm needs torch: run it as `xray-ray adapt ... --batchnorm --out DIR`.")
    out = check_out(args.out)
    model_dir = Path(args.model)
    model = load_exported(model_dir)
    if model.k != 2:  # a threshold and a prevalence are two-class ideas; a K-class model decides by the arg-max
        raise UserError(
            f"adapt handles two-class models only, and {model_dir} tells {model.k} classes apart "
            f"({', '.join(model.classes)})."
        )
    if args.n_boot < 20:
        raise UserError(f"--n-boot must be at least 20, got {args.n_boot}.")
    return labelled(args, model, model_dir, out) if args.labelled else unlabelled(args, model, model_dir, out)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        report = run(args)
        print(json.dumps(json_safe(report)) if args.json else format_report(report))
        if "advice" in report and args.out:  # asked for a folder, and none is written: say so, exit 1
            print(f"note: nothing written to {args.out}: {report['advice']}", file=sys.stderr)
            return 1
        return 0

    return cli(body)
