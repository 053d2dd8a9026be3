"""A run's folder: its name, not a foreign folder, the same run when resumed, and the clean-up after a kill.

``open_run`` checks all of it before a search starts; ``best/`` itself is the ship wing's (``ship.best``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from xray_ray import results as R
from xray_ray.common import is_temp_name, json_safe, restore_dir
from xray_ray.errors import UserError
from xray_ray.search.spaces import SearchSpace
from xray_ray.ship.best import EXPORT_FILES, check_best_is_ours, ours_in_best

RUN_NAME = r"[A-Za-z0-9._-]{1,200}"


def check_run_name(name: str, source: str) -> str:
    """`name` if it is one plain path component (letters, digits, '-', '_', '.'; not '.' or '..')."""
    if not isinstance(name, str) or not re.fullmatch(RUN_NAME, name) or name in (".", ".."):
        fix = "choose another --name" if source == "--name" else "change its name: or pass --name"
        raise UserError(
            f"the run name {name!r} (from {source}) must be one plain folder name of letters, digits, "
            f"'-', '_' and '.' (not '.' or '..'), at most 200 characters; {fix}."
        )
    return name


def _names_in(location: str) -> list[str] | None:
    """Names directly inside a folder (local or URI); None when there is no such folder."""
    fs, path = R.resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.Directory:
        return [""]  # a file where the folder should be: probe_writable says so in its own words
    return [i.base_name for i in fs.get_file_info(pafs.FileSelector(path, recursive=False))]


def check_not_foreign(run_dir: str) -> None:
    """Refuse a non-empty folder without run.json: it is not a run of this project, and nothing in it is ours."""
    names = _names_in(run_dir)
    if names is None or names == [""]:
        return
    foreign = sorted(n for n in names if n != ".write-probe" and not is_temp_name(n))
    if foreign:
        raise UserError(
            f"{run_dir} is not empty and holds no run of xray_ray (no run.json; it has "
            f"{', '.join(map(repr, foreign[:3]))}{', ...' if len(foreign) > 3 else ''}); choose "
            "another --name or --results."
        )


def _whole_model(folder: Path) -> bool:
    from xray_ray.serve.runtime import load_exported

    try:
        load_exported(folder)
        return True
    except UserError:
        return False


def clean_leftovers(run_dir: Path) -> list[Path]:
    """Remove what a killed run left (--resume): temporary files beside the tables and in best/, and
    unfinished or replaced best.new-*/best.old-* folders, after putting a whole best/ back if it is missing."""
    removed = restore_dir(run_dir / "best", _whole_model)
    for folder, ours in (
        (run_dir, is_temp_name),
        (run_dir / "best", lambda n: n not in EXPORT_FILES and ours_in_best(n)),
    ):
        if folder.is_dir() and not folder.is_symlink():
            for p in folder.iterdir():
                if ours(p.name) and p.is_file() and not p.is_symlink():
                    p.unlink(missing_ok=True)
                    removed.append(p)
    return removed


@dataclass
class RunFolder:
    """Where a run's results go, the run it holds already, and whether an interrupted run can be resumed."""

    name: str
    path: str
    previous: dict[str, Any] | None
    started: bool  # run.json is written: an interrupted run can be resumed


def open_run(
    results: str, name: str, *, data: str, space: SearchSpace, resume: bool, export_only: bool, export: bool
) -> RunFolder:
    """The run `name`'s folder under `results`, checked: a new run's is not foreign, a resumed one is the same
    run (data, space, seed); best/ is ours when the run exports; leftovers of a killed run cleaned; writable."""
    run_dir = R.join(str(results), name) if R.is_uri(results) else str(Path(results).resolve() / name)
    run_json = R.join(run_dir, "run.json")
    previous = R.read_json(run_json) if R.exists(run_json) else None
    if previous is None:
        check_not_foreign(run_dir)
    check_resumable(run_dir, previous, data=data, space=space, resume=resume, export_only=export_only)
    if export and not R.is_uri(run_dir):
        check_best_is_ours(Path(run_dir) / "best")
    if resume and not R.is_uri(run_dir):
        try:
            clean_leftovers(Path(run_dir))
        except OSError as e:
            raise UserError(
                f"cannot clean up the results folder {run_dir} ({e.__class__.__name__}: {e}); "
                f"choose a writable --results."
            ) from None
    try:
        R.probe_writable(run_dir)
    except OSError as e:
        raise UserError(
            f"cannot write to the results folder {run_dir} ({e.__class__.__name__}: {e}); choose a writable --results."
        ) from None
    return RunFolder(name=name, path=run_dir, previous=previous, started=previous is not None)


def check_resumable(
    run_dir: str, previous: dict[str, Any] | None, *, data: str, space: SearchSpace, resume: bool, export_only: bool
) -> None:
    """Refuse a new run over an old one, a resume of another run, and --resume or --export-only with no run."""
    if previous is not None and not resume:
        raise UserError(
            f"the results folder {run_dir} already holds a run; pass --resume to continue it, "
            f"or choose another --name or --results."
        )
    if previous is not None and (
        previous.get("data", {}).get("spec") != data
        or previous.get("space") != json_safe(space.to_dict())
        or previous.get("seed") != space.seed
    ):
        raise UserError(
            f"the results folder {run_dir} holds a different run (data, space or seed differ); "
            f"resume it with the same --data, --space and --seed, or choose another --name."
        )
    if export_only and not resume:
        raise UserError("--export-only works on an existing run; add --resume.")
    if resume and previous is None:
        raise UserError(f"there is no run to resume in {run_dir}; start it without --resume.")
