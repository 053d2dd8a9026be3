"""The CNN family: every preset and block count runs, trains, scripts; bad sizes are refused."""

import io

import numpy as np
import pytest
import torch

from xray_ray.errors import UserError
from xray_ray.model.cnn import CNN, PRESETS, CNNConfig, build_model, config_from_dict, count_params, max_blocks

# TorchScript is deprecated upstream (FutureWarning) but is one of our export formats.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

SIZES = (32, 64, 128)


def _forward_backward(model: CNN, n: int = 2) -> torch.Tensor:
    s = model.config.image_size
    model.train()
    x = torch.rand(n, 1, s, s)
    out = model(x)
    assert out.shape == (n,)
    assert torch.isfinite(out).all()
    torch.nn.functional.binary_cross_entropy_with_logits(out, torch.tensor([0.0, 1.0] * (n // 2))).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    return out


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_and_trains_at_every_size(preset, size):
    torch.manual_seed(0)
    model = build_model(preset, image_size=size)
    assert model.config == CNNConfig(**{**PRESETS[preset].to_dict(), "image_size": size})
    _forward_backward(model)
    model.eval()
    assert model(torch.rand(1, 1, size, size)).shape == (1,)


def test_param_counts_are_what_the_architecture_says():
    # tiny: conv 1->4 (36) + BN (8) + conv 4->8 (288) + BN (16) + linear 8->1 (9), independent of size.
    assert count_params(build_model("tiny", image_size=32)) == 357
    assert count_params(build_model("tiny", image_size=128)) == 357
    small = count_params(build_model("small"))
    assert 50_000 < small < 1_000_000
    assert count_params(build_model("small", image_size=128)) == small  # gap head: size-free
    # seed's flatten head grows with the image: 256 x 2 x 2 at 64 px, 256 x 4 x 4 at 150 px.
    seed64, seed150 = count_params(build_model("seed")), count_params(build_model("seed", image_size=150))
    assert seed150 - seed64 == 256 * (16 - 4) * 512
    frozen = build_model("tiny")
    frozen.classifier.requires_grad_(False)
    assert count_params(frozen) == 357 - 9


@pytest.mark.parametrize("size", SIZES)
def test_every_block_count_up_to_the_maximum(size):
    assert max_blocks(size) == {32: 5, 64: 6, 128: 7}[size]
    for blocks in range(1, max_blocks(size) + 1):
        torch.manual_seed(blocks)
        head = "flatten" if blocks % 2 else "gap"
        model = build_model(
            image_size=size,
            blocks=blocks,
            width=2,
            growth=1.5,
            max_width=8,
            double_conv=blocks % 3 == 0,
            head=head,
            fc=(8,),
            dropout=0.3,
        )
        assert len(model.features) == blocks
        _forward_backward(model)
    with pytest.raises(UserError, match="blocks"):
        build_model(image_size=size, blocks=max_blocks(size) + 1)


@pytest.mark.parametrize("size", (32, 64, 100, 150))
def test_flatten_in_features_follow_the_image_size(size):
    model = build_model(image_size=size, blocks=3, width=4, growth=1.0, head="flatten", fc=())
    assert model.classifier[0].in_features == 4 * (size // 8) ** 2
    gap = build_model(image_size=size, blocks=3, width=4, growth=1.0, head="gap", fc=())
    assert gap.classifier[0].in_features == 4
    if size == 150:  # the seed notebook's Flatten: 150 -> 75 -> 37 -> 18 -> 9 -> 4, times 256 channels
        assert build_model("seed", image_size=150).classifier[0].in_features == 4 * 4 * 256


def test_channels_grow_round_and_cap():
    assert CNNConfig(width=16, growth=2.0, max_width=100, blocks=5).channels() == [16, 32, 64, 100, 100]
    assert CNNConfig(width=3, growth=1.5, blocks=4).channels() == [3, round(4.5), round(6.75), round(10.125)]
    assert CNNConfig(width=8, growth=0.5, blocks=5).channels() == [8, 4, 2, 1, 1]
    model = build_model("seed")
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [16, 16, 32, 32, 64, 64, 128, 128, 256, 256]


@pytest.mark.parametrize(
    "sizes, field",
    [
        ({"image_size": 64, "blocks": 7}, "blocks"),
        ({"image_size": 1, "blocks": 1}, "image_size"),
        ({"blocks": 0}, "blocks"),
        ({"blocks": 2.5}, "blocks"),
        ({"width": 0}, "width"),
        ({"max_width": 0}, "max_width"),
        ({"growth": 0.0}, "growth"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"dropout": "lots"}, "dropout"),
        ({"head": "avg"}, "head"),
        ({"fc": (64, 0)}, "fc"),
        ({"fc": "64,big"}, "fc"),
        ({"double_conv": "yes"}, "double_conv"),
        ({"in_channels": True}, "in_channels"),
    ],
)
def test_invalid_sizes_are_refused_naming_the_field(sizes, field):
    with pytest.raises(UserError) as caught:
        build_model(**sizes)
    message = str(caught.value)
    assert field in message and "\n" not in message and message.endswith(".")


def test_preset_or_sizes_never_both():
    tiny = build_model("tiny", image_size=32)
    assert tiny.config.image_size == 32 and tiny.config.width == PRESETS["tiny"].width
    with pytest.raises(UserError, match="not both"):
        build_model("tiny", width=8)
    with pytest.raises(UserError, match="unknown model preset"):
        build_model("huge")
    with pytest.raises(UserError, match="unknown model size"):
        build_model(widht=8)
    assert build_model().config == CNNConfig()


def test_config_from_dict_takes_a_tune_trial_config():
    trial = {
        "lr": 1e-3,
        "batch_size": 32,
        "blocks": np.int64(3),
        "width": 8.0,
        "fc": [32, 16],
        "head": "gap",
        "double_conv": np.bool_(False),
        "image_size": 64,
        "dropout": np.float32(0.25),
    }
    config = config_from_dict(trial)
    assert config == CNNConfig(blocks=3, width=8, fc=(32, 16), head="gap", double_conv=False, dropout=0.25)
    assert type(config.blocks) is int and type(config.width) is int and type(config.double_conv) is bool
    hash(config)  # frozen and hashable: fc became a tuple
    assert config_from_dict({"fc": "32,16"}).fc == (32, 16)
    assert config_from_dict({"fc": "[32, 16]"}).fc == (32, 16)  # JSON, as Optuna categoricals carry it
    assert config_from_dict({"fc": "[]"}).fc == ()
    assert config_from_dict({"fc": ""}).fc == ()
    assert config_from_dict({"fc": 64}).fc == (64,)
    assert config_from_dict(config.to_dict()) == config


def test_model_carries_its_input_contract_and_normalisation():
    model = build_model("tiny", image_size=48).eval()
    contract = model.input_contract()
    assert contract["size"] == 48 and contract["channels"] == 1
    assert contract["scaling"] == "uint8/255" and contract["color"] == "grayscale 8-bit"
    assert contract["resize"] == "whole image to 48x48, bilinear, no crop"
    # Normalisation is inside forward: feeding the raw [0, 1] image equals running the layers by hand
    # on (x - 0.5) / 0.25.
    x = torch.rand(3, 1, 48, 48)
    with torch.no_grad():
        by_hand = model.classifier(torch.flatten(model.pool(model.features((x - 0.5) / 0.25)), 1)).squeeze(-1)
        assert torch.allclose(model(x), by_hand)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_torchscript_script_and_trace_round_trip(preset):
    torch.manual_seed(0)
    model = build_model(preset, image_size=32).eval()
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        expected = model(x)
        for compiled in (torch.jit.script(model), torch.jit.trace(model, x[:2])):
            buffer = io.BytesIO()
            torch.jit.save(compiled, buffer)
            buffer.seek(0)
            loaded = torch.jit.load(buffer)
            assert torch.allclose(loaded(x), expected, atol=1e-6)  # batch differs from the traced one
            assert loaded(x[:1]).shape == (1,)


def test_the_default_model_is_the_default_trials_model():
    """One set of defaults: build_model() with no sizes is the model a TrialConfig() trains."""
    from xray_ray import config
    from xray_ray.config import TrialConfig, model_sizes

    assert CNNConfig is config.CNNConfig and max_blocks is config.max_blocks
    default, trial = build_model(), build_model(**model_sizes(TrialConfig()))
    assert default.config == trial.config and count_params(default) == count_params(trial)
    assert (default.config.blocks, default.config.head, default.config.fc) == (4, "gap", (64,))
    assert isinstance(default.pool, torch.nn.AdaptiveAvgPool2d)
