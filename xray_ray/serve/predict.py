"""Predict the class of image files with an exported model (onnxruntime, no torch).

    xray-ray predict --model results/demo/best scan1.jpeg scans/ [--csv out.csv | --parquet out.parquet]

Folders are walked recursively for image files (sorted; hidden names skipped). Without --csv/--parquet
one JSON line is printed per image: {"path", "prob_pneumonia", "label"} or {"path", "error"}; the tables
have the same columns. A model of another pair of classes writes its positive class's probability
("prob_<CLASS>"), and one of K > 2 classes writes "label" (the arg-max class) and each class's
probability, "prob_<CLASS>" in the card's order.
Only regular files are read (a FIFO or device is an error line, never a hang), and files over
--max-file-mb are refused by their size before reading. Exit status: 0 all images predicted, 1 some
files failed (each on its own line with its reason), 2 usage, model or output problem.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from xray_ray.common import DEFAULT_MAX_FILE_MB, add_model_file_flags, atomic_file, cli
from xray_ray.data.images import IMAGE_EXTENSIONS
from xray_ray.errors import UserError

if TYPE_CHECKING:  # the runtime (onnxruntime) loads only once the arguments are good
    from xray_ray.serve.runtime import ExportedModel

COLUMNS = ("path", "prob_pneumonia", "label", "error")  # a NORMAL/PNEUMONIA model's; see columns()


def columns(model: ExportedModel) -> tuple[str, ...]:
    """The columns of predict's table for a model: path, its probability columns and label, error."""
    if model.k == 2:
        return ("path", *model.score_columns, "label", "error")
    return ("path", "label", *model.score_columns, "error")


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; folders expanded to their image files (recursive, sorted, hidden names skipped)."""
    out: list[Path] = []
    for given in map(Path, paths):
        if not given.is_dir():
            out.append(given)  # a missing or unreadable file is reported on its own line, not fatal
            continue
        found = []
        for root, dirs, files in os.walk(given):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [
                Path(root, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS
            ]
        if not found:
            print(f"warning: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {given}", file=sys.stderr)
        out += sorted(found)
    return out


def _output(target: str) -> Path:
    """The output table's path, refused in one sentence when it cannot be a file."""
    path = Path(target)
    if not path.parent.is_dir():
        raise UserError(f"the folder of the output file {path} does not exist; create it first.")
    if path.is_dir():
        raise UserError(f"the output {path} is a folder; give a file name.")
    return path


def _write_csv(results: Iterator[dict], out: Path, names: Sequence[str] = COLUMNS) -> None:
    with atomic_file(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(names))
        writer.writeheader()
        for r in results:
            writer.writerow(r)


def _write_parquet(
    results: Iterator[dict], out: Path, names: Sequence[str] = COLUMNS, rows_per_group: int = 4096
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, pa.float64() if c.startswith("prob_") else pa.string()) for c in names])
    with atomic_file(out) as f, pq.ParquetWriter(f, schema) as writer:
        buffer: list[dict] = []
        for r in results:
            buffer.append(r)
            if len(buffer) >= rows_per_group:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                buffer = []
        writer.write_table(pa.Table.from_pylist(buffer, schema=schema))


def run(
    model_dir: str,
    paths: Sequence[str],
    *,
    batch_size: int = 64,
    csv_path: str | None = None,
    parquet_path: str | None = None,
    max_file_mb: float = DEFAULT_MAX_FILE_MB,
    allow_modified_model: bool = False,
) -> int:
    """Predict every image; print JSON lines or write a table. Returns the exit status (0 or 1)."""
    from xray_ray.serve.runtime import load_exported

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    if not max_file_mb > 0:
        raise UserError(f"--max-file-mb must be positive, got {max_file_mb:g}.")
    target = csv_path or parquet_path
    out = _output(target) if target is not None else None
    model = load_exported(model_dir, allow_modified=allow_modified_model)
    files = find_images(paths)
    if not files:
        raise UserError("no image files found in the given paths; pass image files or folders that hold some.")
    counts = {"ok": 0, "failed": 0, **dict.fromkeys(model.classes, 0)}

    def counted() -> Iterator[dict]:
        for r in model.predict_files(files, batch_size=batch_size, max_bytes=int(max_file_mb * 2**20)):
            if "error" in r:
                counts["failed"] += 1
            else:
                counts["ok"] += 1
                counts[r["label"]] += 1
            yield r

    if out is None:
        for r in counted():
            print(json.dumps(r), flush=True)
    else:
        try:
            (_write_csv if csv_path else _write_parquet)(counted(), out, columns(model))
        except OSError as e:  # read-only place, no permission, disk full: the old file, if any, is untouched
            raise UserError(
                f"cannot write {out} ({e.strerror or type(e).__name__}); choose a writable place for the table."
            ) from None
        print(
            f"wrote {counts['ok'] + counts['failed']} rows to {target}: {counts['ok']} predicted "
            f"({_called(model, counts)}), {counts['failed']} failed"
        )
    return 1 if counts["failed"] else 0


def _called(model: ExportedModel, counts: dict[str, int]) -> str:
    """How many images each class was called, for the summary line."""
    if model.threshold is not None:
        return f"{counts[model.classes[1]]} {model.classes[1]} at threshold {model.threshold:.4f}"
    return ", ".join(f"{counts[c]} {c}" for c in model.classes) + " by the arg-max"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="xray-ray predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="exported model folder (model.json + model.onnx)")
    ap.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders")
    ap.add_argument("--batch-size", type=int, default=64, help="images per onnxruntime call (default 64)")
    out = ap.add_mutually_exclusive_group()
    out.add_argument("--csv", metavar="OUT", help="write a CSV table instead of JSON lines")
    out.add_argument("--parquet", metavar="OUT", help="write a Parquet table instead of JSON lines")
    add_model_file_flags(ap)
    args = ap.parse_args(argv)
    return cli(
        lambda: run(
            args.model,
            args.paths,
            batch_size=args.batch_size,
            csv_path=args.csv,
            parquet_path=args.parquet,
            max_file_mb=args.max_file_mb,
            allow_modified_model=args.allow_modified_model,
        )
    )
