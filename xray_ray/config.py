"""Typed trial config.

A trial is described by one flat, frozen :class:`TrialConfig`; its model fields are :class:`CNNConfig`'s,
and every default is defined here once. Both are pydantic models: unknown keys, wrong types, values out of
bounds and sizes the CNN family cannot build are refused with one sentence that names the key
(:class:`~xray_ray.errors.UserError`). Search-space files are parsed in :mod:`xray_ray.search.spaces`.
This module imports no torch: the search driver validates configs without it.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any, ClassVar, Literal

import annotated_types as at
import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

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


def _sentence(err: Mapping[str, Any], name: str | None, model: type[_Config]) -> str:
    """One pydantic error as the one sentence a user reads: what is wrong with which key, and what is allowed."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"unknown {model.what} '{name}'; known settings are: {', '.join(sorted(model.field_names()))}."
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


def _refusal(e: ValidationError, model: type[_Config], name: str | None = None) -> UserError:
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


@cache
def _adapter(model: type[_Config], name: str) -> TypeAdapter:
    info = model.model_fields[name]
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)])


@cache
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
            raise ValueError(
                f"blocks={self.blocks} does not fit image_size={self.image_size}: each block halves "
                f"the image, so use 1 to {limit} blocks or a larger image_size."
            )
        return self


class CNNConfig(_Sizes):
    """Sizes of one CNN of the family; validated and normalised on creation, so every instance builds a model."""

    what: ClassVar[str] = "model size"
    in_channels: Int = Field(1, ge=1)

    def channels(self) -> list[int]:
        """Output channels of each block: min(max_width, round(width * growth**i)), at least 1."""
        return [max(1, round(min(self.max_width, self.width * self.growth**i))) for i in range(self.blocks)]


# what keep_metric may name: a metric every epoch reports (the search's METRICS), or empty for the search's own
KeepMetric = Literal[
    "",
    "val_auc",
    "val_loss",
    "val_acc",
    "val_score",
    "val_brier",
    "val_balanced_acc",
    "val_macro_f1",
    "rob_auc_min",
    "rob_auc_mean",
    "rob_loss_mean",
]


class TrialConfig(_Sizes):
    """Everything one trial needs: model sizes (CNNConfig's fields), training and augmentation settings."""

    what: ClassVar[str] = "trial setting"
    # training
    epochs: Int = Field(10, ge=1, le=MAX_EPOCHS)
    batch_size: Int = Field(32, ge=1, le=MAX_BATCH_SIZE)
    optimizer: Annotated[Literal["adam", "adamw", "sgd"], BeforeValidator(_as_str)] = "adam"
    lr: Float = Field(1e-3, gt=0)
    weight_decay: Float = Field(0.0, ge=0)
    # "onecycle": up from lr/25 over the first 30% of steps, then down to lr/250,000 (cosine both ways;
    # PyTorch's OneCycleLR defaults); it has its own warm-up, so warmup_epochs must be 0 with it
    schedule: Annotated[Literal["cosine", "constant", "onecycle"], BeforeValidator(_as_str)] = "cosine"
    warmup_epochs: Int = Field(0, ge=0)  # below epochs
    class_weighting: Annotated[Literal["none", "balanced"], BeforeValidator(_as_str)] = "none"
    label_smoothing: Float = Field(0.0, ge=0, lt=0.5)
    ema: Annotated[Float, AfterValidator(_ema_rule)] = 0.0
    swa: Float = Field(0.0, ge=0, lt=1)  # share of the last epochs whose weights are averaged; 0: off
    # which epoch's weights a trial keeps: the best by the search's metric, or the last one's (with swa:
    # the average of the last epochs)
    keep: Annotated[Literal["best", "last"], BeforeValidator(_as_str)] = "best"
    # the metric whose best epoch `keep: best` keeps; empty: the search's own metric. A robustness composite
    # here has the battery scored every epoch. Selection changes no training step, so it never enters the seed
    keep_metric: Annotated[KeepMetric, BeforeValidator(_as_str)] = ""
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
        if self.schedule == "onecycle" and self.warmup_epochs:
            raise ValueError("schedule onecycle has its own warm-up; set warmup_epochs to 0 with it.")
        if self.swa and self.ema:
            raise ValueError("swa and ema both average weights; switch one of them off.")
        if self.keep_metric and self.keep == "last":
            raise ValueError("keep_metric chooses the best epoch; with keep: last there is none to choose, drop one.")
        return self


# the fields that take part in a rule between fields: a space's check tries their corners together
LINKED_FIELDS = ("image_size", "blocks", "epochs", "warmup_epochs", "swa", "ema", "schedule", "keep", "keep_metric")


def model_sizes(cfg: TrialConfig) -> dict[str, Any]:
    """The CNNConfig sizes of a trial (build_model(**model_sizes(cfg)))."""
    names = CNNConfig.field_names()
    return {k: v for k, v in cfg.to_dict().items() if k in names and k != "in_channels"}


def encode_value(v: Any) -> Any:
    """Optuna's categoricals hold scalars only: lists (fc layer sizes) travel as JSON strings."""
    return json.dumps(list(v)) if isinstance(v, (list, tuple)) else v


def decode_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The trial settings of Tune's config (TrialConfig reads fc back from its JSON string itself)."""
    fields = set(TrialConfig.field_names())
    return {k: v for k, v in config.items() if k in fields}
