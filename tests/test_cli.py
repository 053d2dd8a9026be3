"""The `xray-ray` console command and `python -m xray_ray <command>` (and the two package forms,
`python -m xray_ray.search` and `python -m xray_ray.data inspect`) run the same tools, from a fresh process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from conftest import ROOT, run_module, unavailable
from xray_ray.cli import COMMANDS

# subcommand -> the `python -m` form it stands for
MODULE_FORM = {
    "search": ["xray_ray.search"],
    "predict": ["xray_ray", "predict"],
    "evaluate": ["xray_ray", "evaluate"],
    "adapt": ["xray_ray", "adapt"],
    "inspect": ["xray_ray.data", "inspect"],
    "stability": ["xray_ray", "stability"],
    "ablation": ["xray_ray", "ablation"],
}


def installed_script() -> str | None:
    """The console script pip installed beside this interpreter (a venv's bin/), if any."""
    return shutil.which("xray-ray", path=str(Path(sys.executable).parent))


def without_timings(stdout: str) -> dict:
    """The JSON report minus its wall-clock fields, which differ from run to run."""
    report = json.loads(stdout)
    return {k: v for k, v in report.items() if "second" not in k}


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([script, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)


def test_pyproject_declares_the_console_command() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"xray-ray": "xray_ray.cli:main"}
    assert set(COMMANDS) == set(MODULE_FORM)


@pytest.mark.parametrize("form", [["xray_ray.cli"], ["xray_ray"]], ids=["cli module", "package"])
def test_help_lists_every_command_without_loading_torch_or_ray(form: list[str]) -> None:
    code = f"""
import runpy, sys
sys.argv = ["xray-ray", "--help"]
try:
    runpy.run_module({form[0]!r}, run_name="__main__")
except SystemExit as e:
    assert e.code == 0, e.code
heavy = {{"torch", "ray"}} & set(sys.modules)
assert not heavy, heavy
"""
    res = run_module("", code=code)
    assert res.returncode == 0, res.stderr
    for name in COMMANDS:
        assert name in res.stdout, res.stdout


def test_each_command_prints_the_help_of_its_python_m_form() -> None:
    # One fresh interpreter for all ten: `xray-ray <command> --help` through cli.main, and the module run
    # as __main__ exactly as `python -m` runs it.
    code = f"""
import contextlib, io, json, runpy, sys
from xray_ray.cli import main
forms, out = {MODULE_FORM!r}, {{}}
for command, (module, *prefix) in forms.items():
    for how in ("cli", "module"):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            try:
                if how == "cli":
                    code = main([command, "--help"])
                else:
                    sys.argv = [module, *prefix, "--help"]
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code
        out[command + " " + how] = [code, buf.getvalue()]
print(json.dumps(out))
"""
    res = run_module("", code=code)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.splitlines()[-1])
    for command in MODULE_FORM:
        (cli_code, cli_help), (module_code, module_help) = out[f"{command} cli"], out[f"{command} module"]
        assert cli_code in (0, None) and module_code in (0, None), (command, cli_code, module_code)
        assert cli_help == module_help and "usage:" in cli_help, command


def test_a_real_command_gives_the_same_answer_both_ways() -> None:
    via_cli = run_module("xray_ray.cli", "inspect", "synthetic:40", "--json")
    via_module = run_module("xray_ray.data", "inspect", "synthetic:40", "--json")
    assert via_cli.returncode == via_module.returncode == 0, via_cli.stderr + via_module.stderr
    assert without_timings(via_cli.stdout) == without_timings(via_module.stdout)
    assert without_timings(via_cli.stdout)["by_split"]["train"]["total"] == 40


def test_user_errors_keep_exit_status_2_and_one_line() -> None:
    unknown = run_module("xray_ray.cli", "serach")
    assert unknown.returncode == 2 and "unknown command 'serach'" in unknown.stderr
    missing = run_module("xray_ray.cli", "inspect", "/nonexistent/chest_xray")
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr
    assert run_module("xray_ray.cli").returncode == 2


def test_the_installed_console_script_runs() -> None:
    script = installed_script()
    if script is None:
        message = (
            f"no xray-ray script beside {sys.executable}; `pip install -e .` (or `make install`, which "
            "reinstalls when pyproject.toml changes) puts it there"
        )
        unavailable(message)
    res = run_script(script, "--help")
    assert res.returncode == 0, res.stderr
    assert all(name in res.stdout for name in COMMANDS), res.stdout
    res = run_script(script, "inspect", "synthetic:40", "--json")
    assert res.returncode == 0, res.stderr
    assert without_timings(res.stdout)["by_split"]["train"]["total"] == 40
