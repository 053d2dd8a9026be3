"""`xray-ray adapt --batchnorm`: BatchNorm statistics re-estimated on a site's unlabelled images, and the
model exported again (AdaBN: Li, Wang, Shi, Liu and Hou, "Revisiting Batch Normalization For Practical
Domain Adaptation", 2016).

Needs torch, so it lives in the ship wing; the command reaches it through `xray-ray adapt` (cli.py sends
``--batchnorm`` here) and the serve wing never imports it. Only the BatchNorm running means and variances
change, computed over the site's images as a cumulative average (the weights stay); ONNX and TorchScript
are exported again from the new safetensors and checked against each other, the card's threshold is kept,
and the card records the adaptation. Never the default: on the maintainers' other site it traded
sensitivity for specificity (docs/results.md).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from xray_ray.common import cli, json_safe, read_regular_file, write_text
from xray_ray.data.images import ImageError, load_gray
from xray_ray.errors import UserError
from xray_ray.serve.adapt import MIN_SITE_IMAGES, check_out, parser
from xray_ray.serve.predict import find_images
from xray_ray.serve.runtime import CARD_FILE, load_exported, sha256_file
from xray_ray.ship import export
from xray_ray.ship.winner import AGREEMENT_TOLERANCE

BATCH = 64


def site_pixels(paths: Sequence[Path], size: int, max_mb: float) -> np.ndarray:
    """uint8 [N, S, S] of the readable images among `paths` (unreadable ones are left out)."""
    out = []
    for p in paths:
        try:
            out.append(load_gray(read_regular_file(p, int(max_mb * (1 << 20))), size))
        except (ImageError, OSError):
            continue
    return np.stack(out) if out else np.zeros((0, size, size), np.uint8)


@torch.no_grad()
def reestimate(model: nn.Module, pixels: np.ndarray) -> int:
    """Reset every BatchNorm layer's running statistics and recompute them over `pixels` (cumulative
    average, dropout off); returns the number of BatchNorm layers."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all batches, not an exponential one
    model.eval()
    for m in norms:
        m.train()
    for i in range(0, len(pixels), BATCH):
        model(torch.from_numpy(pixels[i : i + BATCH].astype(np.float32)[:, None] / 255.0))
    model.eval()
    return len(norms)


def adapt_batchnorm(model_dir: Path, images: Sequence[str], out: Path, max_mb: float) -> dict:
    exported = load_exported(model_dir)
    config = export.load_config(model_dir / export.CONFIG_NAME)
    if config.get("kind") == "ensemble":
        raise UserError(f"{model_dir} is an ensemble; --batchnorm re-estimates a single model only.")
    model = export.load_model(model_dir)
    pixels = site_pixels(find_images(images), exported.image_size, max_mb)
    if len(pixels) < MIN_SITE_IMAGES:
        raise UserError(
            f"--batchnorm needs at least {MIN_SITE_IMAGES} readable images of the site, got {len(pixels)}; "
            "give more images."
        )
    layers = reestimate(model, pixels)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    for name in (export.WEIGHTS_NAME, export.ONNX_NAME, export.TORCHSCRIPT_NAME):
        (tmp / name).unlink()
    classes = tuple(exported.classes)  # the graphs keep the card's output: its name, its classes
    export.save_weights(model, tmp / export.WEIGHTS_NAME, classes)
    export.export_torchscript(model, tmp / export.TORCHSCRIPT_NAME, classes)
    export.export_onnx(model, tmp / export.ONNX_NAME, classes=classes)
    diff = export.check_agreement(tmp, n=16)
    if not diff < AGREEMENT_TOLERANCE:
        raise RuntimeError(f"ONNX and TorchScript disagree by {diff:.2e} after the re-estimation")
    card = json.loads(json.dumps(exported.card))
    card["files"] = {
        **card.get("files", {}),
        **{n: sha256_file(tmp / n) for n in (export.ONNX_NAME, export.TORCHSCRIPT_NAME, export.WEIGHTS_NAME)},
    }
    record = {
        "method": "BatchNorm statistics re-estimated on the site's images (AdaBN); weights and threshold kept",
        "images": int(len(pixels)),
        "batchnorm_layers": layers,
        "threshold_before": exported.threshold,
        "threshold_after": exported.threshold,
        "onnx_torchscript_max_diff": float(diff),
    }
    card["adaptation"] = record
    write_text(tmp / CARD_FILE, json.dumps(json_safe(card), indent=1))
    load_exported(tmp)
    tmp.rename(out)
    return {**record, "written": str(out)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def body() -> int:
        if args.labelled:
            raise UserError("--batchnorm uses the site's images without labels; drop --labelled.")
        out = check_out(args.out)
        if out is None:
            raise UserError("--batchnorm writes the adapted model folder; give --out.")
        report = adapt_batchnorm(Path(args.model), args.images, out, args.max_file_mb)
        print(json.dumps(report) if args.json else f"{report['method']}: {report['images']} images; written: {out}")
        return 0

    return cli(body)
