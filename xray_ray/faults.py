"""The fault-injection hook of the fault-tolerance tests: inert unless a test switches it on.

Two variables must both be set for anything to happen: ``XRAY_RAY_TESTING=1`` (the test-only switch) and
``XRAY_RAY_INJECT_FAULT``, faults separated by ';', each ``KIND[:epoch=N][,once=NAME]``, e.g.
``kill:epoch=2,once=killed``; ``epoch=*`` is every epoch (the default is 1). KIND: raise (RuntimeError), oom
(torch.OutOfMemoryError, as CUDA raises it), kill (SIGKILL to the trial's own process, as the kernel's or Ray's
OOM killer does), slow (``seconds=S``: the epoch starts S seconds late, as on a data set that takes longer to
train on, without the CPU time; the cluster tests need epochs that last on any machine). With once=NAME only
the trial that creates the marker file NAME first fails, so retries and other trials run on; NAME is one
plain file name, created inside the run's own folder (``<run>/tune/.faults``), never anywhere else.
The driver reads the two variables when a search starts (``spec``) and hands the faults to its trials in
their Runtime, so a Ray started before the test set them carries them too.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

FAULT_ENV = "XRAY_RAY_INJECT_FAULT"
SWITCH_ENV = "XRAY_RAY_TESTING"
_PLAIN = re.compile(r"^[A-Za-z0-9_.-]+$")


def active() -> bool:
    """True only when a test switched the hook on and named a fault."""
    return os.environ.get(SWITCH_ENV) == "1" and bool(os.environ.get(FAULT_ENV))


def spec() -> str:
    """The faults to inject, for a search to hand to its trials: empty unless a test switched the hook on."""
    return os.environ[FAULT_ENV] if active() else ""


def inject_fault(epoch: int, marker_dir: str | os.PathLike | None, faults: str) -> None:
    """Fail on purpose at ``epoch`` where ``faults`` (a ``spec()``) says so; a no-op when it is empty."""
    for spec in filter(None, faults.split(";")):
        kind, _, opts = spec.partition(":")
        options = dict(kv.split("=", 1) for kv in opts.split(",") if "=" in kv)
        if options.get("epoch", "1") not in ("*", str(epoch)):
            continue
        if "once" in options:
            name = options["once"]
            if not _PLAIN.match(name) or name in (".", "..") or marker_dir is None:
                raise ValueError(f"{FAULT_ENV}: once= takes a plain file name kept in the run's folder, got {name!r}")
            folder = Path(marker_dir)
            folder.mkdir(parents=True, exist_ok=True)
            try:
                os.close(os.open(folder / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600))
            except FileExistsError:
                continue
        if kind == "slow":
            time.sleep(float(options["seconds"]))
            continue
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "oom":
            import torch

            raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_ENV} at epoch {epoch})")
        raise RuntimeError(f"injected fault at epoch {epoch} ({FAULT_ENV}: {spec})")
