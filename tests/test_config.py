"""Search-space files: the shipped ones parse; bad ones are rejected with a sentence naming the key."""

from pathlib import Path

import pytest
import yaml

from xray_ray.config import MAX_EPOCHS, TrialConfig
from xray_ray.errors import UserError
from xray_ray.search.spaces import load_space, parse_space

SPACES = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


def test_ships_the_three_spaces():
    assert {p.stem for p in SPACES} >= {"seed", "cpu", "smoke"}


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_shipped_space_parses_and_every_choice_builds_a_model(path):
    from xray_ray.model.cnn import build_model, config_from_dict

    space = load_space(path)
    assert space.num_samples >= 1 and 1 <= space.max_epochs <= MAX_EPOCHS
    base = TrialConfig.from_dict(dict(space.constants))
    for p in space.params:
        values = p.choices if p.kind == "categorical" else (p.low, p.high)
        for v in values:
            cfg = TrialConfig.from_dict({**base.to_dict(), p.name: int(v) if p.kind == "int" else v})
            for size in space.image_sizes:
                build_model(
                    **{
                        k: v
                        for k, v in config_from_dict({**cfg.to_dict(), "image_size": size}).to_dict().items()
                        if k != "in_channels"
                    }
                )


def test_seed_space_reaches_100_epochs():
    assert load_space(next(p for p in SPACES if p.stem == "seed")).max_epochs == 100


def _doc(**space):
    return {"space": {"epochs": 3, **space}}


@pytest.mark.parametrize(
    "doc, key",
    [
        ({"space": {"epochs": 3}, "serch": {}}, "serch"),
        (_doc(learning_rate={"type": "float", "low": 0.1, "high": 0.2}), "learning_rate"),
        (_doc(lr={"type": "float", "low": 0.1, "high": 0.01}), "lr"),
        (_doc(lr={"type": "float", "low": 0.1, "high": 0.1}), "lr"),
        (_doc(lr={"type": "float", "low": "a", "high": 0.1}), "lr.low"),
        (_doc(lr={"type": "float", "low": 0.0, "high": 0.1, "log": True}), "lr"),
        (_doc(blocks={"type": "int", "low": 1.5, "high": 3}), "blocks.low"),
        (_doc(blocks={"type": "float", "low": 1, "high": 3}), "blocks"),
        (_doc(double_conv="yes"), "double_conv"),
        (_doc(width={"type": "categorical", "choices": []}), "width.choices"),
        (_doc(lr={"type": "float", "low": 0.001, "high": 0.1, "step": 2}), "lr.step"),
        ({"space": {"epochs": 101}}, "epochs"),
        ({"space": {"epochs": 0}}, "epochs"),
        ({"space": {"epochs": {"type": "int", "low": 5, "high": 150}}}, "epochs"),
        (_doc(head={"type": "categorical", "choices": ["gap", "mlp"]}), "head"),
        ({"space": {"epochs": 3}, "scheduler": {"metric": "val_f2"}}, "scheduler.metric"),
        ({"space": {"epochs": 3}, "searcher": {"num_samples": 0}}, "searcher.num_samples"),
        ({"space": {"epochs": 3}, "scheduler": {"grace_period": 5}}, "grace_period"),
        ({"space": {}}, "space"),
    ],
)
def test_bad_space_is_rejected_naming_the_key(doc, key):
    with pytest.raises(UserError) as e:
        parse_space(doc)
    msg = str(e.value)
    assert key in msg, msg
    assert "\n" not in msg and msg.endswith(".")


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: {epochs: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_space(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")


def test_round_trip_of_resolved_space(tmp_path):
    space = load_space(next(p for p in SPACES if p.stem == "cpu"))
    again = parse_space(
        yaml.safe_load(
            yaml.safe_dump(
                {k: v for k, v in space.to_dict().items() if k != "scheduler"}
                | {"scheduler": {k: v for k, v in space.to_dict()["scheduler"].items() if k != "max_t"}}
            )
        )
    )
    assert {p.name: p for p in again.params} == {p.name: p for p in space.params}
    assert dict(again.constants) == dict(space.constants)
    assert again.to_dict()["scheduler"] == space.to_dict()["scheduler"]


def test_trial_config_rejects_unknown_and_wrong_types():
    with pytest.raises(UserError, match="unknown trial setting 'colour'"):
        TrialConfig.from_dict({"colour": 1})
    with pytest.raises(UserError, match="'batch_size' must be an integer"):
        TrialConfig.from_dict({"batch_size": "32"})
    assert TrialConfig.from_dict({"fc": [8, 4]}).fc == (8, 4)


def test_new_ideas_default_off_and_old_trial_seeds_are_unchanged():
    from xray_ray.search.trial import trial_seed

    # the seeds computed by the release before these settings existed (crc32 of the old config dict)
    assert trial_seed(TrialConfig()) == 2107442432
    assert trial_seed(TrialConfig(seed=3, zoom=0.1, blocks=5)) == 2088280835
    assert trial_seed(TrialConfig(mixup=0.2)) != trial_seed(TrialConfig())
    cfg = TrialConfig()
    assert (cfg.standardize, cfg.sampler, cfg.mixup, cfg.crop, cfg.erase, cfg.swa) == (False, "none", 0, 0, 0, 0)


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"sampler": "oversample"}, "sampler"),
        ({"mixup": 2.0}, "mixup"),
        ({"crop": 0.95}, "crop"),
        ({"erase": -0.1}, "erase"),
        ({"swa": 0.3, "ema": 0.99}, "swa and ema"),
    ],
)
def test_new_settings_are_checked(bad, words):
    with pytest.raises(UserError, match=words):
        TrialConfig.from_dict(bad)


def test_robustness_composites_are_metrics_with_their_direction():
    space = parse_space({"space": {"epochs": 2}, "scheduler": {"metric": "rob_loss_mean"}})
    assert (space.metric, space.mode) == ("rob_loss_mean", "min")
    assert parse_space({"space": {"epochs": 2}, "scheduler": {"metric": "rob_auc_min"}}).mode == "max"


# ---------------------------------------------------------------- one validated config for the family


def test_model_fields_have_one_set_of_defaults():
    from xray_ray.config import CNNConfig
    from xray_ray.model import cnn as models

    assert models.CNNConfig is CNNConfig  # the old import path names the same type
    model, trial = CNNConfig().to_dict(), TrialConfig().to_dict()
    assert model.pop("in_channels") == 1
    assert model == {k: trial[k] for k in model}
    assert (trial["blocks"], trial["head"], trial["fc"]) == (4, "gap", [64])
    assert TrialConfig.defaults()["epochs"] == 10 and "in_channels" not in TrialConfig.field_names()


def test_values_as_tune_and_optuna_hand_them_over_are_accepted():
    np = pytest.importorskip("numpy")
    cfg = TrialConfig.from_dict(
        {
            "blocks": np.int64(3),
            "width": np.float64(8.0),
            "double_conv": np.bool_(False),
            "lr": np.float64(0.01),
            "fc": "[64, 32]",
            "head": np.str_("flatten"),
            "batch_size": 16.0,
            "standardize": np.bool_(True),
        }
    )
    assert (cfg.blocks, cfg.width, cfg.double_conv, cfg.fc, cfg.head, cfg.batch_size) == (
        3,
        8,
        False,
        (64, 32),
        "flatten",
        16,
    )
    assert [type(v) for v in (cfg.blocks, cfg.width, cfg.double_conv, cfg.lr, cfg.head)] == [int, int, bool, float, str]
    assert TrialConfig.from_dict({"fc": "64,32"}).fc == (64, 32) and TrialConfig.from_dict({"fc": "[]"}).fc == ()
    d = cfg.to_dict()
    assert d["fc"] == [64, 32] and TrialConfig.from_dict(d) == cfg and list(d) == list(TrialConfig().to_dict())
    hash(cfg)


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"blocks": 0}, "blocks must be at least 1, got 0."),
        (
            {"image_size": 32, "blocks": 7},
            "blocks=7 does not fit image_size=32: each block halves the image, so use 1 "
            "to 5 blocks or a larger image_size.",
        ),
        ({"width": 0}, "width must be at least 1, got 0."),
        ({"max_width": 0}, "max_width must be at least 1, got 0."),
        ({"fc": [0]}, "fc"),
        ({"fc": [-4]}, "fc"),
        ({"fc": "64,big"}, "fc"),
        ({"fc": [64, 2.5]}, "fc"),
        ({"image_size": 100000}, "image_size must be between 8 and 1024"),
        ({"image_size": 4}, "image_size"),
        ({"batch_size": 10**9}, "batch_size must be between 1 and 4096"),
        ({"batch_size": 0}, "batch_size"),
        ({"blocks": 16.5}, "'blocks' must be an integer"),
        ({"blocks": True}, "'blocks' must be an integer"),
        ({"lr": True}, "'lr' must be a number"),
        ({"lr": "0.1"}, "'lr' must be a number"),
        ({"lr": float("nan")}, "'lr' must be a number"),
        ({"growth": 0.0}, "growth"),
        ({"double_conv": 1}, "'double_conv' must be true or false"),
        ({"head": "avg"}, "head"),
        ({"epochs": 101}, "epochs must be between 1 and 100"),
        ({"ema": 0.3}, "ema"),
        ({"epochs": 3, "warmup_epochs": 3}, "warmup_epochs must be below epochs"),
        ({"rotate": 46}, "rotate"),
    ],
)
def test_impossible_trials_are_refused_in_one_sentence_naming_the_key(bad, words):
    with pytest.raises(UserError) as e:
        TrialConfig.from_dict(bad)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and msg.endswith(".") and not msg.endswith(".."), msg
    with pytest.raises(UserError):  # the constructor checks as much as from_dict
        TrialConfig(**bad)


def test_config_is_frozen_and_a_changed_copy_is_checked_again():
    cfg = TrialConfig(image_size=32)
    with pytest.raises(ValueError):  # pydantic's ValidationError for a frozen model
        cfg.blocks = 3
    assert cfg.replace(blocks=5).blocks == 5 and cfg.blocks == 4
    with pytest.raises(UserError, match="blocks=6 does not fit image_size=32"):
        cfg.replace(blocks=6)


# ---------------------------------------------------------------- the space check knows the family's limits


@pytest.mark.parametrize(
    "space, words",
    [
        (
            {"image_size": 48, "blocks": {"type": "int", "low": 2, "high": 9}},
            "blocks=9 does not fit image_size=48: each block halves the image, so use 1 to 5 blocks",
        ),
        # the largest blocks with the smallest image size among the choices
        (
            {
                "image_size": {"type": "categorical", "choices": [128, 48]},
                "blocks": {"type": "int", "low": 2, "high": 6},
            },
            "blocks=6 does not fit image_size=48",
        ),
        (
            {"image_size": {"type": "categorical", "choices": [48, 96]}, "blocks": 6},
            "blocks=6 does not fit image_size=48",
        ),
        (
            {"epochs": {"type": "int", "low": 2, "high": 6}, "warmup_epochs": {"type": "int", "low": 0, "high": 3}},
            "warmup_epochs must be below epochs",
        ),
        (
            {"swa": {"type": "float", "low": 0.0, "high": 0.3}, "ema": {"type": "categorical", "choices": [0.0, 0.99]}},
            "swa and ema both average weights",
        ),
        ({"blocks": 0}, "blocks must be at least 1"),
        ({"width": 0}, "width must be at least 1"),
        ({"width": {"type": "categorical", "choices": [8, 0]}}, "width must be at least 1"),
        ({"max_width": {"type": "int", "low": 0, "high": 8}}, "max_width must be at least 1"),
        ({"fc": [0]}, "fc"),
        ({"fc": [-4]}, "fc"),
        ({"fc": {"type": "categorical", "choices": [[64], [32, 0]]}}, "fc"),
        ({"image_size": 100000}, "image_size must be between 8 and 1024"),
        ({"image_size": {"type": "categorical", "choices": [64, 4096]}}, "image_size must be between 8 and 1024"),
        ({"batch_size": "1e9"}, "batch_size"),
        ({"batch_size": 1.0e9}, "batch_size must be between 1 and 4096"),
        ({"batch_size": {"type": "int", "low": 16, "high": 100000}}, "batch_size must be between 1 and 4096"),
    ],
)
def test_a_space_that_reaches_an_impossible_trial_is_refused(space, words):
    with pytest.raises(UserError) as e:
        parse_space({"space": {"epochs": 3, **space}})
    msg = str(e.value)
    assert words in msg and msg.startswith("space") and "\n" not in msg and msg.endswith("."), msg


def test_the_space_check_tries_the_corners_of_the_space_itself():
    blocks = {"type": "int", "low": 2, "high": 7}
    with pytest.raises(UserError, match="blocks=7 does not fit image_size=48"):
        parse_space({"space": {"image_size": {"type": "categorical", "choices": [48, 128]}, "blocks": blocks}})
    # 7 blocks do not fit the default 64 px, but every image size this space prepares takes them
    space = parse_space(
        {"space": {"image_size": {"type": "categorical", "choices": [128, 256]}, "blocks": blocks, "epochs": 3}}
    )
    assert space.image_sizes == [128, 256]
    # swa searched while ema is off, warm-up always below the fewest epochs
    parse_space(
        {
            "space": {
                "swa": {"type": "float", "low": 0.0, "high": 0.3},
                "ema": 0.0,
                "epochs": {"type": "int", "low": 4, "high": 6},
                "warmup_epochs": {"type": "int", "low": 0, "high": 3},
            }
        }
    )


def test_a_space_of_constants_trains_once_unless_asked_for_more():
    one = parse_space({"name": "one", "space": {"image_size": 48, "blocks": 4, "epochs": 2}})
    assert one.params == () and one.num_samples == 1 and one.scheduler == "fifo"
    assert parse_space({"space": {"epochs": 2}, "searcher": {"num_samples": 3}}).num_samples == 3
    assert parse_space({"space": {"epochs": {"type": "int", "low": 2, "high": 3}}}).num_samples == 8


BAD_SPACES = {
    "blocks 9 at 48 px": "image_size: 48\n  blocks: {type: int, low: 2, high: 9}\n",
    "blocks 0": "blocks: 0\n",
    "width 0": "width: 0\n",
    "fc [0]": "fc: [0]\n",
    "fc [-4]": "fc: [-4]\n",
    "image_size 100000": "image_size: 100000\n",
    "batch_size 1e9": "batch_size: 1e9\n",
    "batch_size 1.0e9": "batch_size: 1.0e+9\n",
}


@pytest.mark.slow  # one CLI subprocess per space
@pytest.mark.parametrize("body", BAD_SPACES.values(), ids=BAD_SPACES.keys())
def test_the_search_refuses_an_impossible_space_before_reading_data(tmp_path, body):
    from conftest import run_module

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nspace:\n  epochs: 2\n  " + body)
    res = run_module(
        "xray_ray.search",
        "--data",
        "synthetic:60",
        "--space",
        str(bad),
        "--results",
        str(tmp_path / "results"),
        "--cache",
        str(tmp_path / "cache"),
    )
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: space"), res.stderr
    assert "Traceback" not in res.stderr + res.stdout and "loading data" not in res.stdout
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()
