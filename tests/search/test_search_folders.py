"""search.run()'s results folder: run names, folders that are not runs, a best/ the export did not write,
what a killed run leaves, and the whole-folder swap of a re-export (--resume --export-only).

None of these starts Ray: every refusal comes before it, and the swap is driven directly in a child that
is SIGKILLed at each of its renames.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import model_copy, one_error_line, tiny_space_file
from xray_ray.common import json_safe
from xray_ray.search import command as search
from xray_ray.search import run_folder
from xray_ray.search.spaces import load_space
from xray_ray.serve import runtime
from xray_ray.serve.runtime import VAL_SCORES_FILE
from xray_ray.ship import best as ship

ROOT = Path(__file__).resolve().parents[2]


def space_file(tmp: Path, name: str = "folders") -> Path:
    return tiny_space_file(tmp, name=name, space={"epochs": 2}, filename="space.yaml")


def args(tmp: Path, *extra: str, data: str = "synthetic:100", name: str = "folders") -> list[str]:
    return [
        "--data",
        data,
        "--space",
        str(space_file(tmp, name)),
        "--results",
        str(tmp / "results"),
        "--cache",
        str(tmp / "cache"),
        "--num-cpus",
        "2",
        *extra,
    ]


@pytest.fixture
def no_ray(monkeypatch) -> list:
    """Records ray.init calls, and refuses them: nothing here may start Ray."""
    import ray

    calls: list = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append(k) or pytest.fail("Ray was started"))
    return calls


def _all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


BAD_NAMES = ["../victim", "/ABS/victim", "a/../../../victim", "a/b", ".", "..", "new\nline", "sp ace", "é"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
@pytest.mark.parametrize("source", ["--name", "space file"])
def test_a_run_name_that_is_not_one_plain_folder_name_is_refused_before_anything_is_written(
    tmp_path, capsys, no_ray, name, source
):
    name = name.replace("/ABS", str(tmp_path))
    argv = args(tmp_path, "--name", name) if source == "--name" else args(tmp_path, name=name)
    before = _all_files(tmp_path)
    assert search.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "must be one plain folder name" in line and ("(from --name)" in line) == (source == "--name")
    assert _all_files(tmp_path) == before  # nothing written: no results/, no victim/, no cache


@pytest.mark.parametrize("name", ["run-1", "my_run.v2", "A.b-c_9", ".hidden"])
def test_plain_names_are_accepted(name):
    assert run_folder.check_run_name(name, "--name") == name


def test_a_non_empty_folder_that_is_not_a_run_is_refused(tmp_path, capsys, no_ray):
    run = tmp_path / "results" / "folders"
    (run / "best").mkdir(parents=True)
    (run / "best" / "important.txt").write_text("mine")
    assert search.main(args(tmp_path)) == 2
    assert "is not empty and holds no run of xray_ray" in one_error_line(capsys.readouterr().err)
    assert (run / "best" / "important.txt").read_text() == "mine" and sorted(os.listdir(run)) == ["best"]


def _previous_run(tmp_path: Path, data: str) -> Path:
    """run.json of an earlier run with this space and data, as run() wrote it, so --resume goes on."""
    run = tmp_path / "results" / "folders"
    run.mkdir(parents=True)
    space = load_space(str(space_file(tmp_path)))
    (run / "run.json").write_text(
        json.dumps(
            {
                "name": "folders",
                "started": "2026-01-01T00:00:00+00:00",
                "seed": space.seed,
                "space": json_safe(space.to_dict()),
                "data": {"spec": data},
                "status": "interrupted",
            }
        )
    )
    return run


def test_a_best_folder_holding_files_the_export_did_not_write_is_never_replaced(tmp_path, capsys, no_ray, tiny_model):
    run = _previous_run(tmp_path, "synthetic:100")
    model_copy(tiny_model, run / "best")
    (run / "best" / "important.txt").write_text("mine")
    assert search.main(args(tmp_path, "--resume", "--export-only")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "holds files the export did not write ('important.txt')" in line
    assert (run / "best" / "important.txt").read_text() == "mine"
    new = run / "best.new-0000"
    model_copy(tiny_model, new)
    with pytest.raises(ship.UserError, match="did not write"):
        ship.install_best(new, run / "best")
    assert (run / "best" / "important.txt").read_text() == "mine" and new.is_dir()


def test_resume_removes_what_a_killed_run_left(tmp_path, capsys, no_ray, tiny_model):
    """Temporary files beside the tables and in best/ (this and older versions' names) and unfinished or
    replaced best.new-*/best.old-* folders go; the tables, the model and the user's own files stay."""
    data = str(tmp_path / "data-gone")  # the resume stops at the data, after its clean-up, before Ray
    run = _previous_run(tmp_path, data)
    model_copy(tiny_model, run / "best")
    leftovers = [
        "epochs.parquet.tmp-1a2b3c4d",
        ".trials.parquet.tmp-5e6f7a8b",
        ".run.json.tmp-abcdef12",
        "best/.model.onnx.k2j3h4g5",
        "best/.model.json.tmp4242",
        "best/.report.html.tmp",
        "best/.roc.png.tmp",
        "best/.weights.safetensors.tmp-0f0f0f0f",
    ]
    for rel in leftovers:
        (run / rel).write_bytes(b"partial")
    (run / "best.new-11111111").mkdir()  # an export killed while building
    (run / "best.new-11111111" / "weights.safetensors").write_bytes(b"partial")
    model_copy(tiny_model, run / "best.old-22222222")  # a swap killed before deleting the old model
    (run / "trials.parquet").write_bytes(b"table")
    (run / "notes.md").write_text("mine")
    keep = _all_files(run) - set(leftovers) - {p for p in _all_files(run) if p.startswith("best.")}
    assert search.main(args(tmp_path, "--resume", data=data)) == 2
    assert "does not exist" in one_error_line(capsys.readouterr().err)
    assert _all_files(run) == keep
    assert runtime.load_exported(run / "best").card["trial_id"] is None


_SWAP = """
import os, shutil, signal, sys
from pathlib import Path
from xray_ray import common
from xray_ray.ship import best as ship

new, best, kill_at, mode = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
steps = 0

def step(real):
    def wrapped(*args, **kwargs):
        global steps
        steps += 1
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9 just before this rename (or the delete after)
        return real(*args, **kwargs)
    return wrapped

if mode == "two renames":  # a kernel or filesystem without an atomic exchange
    common._exchange = lambda a, b: False
else:
    common._exchange = step(common._exchange)
os.rename, os.replace, shutil.rmtree = step(os.rename), step(os.replace), step(shutil.rmtree)
ship.install_best(new, best)
print(steps)
"""


def _swap(new: Path, best: Path, kill_at: int, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", _SWAP, str(new), str(best), str(kill_at), mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("mode", ["atomic exchange", "two renames"])
def test_a_kill_at_every_rename_of_the_best_swap_leaves_a_loadable_best(tmp_path, tiny_model, mode):
    def trial(folder: Path) -> str:
        return runtime.load_exported(folder).card["trial_id"]

    def setup(k: int) -> tuple[Path, Path]:
        run = tmp_path / f"run{k}"
        card = json.loads((tiny_model / "model.json").read_text())
        model_copy(tiny_model, run / "best", card={**card, "trial_id": "old"})
        model_copy(tiny_model, run / "best.new-abcd1234", card={**card, "trial_id": "new"})
        return run / "best.new-abcd1234", run / "best"

    new, best = setup(0)
    done = _swap(new, best, 0, mode)  # not killed: count the steps
    assert done.returncode == 0, done.stderr
    steps = int(done.stdout)
    assert steps == (2 if mode == "atomic exchange" else 3)  # exchange + delete, or rename x2 + delete
    assert trial(best) == "new" and sorted(os.listdir(best.parent)) == ["best"]
    for k in range(1, steps + 1):
        new, best = setup(k)
        killed = _swap(new, best, k, mode)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        if mode == "atomic exchange" or k != 2:
            assert trial(best) == ("old" if k == 1 else "new"), k  # loadable at once, whatever the moment
        else:  # killed between the two renames: --resume's clean-up puts the whole old model back
            assert not best.exists()
        run_folder.clean_leftovers(best.parent)
        assert trial(best) == ("old" if k in (1, 2) and (k == 1 or mode == "two renames") else "new"), k
        assert sorted(os.listdir(best.parent)) == ["best"], k


def test_the_export_file_list_matches_what_the_export_writes():
    """ship.EXPORT_FILES decides what best/ may hold; report.PICTURES and export's names must be in it."""
    from xray_ray.ship import export, report

    names = {
        export.ONNX_NAME,
        export.TORCHSCRIPT_NAME,
        export.WEIGHTS_NAME,
        export.CONFIG_NAME,
        "model.json",
        VAL_SCORES_FILE,
        "report.html",
        *report.PICTURES,
    }
    assert names == set(ship.EXPORT_FILES)
