"""The search's driver imports no torch: a structural fact of its modules, checked in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DRIVER = (
    "xray_ray.search.command",
    "xray_ray.cli",
    "xray_ray.search.tuner",
    "xray_ray.search.ray_setup",
    "xray_ray.search.tables",
    "xray_ray.ship.best",
    "xray_ray.search.trial",
)


def test_the_driver_modules_import_no_torch():
    code = (
        f"import sys, importlib\nfor m in {DRIVER!r}:\n    importlib.import_module(m)\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]", res.stdout


def test_the_trial_loop_is_the_torch_side():
    """trial_loop imports torch at the top; no driver module names it outside a function body."""
    import ast

    for name in DRIVER:
        tree = ast.parse((ROOT / (name.replace(".", "/") + ".py")).read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name for n in top if isinstance(n, ast.Import) for a in n.names} | {
            n.module for n in top if isinstance(n, ast.ImportFrom) and n.module
        }
        assert not any(m == "torch" or m.startswith("torch.") or m == "xray_ray.search.trial_loop" for m in names), name
    assert "import torch" in (ROOT / "xray_ray" / "search" / "trial_loop.py").read_text()
