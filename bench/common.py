"""What every benchmark here shares: where the data is, the machine it ran on, the table, the JSON line."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"
OUT = ROOT / "bench" / "out"


def default_data(synthetic: str = "synthetic:2000") -> str:
    """The real images beside the checkout when present, else synthetic phantoms."""
    return str(REAL) if REAL.is_dir() else synthetic


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def machine() -> dict[str, Any]:
    """Cores, CPU model and the versions that decide the numbers."""
    import torch

    try:
        import ray
    except ImportError:  # bench/gpu.py runs where only torch is installed
        ray = None
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__ if ray is not None else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Left-aligned first column, right-aligned figures; floats with 2-3 significant decimals."""

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    print(line([str(h) for h in header]))
    for r in cells:
        print(line(r))


def derived_space(space_file: Path, folder: Path, label: str, changes: dict[str, dict]) -> Path:
    """A copy of a search-space file named ``<name>-<label>``, its sections updated with ``changes``."""
    import yaml

    doc = yaml.safe_load(Path(space_file).read_text())
    doc["name"] = f"{doc.get('name', Path(space_file).stem)}-{label}"
    for section, entries in changes.items():
        doc.setdefault(section, {}).update(entries or {})
    path = Path(folder) / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def emit(result: dict[str, Any], out_dir: Path | None, name: str) -> None:
    """Write ``<out>/<name>.json`` (when an out folder is given) and print the same object as the last line."""
    text = json.dumps(result, default=_default)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.json").write_text(text + "\n")
    print(text, flush=True)


def _default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-able: {type(o).__name__}")
