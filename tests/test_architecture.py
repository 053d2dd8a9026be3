"""The house in wings: every module in one of six wings or among the few shared ones at the top, imports that
run down the flow, no import circle, no private name taken from another module, and a serve wing that reaches
neither torch nor Ray through any chain of imports (lazy ones included)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "xray_ray"
WINGS = ("data", "model", "search", "ship", "serve", "studies")
# a wing may import the wings after it in this flow (and the shared modules); serve is beside the flow:
# it uses data and the shared modules, and ship, search and studies may use it
FLOW = ("studies", "search", "ship", "model", "data")
MAY_USE_SERVE = {"ship", "search", "studies"}
MAX_SHARED = 8
HEAVY = ("torch", "torchvision", "ray")


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def imports(name: str) -> tuple[frozenset[str], frozenset[str], tuple[tuple[str, str], ...]]:
    """(modules of this package it imports, top-level names of outside packages, (module, private name) pairs),
    every import statement counted, at the top of the file or inside a function."""
    path = modules()[name]
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    ours, outside, private = set(), set(), []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                (ours if a.name in modules() else outside).add(a.name if a.name in modules() else a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else []))
            base = base if node.level else (node.module or "")
            if not base.startswith("xray_ray"):
                outside.add(base.split(".")[0])
                continue
            for a in node.names:
                if f"{base}.{a.name}" in modules():
                    ours.add(f"{base}.{a.name}")
                else:
                    ours.add(base)
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        private.append((base, a.name))
    ours.discard(name)
    return frozenset(ours), frozenset(outside), tuple(private)


def wing(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in WINGS else "shared"


def closure(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += imports(m)[0]
    return seen


def test_every_module_is_in_a_wing_or_one_of_a_few_shared_ones():
    for w in WINGS:
        assert (PACKAGE / w / "__init__.py").is_file(), w
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(top) <= MAX_SHARED, top
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(WINGS)
    for w in WINGS:  # one level of wings: a wing holds modules, not sub-wings
        assert not [p for p in (PACKAGE / w).iterdir() if p.is_dir() and p.name != "__pycache__"], w


def test_imports_run_down_the_flow():
    upward = []
    for a in modules():
        for b in imports(a)[0]:
            wa, wb = wing(a), wing(b)
            if wa == wb or b == "xray_ray" or wb == "shared" and wa != "shared":
                continue
            if wa == "shared":
                ok = False  # the shared modules sit below every wing
            elif wa == "serve":
                ok = wb == "data"
            elif wb == "serve":
                ok = wa in MAY_USE_SERVE
            else:
                ok = FLOW.index(wa) < FLOW.index(wb)
            if not ok:
                upward.append(f"{a} -> {b}")
    assert not upward, upward


def test_no_two_modules_import_each_other_through_any_chain():
    circles = sorted({tuple(sorted((a, b))) for a in modules() for b in closure(a) if b != a and a in closure(b)})
    assert not circles, circles


def test_no_module_imports_another_modules_private_names():
    taken = [(m, f"{base}.{n}") for m in modules() for base, n in imports(m)[2] if base != m]
    assert not taken, taken


LIGHT = {
    "serve": [m for m in modules() if wing(m) == "serve"],
    # the package itself, and the discovery, splits and decoding that serve reads labelled folders through
    "data": ["xray_ray.data", "xray_ray.data.sources", "xray_ray.data.splits", "xray_ray.data.images"],
}


@pytest.mark.parametrize("entry", sorted(LIGHT))
def test_serve_and_the_data_package_reach_neither_torch_nor_ray(entry):
    """Statically, through every chain of imports (lazy ones too), and by import in a fresh interpreter."""
    reach = set().union(*(closure(m) for m in LIGHT[entry]))
    heavy = {m: sorted(imports(m)[1] & set(HEAVY)) for m in reach if imports(m)[1] & set(HEAVY)}
    assert not heavy, heavy
    code = (
        f"import importlib, sys\nfor m in {sorted(reach)!r}:\n    importlib.import_module(m)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]", res.stdout


def test_no_module_is_left_at_an_old_path():
    old = ["predict", "evaluate", "runtime", "search_args", "pipeline", "models", "trial", "rayinit", "collect"]
    for name in old:
        assert importlib.util.find_spec(f"xray_ray.{name}") is None, name
    assert not (PACKAGE / "search.py").exists() and not (PACKAGE / "data.py").exists()


def test_the_tests_mirror_the_wings():
    for w in WINGS:
        have = {p.stem.removeprefix("test_") for p in (ROOT / "tests" / w).glob("test_*.py")}
        assert have, w
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names))  # pytest imports test files by their base name
