"""Typed trial config and search-space files.

A trial is described by one flat, frozen :class:`TrialConfig` (defaults defined here once). A search-space
YAML file says which of its fields are searched and how, plus the searcher and scheduler settings. Unknown
keys, wrong types and empty ranges are rejected with a sentence that names the key.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from xray_ray.errors import UserError

MAX_EPOCHS = 100


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs: model sizes, training and augmentation settings."""

    # model (names match models.CNNConfig)
    image_size: int = 64
    blocks: int = 4
    double_conv: bool = True
    width: int = 16
    growth: float = 2.0
    max_width: int = 256
    dropout: float = 0.2
    head: str = "gap"
    fc: tuple[int, ...] = (64,)
    standardize: bool = False  # per-image standardisation inside the model instead of a fixed (x-0.5)/0.25
    # training
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: int = 0
    class_weighting: str = "none"
    label_smoothing: float = 0.0
    ema: float = 0.0
    swa: float = 0.0  # share of the last epochs whose weights are averaged (stochastic weight averaging); 0: off
    sampler: str = "none"  # "balanced": each epoch draws both classes equally often (rows repeated or left out)
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup between images of a batch; 0: off
    # augmentation strengths (0 switches each off)
    zoom: float = 0.3
    rotate: float = 0.0
    shift: float = 0.0
    hflip: float = 0.0
    vflip: float = 0.5
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    blur: float = 0.0
    crop: float = 0.0  # random-resized crop: up to this share of the area cut away, aspect 3/4..4/3; 0: off
    erase: float = 0.0  # chance of erasing one random rectangle (2-25% of the area) of each image; 0: off
    # reproducibility
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fc"] = list(self.fc)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrialConfig":
        """Build from a flat dict (e.g. Tune's config), checking names, types and ranges."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown trial setting '{unknown[0]}'; known settings are: {', '.join(sorted(names))}.")
        kwargs = {k: _coerce(k, v) for k, v in d.items()}
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        checks: list[tuple[bool, str]] = [
            (1 <= self.epochs <= MAX_EPOCHS, f"epochs must be between 1 and {MAX_EPOCHS}, got {self.epochs}"),
            (self.image_size >= 8, f"image_size must be at least 8, got {self.image_size}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.optimizer in ("adam", "adamw", "sgd"), f"optimizer must be adam, adamw or sgd, got '{self.optimizer}'"),
            (self.schedule in ("cosine", "constant"), f"schedule must be cosine or constant, got '{self.schedule}'"),
            (0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0,
             f"warmup_epochs must be below epochs, got {self.warmup_epochs}"),
            (self.class_weighting in ("none", "balanced"),
             f"class_weighting must be none or balanced, got '{self.class_weighting}'"),
            (0 <= self.label_smoothing < 0.5, f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}"),
            (self.ema == 0 or 0.5 <= self.ema < 1, f"ema must be 0 (off) or a decay in [0.5, 1), got {self.ema}"),
            (self.head in ("flatten", "gap"), f"head must be flatten or gap, got '{self.head}'"),
            (0 <= self.swa < 1, f"swa must be in [0, 1) (the share of final epochs averaged), got {self.swa}"),
            (not (self.swa and self.ema), "swa and ema both average weights; switch one of them off"),
            (self.sampler in ("none", "balanced"), f"sampler must be none or balanced, got '{self.sampler}'"),
            (0 <= self.mixup <= 1, f"mixup (alpha) must be between 0 and 1, got {self.mixup}"),
            (0 <= self.crop <= 0.9, f"crop must be between 0 and 0.9, got {self.crop}"),
        ]
        for name in ("zoom", "shift", "hflip", "vflip", "brightness", "contrast", "gamma", "erase"):
            v = getattr(self, name)
            checks.append((0 <= v <= 1, f"{name} must be between 0 and 1, got {v}"))
        checks.append((0 <= self.rotate <= 45, f"rotate (degrees) must be between 0 and 45, got {self.rotate}"))
        checks.append((0 <= self.blur <= 3, f"blur (sigma in pixels) must be between 0 and 3, got {self.blur}"))
        for ok, msg in checks:
            if not ok:
                raise UserError(msg + ".")


_FIELD_TYPES = {f.name: f.type for f in fields(TrialConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Check and coerce one value to the type of TrialConfig.<name>."""
    t = str(_FIELD_TYPES[name])
    if t == "tuple[int, ...]":
        if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
            raise UserError(f"'{name}' must be a list of integers, got {value!r}.")
        return tuple(int(v) for v in value)
    if t == "bool":
        if not isinstance(value, bool):
            raise UserError(f"'{name}' must be true or false, got {value!r}.")
        return value
    if t == "int":
        if not _is_int(value):
            raise UserError(f"'{name}' must be an integer, got {value!r}.")
        return int(value)
    if t == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"'{name}' must be a number, got {value!r}.")
        return float(value)
    if t == "str":
        if not isinstance(value, str):
            raise UserError(f"'{name}' must be a string, got {value!r}.")
        return value
    raise AssertionError(f"unhandled field type {t}")  # pragma: no cover


def _is_int(v: Any) -> bool:
    import numpy as np

    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


# --------------------------------------------------------------------------- search spaces

@dataclass(frozen=True)
class Param:
    """One searched parameter: a distribution over a TrialConfig field."""

    name: str
    kind: str  # "int" | "float" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()


@dataclass(frozen=True)
class SearchSpace:
    """A parsed search-space file."""

    name: str
    params: tuple[Param, ...]
    constants: Mapping[str, Any]
    num_samples: int = 8
    max_concurrent: int = 0  # 0: as many as the resources allow
    searcher: str = "optuna"  # "optuna" (TPE) | "random"
    scheduler: str = "asha"  # "asha" | "fifo"
    metric: str = "val_auc"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: int = 2
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    source: Mapping[str, Any] = field(default_factory=dict)

    @property
    def max_epochs(self) -> int:
        for p in self.params:
            if p.name == "epochs":
                return int(p.high if p.kind == "int" else max(p.choices))
        return int(self.constants.get("epochs", TrialConfig.epochs))

    @property
    def image_sizes(self) -> list[int]:
        for p in self.params:
            if p.name == "image_size":
                return sorted({int(c) for c in p.choices})
        return [int(self.constants.get("image_size", TrialConfig.image_size))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "space": {p.name: _param_to_dict(p) for p in self.params} | {k: _jsonable(v) for k, v in self.constants.items()},
            "searcher": {"algorithm": self.searcher, "num_samples": self.num_samples,
                         "max_concurrent": self.max_concurrent, "seed": self.seed},
            "scheduler": {"algorithm": self.scheduler, "metric": self.metric, "mode": self.mode,
                          "grace_period": self.grace_period, "reduction_factor": self.reduction_factor,
                          "max_t": self.max_epochs},
            "data": {"val_fraction": self.val_fraction, "test_fraction": self.test_fraction},
        }


METRICS = {"val_auc": "max", "val_loss": "min", "val_acc": "max", "val_score": "max", "val_brier": "min",
           # robustness composites over the shift battery (xray_ray.robustness): worst and mean AUC, mean log-loss
           "rob_auc_min": "max", "rob_auc_mean": "max", "rob_loss_mean": "min"}
_TOP_KEYS = {"name", "space", "searcher", "scheduler", "data"}
_SEARCHER_KEYS = {"algorithm", "num_samples", "max_concurrent", "seed"}
_SCHEDULER_KEYS = {"algorithm", "metric", "mode", "grace_period", "reduction_factor"}
_DATA_KEYS = {"val_fraction", "test_fraction"}
_PARAM_KEYS = {"type", "low", "high", "log", "choices"}


def load_space(path: str | Path) -> SearchSpace:
    """Read and validate a search-space YAML file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"search space file '{path}' does not exist; pass --space with a YAML file such as search_spaces/smoke.yaml.")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"search space file '{path}' is not valid YAML ({str(e).splitlines()[0]}); fix the syntax.") from None
    return parse_space(doc, default_name=p.stem)


def parse_space(doc: Any, default_name: str = "space") -> SearchSpace:
    """Validate a search-space document (already parsed from YAML)."""
    if not isinstance(doc, dict):
        raise UserError("a search space must be a mapping with a 'space' section.")
    _reject_unknown(doc, _TOP_KEYS, "")
    space = doc.get("space")
    if not isinstance(space, dict) or not space:
        raise UserError("the search space needs a non-empty 'space' section mapping settings to values or distributions.")
    params: list[Param] = []
    constants: dict[str, Any] = {}
    for name, spec in space.items():
        if name not in _FIELD_TYPES:
            raise UserError(f"unknown key 'space.{name}'; known settings are: {', '.join(sorted(_FIELD_TYPES))}.")
        if isinstance(spec, dict):
            params.append(_parse_param(name, spec))
        else:
            constants[name] = _coerce(name, spec)
    # every constant and every choice must make a valid config on its own
    base = TrialConfig.from_dict(constants)
    for prm in params:
        for v in _extremes(prm):
            try:
                TrialConfig.from_dict({**base.to_dict(), prm.name: v})
            except UserError as e:
                raise UserError(f"space.{prm.name}: {e}") from None
    searcher = _section(doc, "searcher", _SEARCHER_KEYS)
    scheduler = _section(doc, "scheduler", _SCHEDULER_KEYS)
    data = _section(doc, "data", _DATA_KEYS)
    metric = scheduler.get("metric", "val_auc")
    if metric not in METRICS:
        raise UserError(f"scheduler.metric must be one of {', '.join(METRICS)}, got '{metric}'.")
    mode = scheduler.get("mode", METRICS[metric])
    if mode not in ("min", "max"):
        raise UserError(f"scheduler.mode must be min or max, got '{mode}'.")
    out = SearchSpace(
        name=str(doc.get("name", default_name)),
        params=tuple(params),
        constants=constants,
        num_samples=_int_at(searcher, "num_samples", 8, "searcher", lo=1),
        max_concurrent=_int_at(searcher, "max_concurrent", 0, "searcher", lo=0),
        searcher=_choice_at(searcher, "algorithm", "optuna", ("optuna", "random"), "searcher"),
        seed=_int_at(searcher, "seed", 0, "searcher", lo=0),
        scheduler=_choice_at(scheduler, "algorithm", "asha", ("asha", "fifo"), "scheduler"),
        metric=metric,
        mode=mode,
        grace_period=_int_at(scheduler, "grace_period", 1, "scheduler", lo=1),
        reduction_factor=_int_at(scheduler, "reduction_factor", 2, "scheduler", lo=2),
        val_fraction=_frac_at(data, "val_fraction", 0.1),
        test_fraction=_frac_at(data, "test_fraction", 0.1),
    )
    if out.grace_period > out.max_epochs:
        raise UserError(f"scheduler.grace_period ({out.grace_period}) is larger than the most epochs a trial runs ({out.max_epochs}); lower it.")
    return out


def _parse_param(name: str, spec: dict) -> Param:
    _reject_unknown(spec, _PARAM_KEYS, f"space.{name}.")
    kind = spec.get("type")
    ftype = str(_FIELD_TYPES[name])
    if kind == "categorical" or (kind is None and "choices" in spec):
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"space.{name}.choices must be a non-empty list.")
        return Param(name, "categorical", choices=tuple(_coerce(name, c) for c in choices))
    if kind not in ("int", "float"):
        raise UserError(f"space.{name}.type must be int, float or categorical, got {kind!r}.")
    if name == "image_size":
        raise UserError("space.image_size must be a constant or categorical (each size is prepared once before the search).")
    if ftype not in ("int", "float") or (kind == "float" and ftype == "int"):
        raise UserError(f"space.{name} is a {ftype} setting and cannot have type {kind}.")
    for k in ("low", "high"):
        v = spec.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"space.{name}.{k} must be a number, got {v!r}.")
        if kind == "int" and not _is_int(v):
            raise UserError(f"space.{name}.{k} must be an integer for an int parameter, got {v!r}.")
    low, high = spec["low"], spec["high"]
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"space.{name}.log must be true or false, got {log!r}.")
    if not low < high:
        raise UserError(f"space.{name} has an empty range: low ({low}) must be below high ({high}).")
    if log and low <= 0:
        raise UserError(f"space.{name} is log-scaled, so low must be positive, got {low}.")
    return Param(name, kind, low=low, high=high, log=log)


def _extremes(p: Param) -> list[Any]:
    if p.kind == "categorical":
        return list(p.choices)
    return [p.low, p.high] if p.kind == "float" else [int(p.low), int(p.high)]


def _section(doc: dict, key: str, allowed: set[str]) -> dict:
    sec = doc.get(key, {}) or {}
    if not isinstance(sec, dict):
        raise UserError(f"'{key}' must be a mapping.")
    _reject_unknown(sec, allowed, f"{key}.")
    return sec


def _reject_unknown(d: dict, allowed: set[str], prefix: str) -> None:
    for k in d:
        if k not in allowed:
            raise UserError(f"unknown key '{prefix}{k}'; allowed here: {', '.join(sorted(allowed))}.")


def _int_at(d: dict, key: str, default: int, where: str, lo: int) -> int:
    v = d.get(key, default)
    if not _is_int(v) or v < lo:
        raise UserError(f"{where}.{key} must be an integer >= {lo}, got {v!r}.")
    return int(v)


def _choice_at(d: dict, key: str, default: str, allowed: tuple[str, ...], where: str) -> str:
    v = d.get(key, default)
    if v not in allowed:
        raise UserError(f"{where}.{key} must be one of {', '.join(allowed)}, got {v!r}.")
    return v


def _frac_at(d: dict, key: str, default: float) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 0.5:
        raise UserError(f"data.{key} must be a fraction between 0 and 0.5, got {v!r}.")
    return float(v)


def _param_to_dict(p: Param) -> dict[str, Any]:
    if p.kind == "categorical":
        return {"type": "categorical", "choices": [_jsonable(c) for c in p.choices]}
    return {"type": p.kind, "low": p.low, "high": p.high, "log": p.log}


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v
