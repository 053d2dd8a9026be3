"""Typed trial config and search-space files.

A trial is described by one flat, frozen :class:`TrialConfig`; its model fields are :class:`CNNConfig`'s,
and every default is defined here once. Both are pydantic models: unknown keys, wrong types, values out of
bounds and sizes the CNN family cannot build are refused with one sentence that names the key
(:class:`~xray_ray.errors.UserError`). A search-space YAML file says which fields are searched and how, plus
the searcher and scheduler settings; its check proves every corner of the space buildable before Ray starts.
This module imports no torch: the search driver validates configs without it.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Mapping

import annotated_types as at
import numpy as np
import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic import model_validator

from xray_ray.errors import UserError

MAX_EPOCHS = 100
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024
MAX_BATCH_SIZE = 4096


def max_blocks(image_size: int) -> int:
    """Most conv blocks an image of this size allows: each block halves it and >= 1 px must remain."""
    return max(0, int(image_size).bit_length() - 1)


# --------------------------------------------------------------------------- values as Tune, Optuna and YAML give them

class _WrongType(ValueError):
    """A value of the wrong kind (its sentence names the key in quotes, as the type errors always did)."""


def _show(v: Any) -> str:
    return repr(v.item() if isinstance(v, np.generic) else v)


def _as_int(v: Any) -> int:
    # Tune and Optuna hand over numpy ints, or floats such as 16.0; accept those, refuse 16.5, True and "16".
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise _WrongType(f"must be an integer, got {_show(v)}")
    if isinstance(v, numbers.Integral):
        return int(v)
    if math.isfinite(float(v)) and float(v).is_integer():
        return int(v)
    raise _WrongType(f"must be an integer, got {_show(v)}")


def _as_float(v: Any) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise _WrongType(f"must be a number, got {_show(v)}")
    return float(v)


def _as_bool(v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise _WrongType(f"must be true or false, got {_show(v)}")
    return bool(v)


def _as_str(v: Any) -> str:
    if not isinstance(v, str):
        raise _WrongType(f"must be a string, got {_show(v)}")
    return str(v)  # a numpy str_ becomes a plain str


def _as_sizes(v: Any) -> tuple[int, ...]:
    # Optuna's categorical choices must be scalars, so fc arrives as JSON "[512, 128, 64]" or as "512,128,64".
    if isinstance(v, str):
        parts = [part for part in re.split(r"[,x\-\s]+", v.strip().strip("[]()").lower()) if part]
        if parts in ([], ["none"]):
            return ()
        try:
            v = [int(part) for part in parts]
        except ValueError:
            raise _WrongType(f"must list layer sizes such as [128, 64] or '128,64', got {v!r}") from None
    elif isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise _WrongType(f"must be a list of layer sizes such as [128, 64], got {_show(v)}")
    try:
        sizes = tuple(_as_int(size) for size in v)
    except _WrongType:
        raise _WrongType(f"must be a list of integers, got {_show(v)}") from None
    if any(size < 1 for size in sizes):
        raise ValueError(f"layer sizes must each be at least 1, got {list(sizes)}")
    return sizes


def _ema_rule(v: float) -> float:
    if not (v == 0 or 0.5 <= v < 1):
        raise ValueError(f"must be 0 (off) or a decay in [0.5, 1), got {v}")
    return v


Int = Annotated[int, BeforeValidator(_as_int)]
Float = Annotated[float, BeforeValidator(_as_float)]
Bool = Annotated[bool, BeforeValidator(_as_bool)]
Sizes = Annotated[tuple[int, ...], BeforeValidator(_as_sizes)]

# what a bound means, where the name alone does not say it
_UNITS = {"rotate": "degrees", "blur": "sigma in pixels", "mixup": "alpha"}
_NOTES = {"swa": "the share of final epochs averaged"}


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_text(info) -> str:
    lo = hi = None
    lo_open = hi_open = False
    for m in info.metadata:
        if isinstance(m, at.Ge):
            lo = m.ge
        elif isinstance(m, at.Gt):
            lo, lo_open = m.gt, True
        elif isinstance(m, at.Le):
            hi = m.le
        elif isinstance(m, at.Lt):
            hi, hi_open = m.lt, True
    if lo is not None and hi is not None:
        if not lo_open and not hi_open:
            return f"between {_num(lo)} and {_num(hi)}"
        return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return ("positive" if lo == 0 else f"greater than {_num(lo)}") if lo_open else f"at least {_num(lo)}"
    return f"below {_num(hi)}" if hi_open else f"at most {_num(hi)}"


def _sentence(err: Mapping[str, Any], name: str | None, model: type["_Config"]) -> str:
    """One pydantic error as the one sentence a user reads: what is wrong with which key, and what is allowed."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        return (f"unknown {model.what} '{name}'; known settings are: {', '.join(sorted(model.field_names()))}.")
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        exc = ctx["error"]
        text = str(exc)
        if name is None:
            out = text
        elif isinstance(exc, _WrongType):
            out = f"'{name}' {text}"
        else:
            out = f"{name} {text}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        unit = f" ({_UNITS[name]})" if name in _UNITS else ""
        note = f" ({_NOTES[name]})" if name in _NOTES else ""
        out = f"{name}{unit} must be {_range_text(model.model_fields[name])}{note}, got {_show(err['input'])}"
    elif kind == "literal_error":
        out = f"{name} must be {ctx.get('expected')}, got {_show(err['input'])}"
    else:  # pragma: no cover - every field has a before-validator that turns odd input into one of the above
        out = f"'{name}' is not valid: {err['msg']}, got {_show(err.get('input'))}"
    out = " ".join(out.split())
    return out if out.endswith(".") else out + "."


def _refusal(e: ValidationError, model: type["_Config"], name: str | None = None) -> UserError:
    err = e.errors(include_url=False)[0]
    loc = err.get("loc") or ()
    return UserError(_sentence(err, name if name is not None else (str(loc[0]) if loc else None), model))


class _Config(BaseModel):
    """A frozen, strict pydantic model whose errors are one-sentence UserErrors."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=False)
    what: ClassVar[str] = "setting"

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise _refusal(e, type(self)) from None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        """Build from a flat dict (e.g. Tune's config), checking names, types, ranges and the family's limits."""
        if not isinstance(d, Mapping):
            raise UserError(f"a {cls.__name__} is built from a mapping of settings, got {_show(d)}.")
        return cls(**{str(k): v for k, v in d.items()})

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(cls.model_fields)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default, as to_dict() gives it."""
        return _defaults(cls)

    @classmethod
    def check_value(cls, name: str, value: Any) -> Any:
        """One field's value checked and normalised on its own (type and bounds; rules between fields not)."""
        try:
            return _adapter(cls, name).validate_python(value)
        except ValidationError as e:
            raise _refusal(e, cls, name) from None

    def replace(self, **changes: Any):
        """A validated copy with some fields changed."""
        return type(self).from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields (fc as a list)."""
        d = self.model_dump()
        d["fc"] = list(self.fc)
        return d


@lru_cache(maxsize=None)
def _adapter(model: type[_Config], name: str) -> TypeAdapter:
    info = model.model_fields[name]
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)])


@lru_cache(maxsize=None)
def _defaults_json(model: type[_Config]) -> str:
    return json.dumps(model().to_dict())


def _defaults(model: type[_Config]) -> dict[str, Any]:
    return json.loads(_defaults_json(model))


class _Sizes(_Config):
    """The model fields a trial searches (in_channels is CNNConfig's only: X-rays are grayscale)."""

    image_size: Int = Field(64, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE)
    blocks: Int = Field(4, ge=1)  # at most max_blocks(image_size): each block halves the image
    double_conv: Bool = True
    width: Int = Field(16, ge=1)  # channels of the first block
    growth: Float = Field(2.0, gt=0)  # channel multiplier per block (rounded, capped at max_width)
    max_width: Int = Field(256, ge=1)
    dropout: Float = Field(0.2, ge=0, lt=1)
    head: Annotated[Literal["flatten", "gap"], BeforeValidator(_as_str)] = "gap"  # gap: global average pooling
    fc: Sizes = (64,)  # hidden layer sizes of the head
    standardize: Bool = False  # per-image standardisation inside the model instead of a fixed (x-0.5)/0.25

    @model_validator(mode="after")
    def _blocks_fit_the_image(self):
        limit = max_blocks(self.image_size)
        if self.blocks > limit:
            raise ValueError(f"blocks={self.blocks} does not fit image_size={self.image_size}: each block halves "
                             f"the image, so use 1 to {limit} blocks or a larger image_size.")
        return self


class CNNConfig(_Sizes):
    """Sizes of one CNN of the family; validated and normalised on creation, so every instance builds a model."""

    what: ClassVar[str] = "model size"
    in_channels: Int = Field(1, ge=1)

    def channels(self) -> list[int]:
        """Output channels of each block: min(max_width, round(width * growth**i)), at least 1."""
        return [max(1, round(min(self.max_width, self.width * self.growth**i))) for i in range(self.blocks)]


class TrialConfig(_Sizes):
    """Everything one trial needs: model sizes (CNNConfig's fields), training and augmentation settings."""

    what: ClassVar[str] = "trial setting"
    # training
    epochs: Int = Field(10, ge=1, le=MAX_EPOCHS)
    batch_size: Int = Field(32, ge=1, le=MAX_BATCH_SIZE)
    optimizer: Annotated[Literal["adam", "adamw", "sgd"], BeforeValidator(_as_str)] = "adam"
    lr: Float = Field(1e-3, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    schedule: Annotated[Literal["cosine", "constant"], BeforeValidator(_as_str)] = "cosine"
    warmup_epochs: Int = Field(0, ge=0)  # below epochs
    class_weighting: Annotated[Literal["none", "balanced"], BeforeValidator(_as_str)] = "none"
    label_smoothing: Float = Field(0.0, ge=0, lt=0.5)
    ema: Annotated[Float, AfterValidator(_ema_rule)] = 0.0
    swa: Float = Field(0.0, ge=0, lt=1)  # share of the last epochs whose weights are averaged; 0: off
    # "balanced": each epoch draws both classes equally often (rows repeated or left out)
    sampler: Annotated[Literal["none", "balanced"], BeforeValidator(_as_str)] = "none"
    mixup: Float = Field(0.0, ge=0, le=1)  # Beta(alpha, alpha) of mixup between images of a batch; 0: off
    # augmentation strengths (0 switches each off)
    zoom: Float = Field(0.3, ge=0, le=1)
    rotate: Float = Field(0.0, ge=0, le=45)
    shift: Float = Field(0.0, ge=0, le=1)
    hflip: Float = Field(0.0, ge=0, le=1)
    vflip: Float = Field(0.5, ge=0, le=1)
    brightness: Float = Field(0.0, ge=0, le=1)
    contrast: Float = Field(0.0, ge=0, le=1)
    gamma: Float = Field(0.0, ge=0, le=1)
    blur: Float = Field(0.0, ge=0, le=3)
    crop: Float = Field(0.0, ge=0, le=0.9)  # random-resized crop: up to this share of the area cut away; 0: off
    erase: Float = Field(0.0, ge=0, le=1)  # chance of erasing one random rectangle (2-25% of the area); 0: off
    # reproducibility
    seed: Int = Field(0, ge=0)

    @model_validator(mode="after")
    def _rules_between_fields(self):
        if self.warmup_epochs and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs must be below epochs, got {self.warmup_epochs} with epochs={self.epochs}.")
        if self.swa and self.ema:
            raise ValueError("swa and ema both average weights; switch one of them off.")
        return self


# the fields that take part in a rule between fields: a space's check tries their corners together
LINKED_FIELDS = ("image_size", "blocks", "epochs", "warmup_epochs", "swa", "ema")


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
        return int(self.constants.get("epochs", TrialConfig.defaults()["epochs"]))

    @property
    def image_sizes(self) -> list[int]:
        for p in self.params:
            if p.name == "image_size":
                return sorted({int(c) for c in p.choices})
        return [int(self.constants.get("image_size", TrialConfig.defaults()["image_size"]))]

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
    names = TrialConfig.field_names()
    for name, spec in space.items():
        if name not in names:
            raise UserError(f"unknown key 'space.{name}'; known settings are: {', '.join(sorted(names))}.")
        if isinstance(spec, dict):
            params.append(_parse_param(name, spec))
        else:
            constants[name] = _checked(name, spec, f"space.{name}")
    check_corners(constants, params)
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
        # a space of constants trains that one configuration: once, unless more replicas are asked for
        num_samples=_int_at(searcher, "num_samples", 8 if params else 1, "searcher", lo=1),
        max_concurrent=_int_at(searcher, "max_concurrent", 0, "searcher", lo=0),
        searcher=_choice_at(searcher, "algorithm", "optuna", ("optuna", "random"), "searcher"),
        seed=_int_at(searcher, "seed", 0, "searcher", lo=0),
        # ...and its replicas all train to the end: nothing differs between them for ASHA to compare
        scheduler=_choice_at(scheduler, "algorithm", "asha" if params else "fifo", ("asha", "fifo"), "scheduler"),
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
    ftype = _kind_of(name)
    if kind == "categorical" or (kind is None and "choices" in spec):
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"space.{name}.choices must be a non-empty list.")
        return Param(name, "categorical", choices=tuple(_checked(name, c, f"space.{name}") for c in choices))
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
    for v in (low, high):
        _checked(name, v, f"space.{name}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"space.{name}.log must be true or false, got {log!r}.")
    if not low < high:
        raise UserError(f"space.{name} has an empty range: low ({low}) must be below high ({high}).")
    if log and low <= 0:
        raise UserError(f"space.{name} is log-scaled, so low must be positive, got {low}.")
    return Param(name, kind, low=low, high=high, log=log)


def _kind_of(name: str) -> str:
    """The kind of a TrialConfig field as a space file would call it: int, float, bool, str or list."""
    t = TrialConfig.model_fields[name].annotation
    return {int: "int", float: "float", bool: "bool"}.get(t, "list" if t == tuple[int, ...] else "str")


def _checked(name: str, value: Any, where: str) -> Any:
    try:
        return TrialConfig.check_value(name, value)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _extremes(p: Param) -> list[Any]:
    """The values of a parameter that a rule between fields can fail at first: its smallest and largest."""
    if p.kind == "categorical":
        return sorted(set(p.choices))[:: max(1, len(set(p.choices)) - 1)]
    return [p.low, p.high] if p.kind == "float" else [int(p.low), int(p.high)]


def check_corners(constants: Mapping[str, Any], params: tuple[Param, ...] | list[Param]) -> None:
    """Refuse a space that reaches a trial the family cannot build, before any data is read.

    Every value is checked on its own where it is parsed. What is left are the rules between fields
    (blocks against image_size, warmup_epochs against epochs, swa with ema): each is monotone in its
    fields, so trying every combination of the smallest and largest value of the searched fields it
    involves, with the constants, finds any trial of the space that breaks it.
    """
    linked = [p for p in params if p.name in LINKED_FIELDS]
    for values in itertools.product(*(_extremes(p) for p in linked)):
        corner = {p.name: v for p, v in zip(linked, values)}
        try:
            TrialConfig.from_dict({**constants, **corner})
        except UserError as e:
            if not corner:
                raise
            where = (f"space.{next(iter(corner))}" if len(corner) == 1 else
                     "space (at " + ", ".join(f"{k}={_jsonable(v)}" for k, v in corner.items()) + ")")
            raise UserError(f"{where}: {e}") from None


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
