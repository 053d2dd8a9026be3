"""The CNN family: one parameterised class and a small registry of named presets.

A model is `CNN(CNNConfig(...), num_classes)`: `blocks` conv blocks (conv3x3-BN-ReLU, optionally twice,
then a 2x2 max-pool and channel dropout), a "flatten" or "gap" head, `fc` hidden layers and one logit (two
classes) or one per class (K > 2).
CNNConfig (its defaults and the family's limits) lives in xray_ray.config, beside TrialConfig, whose
model fields are the same. The input contract (size, scaling, normalisation) travels with the model,
so the pipeline and every exported graph agree on what a pixel means.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from xray_ray.config import CNNConfig, max_blocks
from xray_ray.errors import UserError

__all__ = ["CNN", "CNNConfig", "PRESETS", "build_model", "config_from_dict", "count_params", "max_blocks"]

HEADS = ("flatten", "gap")
# Roughly the mean and spread of chest X-ray pixels scaled to [0, 1]; applied inside forward() so that
# ONNX and TorchScript exports take raw uint8/255 images and nobody re-implements normalisation.
NORM_MEAN = 0.5
NORM_STD = 0.25


def config_from_dict(d: Mapping[str, Any]) -> CNNConfig:
    """CNNConfig from a flat dict such as a Tune trial config; keys that are not fields are ignored."""
    names = CNNConfig.field_names()
    return CNNConfig(**{k: v for k, v in d.items() if k in names})


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    # No conv bias: BatchNorm's shift makes it redundant.
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CNN(nn.Module):
    """Classifier: float32 [N, C, S, S] in [0, 1] -> one logit per image [N] for two classes (of the second
    class), K logits per image [N, K] for K > 2 classes."""

    # TorchScript need not see the Python config; forward() never reads it.
    __jit_ignored_attributes__ = ["config"]

    def __init__(self, config: CNNConfig, num_classes: int = 2) -> None:
        super().__init__()
        if num_classes < 2:
            raise UserError(f"a classifier needs at least two classes, got {num_classes}.")
        self.config = config
        self.num_classes = num_classes
        # two classes keep one logit (sigmoid), so every binary model is what it was before K classes
        self.outputs = 1 if num_classes == 2 else num_classes
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
        head.append(nn.Linear(features, self.outputs))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: Tensor) -> Tensor:
        """x float32 [N, C, S, S] in [0, 1] -> logits [N] (two classes) or [N, K]."""
        if self.standardize:
            # each image to zero mean and unit spread: exposure and contrast of the site no longer matter
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = x.std(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) / (std + 1e-3)
        else:
            x = (x - self.norm_mean) / self.norm_std
        x = self.pool(self.features(x))
        logits = self.classifier(torch.flatten(x, 1))
        return logits.squeeze(-1) if self.outputs == 1 else logits

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
            "normalization": (
                "inside the model: per image, (x - mean(x)) / (std(x) + 0.001)"
                if self.standardize
                else f"inside the model: (x - {NORM_MEAN}) / {NORM_STD}"
            ),
        }


PRESETS: dict[str, CNNConfig] = {
    # The seed Keras notebook: 5 double-conv blocks 16..256, dropout 0.2, flatten, dense 512-128-64.
    # It was trained at 150 px; here the size is a parameter (build_model("seed", image_size=150)).
    "seed": CNNConfig(
        blocks=5, double_conv=True, width=16, growth=2.0, max_width=256, dropout=0.2, head="flatten", fc=(512, 128, 64)
    ),
    # A CPU-friendly model: few parameters thanks to global average pooling.
    "small": CNNConfig(
        blocks=4, double_conv=True, width=16, growth=2.0, max_width=128, dropout=0.1, head="gap", fc=(64,)
    ),
    # For tests: a few hundred parameters, milliseconds per batch.
    "tiny": CNNConfig(blocks=2, double_conv=False, width=4, growth=2.0, max_width=8, dropout=0.0, head="gap", fc=()),
}


def build_model(preset: str | None = None, num_classes: int = 2, **sizes: Any) -> CNN:
    """A CNN from a preset name or from explicit CNNConfig sizes, never both; image_size may join a preset.

    ``num_classes`` is the data's, not a size: two give one logit, K > 2 give K."""
    names = CNNConfig.field_names()
    unknown = sorted(set(sizes) - set(names))
    if unknown:
        raise UserError(f"unknown model size {unknown[0]!r}; the sizes are {', '.join(sorted(names))}.")
    if preset is None:
        return CNN(CNNConfig(**sizes), num_classes)
    if preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    extra = sorted(set(sizes) - {"image_size"})
    if extra:
        raise UserError(f"give a preset or explicit sizes, not both: preset {preset!r} was combined with {extra[0]!r}.")
    return CNN(PRESETS[preset].replace(**sizes), num_classes)


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
