"""The CNN family: one parameterised class, a typed config and a small registry of named presets.

A model is `CNN(CNNConfig(...))`: `blocks` conv blocks (conv3x3-BN-ReLU, optionally twice, then a
2x2 max-pool and channel dropout), a "flatten" or "gap" head, `fc` hidden layers and one logit.
The input contract (size, scaling, normalisation) travels with the model, so the pipeline and every
exported graph agree on what a pixel means.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from xray_ray.errors import UserError

HEADS = ("flatten", "gap")
# Roughly the mean and spread of chest X-ray pixels scaled to [0, 1]; applied inside forward() so that
# ONNX and TorchScript exports take raw uint8/255 images and nobody re-implements normalisation.
NORM_MEAN = 0.5
NORM_STD = 0.25


def max_blocks(image_size: int) -> int:
    """Most conv blocks an image of this size allows: each block halves it and >= 1 px must remain."""
    return max(0, int(image_size).bit_length() - 1)


def _whole(name: str, value: Any, minimum: int) -> int:
    # Tune and Optuna hand over numpy ints or floats such as 16.0; accept those, reject 16.5 and True.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise UserError(f"{name} must be a whole number, got {value!r}.")
    if isinstance(value, numbers.Integral):
        number = int(value)
    elif float(value).is_integer():
        number = int(value)
    else:
        raise UserError(f"{name} must be a whole number, got {value!r}.")
    if number < minimum:
        raise UserError(f"{name} must be at least {minimum}, got {number}.")
    return number


def _fc_sizes(value: Any) -> tuple[int, ...]:
    # Optuna's categorical choices must be scalars, so search spaces may spell fc as "512,128,64" or
    # as JSON "[512, 128, 64]".
    if isinstance(value, str):
        parts = [part for part in re.split(r"[,x\-\s]+", value.strip().strip("[]()").lower()) if part]
        if parts in ([], ["none"]):
            return ()
        try:
            value = [int(part) for part in parts]
        except ValueError:
            raise UserError(f"fc must list layer sizes such as '128,64', got {value!r}.") from None
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise UserError(f"fc must be a list of layer sizes such as [128, 64], got {value!r}.")
    return tuple(_whole("fc", size, 1) for size in value)


@dataclass(frozen=True)
class CNNConfig:
    """Sizes of one CNN; validated and normalised on creation, so every instance builds a model."""

    image_size: int = 64
    blocks: int = 5
    double_conv: bool = True
    width: int = 16  # channels of the first block
    growth: float = 2.0  # channel multiplier per block (rounded, capped at max_width)
    max_width: int = 256
    dropout: float = 0.2
    head: str = "flatten"  # "flatten" (as the seed notebook) | "gap" (global average pooling)
    fc: tuple[int, ...] = (128,)
    in_channels: int = 1
    standardize: bool = False  # per-image (x - mean) / std inside forward(), instead of the fixed NORM_*

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("image_size", "blocks", "width", "max_width", "in_channels"):
            put(name, _whole(name, getattr(self, name), 2 if name == "image_size" else 1))
        for name in ("growth", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise UserError(f"{name} must be a number, got {value!r}.")
            put(name, float(value))
        if self.growth <= 0:
            raise UserError(f"growth must be greater than 0, got {self.growth}.")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.double_conv not in (True, False):  # also admits numpy bools and 0/1
            raise UserError(f"double_conv must be true or false, got {self.double_conv!r}.")
        put("double_conv", bool(self.double_conv))
        if self.standardize not in (True, False):
            raise UserError(f"standardize must be true or false, got {self.standardize!r}.")
        put("standardize", bool(self.standardize))
        if self.head not in HEADS:
            raise UserError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}.")
        put("fc", _fc_sizes(self.fc))
        limit = max_blocks(self.image_size)
        if self.blocks > limit:
            raise UserError(
                f"blocks={self.blocks} does not fit image_size={self.image_size}: each block halves the "
                f"image, so use 1 to {limit} blocks or a larger image_size."
            )

    def channels(self) -> list[int]:
        """Output channels of each block: min(max_width, round(width * growth**i)), at least 1."""
        return [max(1, round(min(self.max_width, self.width * self.growth**i))) for i in range(self.blocks)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields (fc as a list)."""
        d = asdict(self)
        d["fc"] = list(self.fc)
        return d


def config_from_dict(d: Mapping[str, Any]) -> CNNConfig:
    """CNNConfig from a flat dict such as a Tune trial config; keys that are not fields are ignored."""
    names = {f.name for f in fields(CNNConfig)}
    return CNNConfig(**{k: v for k, v in d.items() if k in names})


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    # No conv bias: BatchNorm's shift makes it redundant.
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CNN(nn.Module):
    """Binary classifier: float32 [N, C, S, S] in [0, 1] -> one logit per image, shape [N]."""

    # TorchScript need not see the Python config; forward() never reads it.
    __jit_ignored_attributes__ = ["config"]

    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        # Attributes, not globals: TorchScript cannot read closed-over floats.
        self.norm_mean = NORM_MEAN
        self.norm_std = NORM_STD
        self.standardize = config.standardize
        blocks: list[nn.Module] = []
        cin = config.in_channels
        for cout in config.channels():
            layers = _conv_bn_relu(cin, cout)
            if config.double_conv:
                layers += _conv_bn_relu(cout, cout)
            # Dropout2d drops whole feature maps: neighbouring activations are strongly correlated, so
            # element-wise dropout after a conv barely regularises (Tompson et al. 2015, SpatialDropout).
            layers += [nn.MaxPool2d(2), nn.Dropout2d(config.dropout)]
            blocks.append(nn.Sequential(*layers))
            cin = cout
        self.features = nn.Sequential(*blocks)
        if config.head == "gap":
            self.pool: nn.Module = nn.AdaptiveAvgPool2d(1)
            features = cin
        else:
            self.pool = nn.Identity()
            features = cin * (config.image_size >> config.blocks) ** 2
        head: list[nn.Module] = []
        for size in config.fc:
            head += [nn.Linear(features, size), nn.ReLU(inplace=True), nn.Dropout(config.dropout)]
            features = size
        head.append(nn.Linear(features, 1))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        """x float32 [N, C, S, S] in [0, 1] -> logits [N]."""
        if self.standardize:
            # each image to zero mean and unit spread: exposure and contrast of the site no longer matter
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = x.std(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) / (std + 1e-3)
        else:
            x = (x - self.norm_mean) / self.norm_std
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1)).squeeze(-1)

    def input_contract(self) -> dict[str, Any]:
        """What a caller must feed the model, in words and numbers (saved beside every export)."""
        s = self.config.image_size
        return {
            "size": s,
            "channels": self.config.in_channels,
            "scaling": "uint8/255",
            "resize": f"whole image to {s}x{s}, bilinear, no crop",
            "color": "grayscale 8-bit",
            "layout": "NCHW float32 in [0, 1]",
            "normalization": ("inside the model: per image, (x - mean(x)) / (std(x) + 0.001)"
                              if self.standardize else f"inside the model: (x - {NORM_MEAN}) / {NORM_STD}"),
        }


PRESETS: dict[str, CNNConfig] = {
    # The seed Keras notebook: 5 double-conv blocks 16..256, dropout 0.2, flatten, dense 512-128-64.
    # It was trained at 150 px; here the size is a parameter (build_model("seed", image_size=150)).
    "seed": CNNConfig(blocks=5, double_conv=True, width=16, growth=2.0, max_width=256, dropout=0.2,
                      head="flatten", fc=(512, 128, 64)),
    # A CPU-friendly model: few parameters thanks to global average pooling.
    "small": CNNConfig(blocks=4, double_conv=True, width=16, growth=2.0, max_width=128, dropout=0.1,
                       head="gap", fc=(64,)),
    # For tests: a few hundred parameters, milliseconds per batch.
    "tiny": CNNConfig(blocks=2, double_conv=False, width=4, growth=2.0, max_width=8, dropout=0.0,
                      head="gap", fc=()),
}


def build_model(preset: str | None = None, **sizes: Any) -> CNN:
    """A CNN from a preset name or from explicit CNNConfig sizes, never both; image_size may join a preset."""
    names = {f.name for f in fields(CNNConfig)}
    unknown = sorted(set(sizes) - names)
    if unknown:
        raise UserError(f"unknown model size {unknown[0]!r}; the sizes are {', '.join(sorted(names))}.")
    if preset is None:
        return CNN(CNNConfig(**sizes))
    if preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    extra = sorted(set(sizes) - {"image_size"})
    if extra:
        raise UserError(
            f"give a preset or explicit sizes, not both: preset {preset!r} was combined with {extra[0]!r}."
        )
    return CNN(CNNConfig(**{**asdict(PRESETS[preset]), **sizes}))


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
