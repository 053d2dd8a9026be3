"""What one trial is, seen from the driver: its runtime settings, its seed, the columns of an unscored epoch.

This module imports no torch: the driver and the trial loop (:mod:`xray_ray.search.trial_loop`, the torch
side) both read it. The function Tune runs in a trial worker is :func:`xray_ray.search.tuner.trainable`.
"""

from __future__ import annotations

import ctypes
import gc
import json
import sys
import zlib
from dataclasses import dataclass
from typing import Any

from xray_ray.config import TrialConfig
from xray_ray.model.robustness import COMPOSITES, SHIFTS


@dataclass(kw_only=True)
class Runtime:
    """Per-trial settings that are not hyperparameters (keywords only)."""

    cpus_per_trial: float
    gpus_per_trial: float
    data_cpus: float
    data_tasks: int
    metric: str
    mode: str
    pos_fraction: float
    # the data's classes in label order; with K > 2 the model has K logits and each class's share of train
    classes: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
    class_fractions: tuple[float, ...] = ()
    prefetch: bool = True  # start each next epoch's Ray Data stream while the current one validates
    data_slot: str | None = None  # custom resource capping augmentation tasks across trials (local runs)
    score_epochs: tuple[int, ...] = ()  # epochs scored on the shift battery besides each trial's last (ASHA's rungs)
    fault_dir: str | None = None  # where the tests' fault hook keeps its markers (xray_ray.faults): the run's own
    faults: str = ""  # the tests' faults to inject (xray_ray.faults.spec()): empty outside those tests


# in each trial checkpoint: the trial's epoch reports so far, as JSON (the tables fill epochs Tune's files lost)
HISTORY_FILE = "history.json"
# and its training state (torch.save of tensors and numbers only, loaded with weights_only=True)
STATE_FILE = "state.pt"
# every file a trial checkpoint holds: one without all of them is not whole (a kill while it was deleted)
CHECKPOINT_FILES = (STATE_FILE, "best.safetensors", "config.json", HISTORY_FILE)

# the robustness columns of an epoch that was not scored on the battery
UNSCORED: dict[str, Any] = {
    **{f"shift_{m}__{n}": float("nan") for n in SHIFTS for m in ("auc", "loss")},
    **{c: float("nan") for c in COMPOSITES},
    "rob_worst_shift": "",
}


def release_freed_memory() -> None:
    """Collect garbage and hand the heap's free pages back to the OS (glibc keeps them otherwise).

    Trial workers are reused (``reuse_actors``); without this a worker's resident memory creeps up from
    trial to trial.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


# settings added after the first release: left out of the seed's hash while at their default, so that a
# configuration that does not use them draws exactly what it drew before they existed
_LATER_SETTINGS = ("standardize", "swa", "sampler", "mixup", "crop", "erase", "keep")


# settings that change no training step (which epoch's weights are kept): never in the seed's hash, so that
# configurations differing only in them train the very same weights
_SELECTION_SETTINGS = ("keep_metric",)


def trial_seed(cfg: TrialConfig) -> int:
    """A seed fixed by the run's seed and the trial's own hyperparameters."""
    d, default = cfg.to_dict(), TrialConfig.defaults()
    for k in _SELECTION_SETTINGS:
        del d[k]
    for k in _LATER_SETTINGS:
        if d[k] == default[k]:
            del d[k]
    return zlib.crc32(json.dumps(d, sort_keys=True).encode()) % (2**31)
