"""Config validation at the boundary: every bad value is a one-line ConfigError naming the field."""

from __future__ import annotations

import pytest

from diffaudit.cli.common import data_config_from_options, resolve_preset
from diffaudit.config import PRESETS, apply_overrides, check_model_fields, get_preset, validate_preset
from diffaudit.errors import ConfigError, one_line


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.steps=-5", "train.steps"),
        ("train.steps=0", "train.steps"),
        ("train.steps=true", "train.steps"),
        ("train.lr=-1e-3", "train.lr"),
        ("train.lr=0", "train.lr"),
        ("train.lr=NaN", "train.lr"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.seed=-1", "train.seed"),
        ("train.seed=18446744073709551616", "train.seed"),
        ("train.ema_decay=1.5", "train.ema_decay"),
        ("train.checkpoint_every=0", "train.checkpoint_every"),
        ("model.norm_num_groups=0", "model.norm_num_groups"),
        ("model.block_out_channels=[]", "model.block_out_channels"),
        ('model.block_out_channels=["a"]', "model.block_out_channels"),
        ("model.resolution=-8", "model.resolution"),
        ("model.layers_per_block=0", "model.layers_per_block"),
        ("data.seed=-3", "data.seed"),
        ("data.subset=0", "data.subset"),
        ("data.resolution=100000", "data.resolution"),
        ("data.channels=2", "data.channels"),
        ("sample.num_steps=0", "sample.num_steps"),
        ("sample.batch_size=-1", "sample.batch_size"),
    ],
)
def test_bad_values_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        apply_overrides(get_preset("digits-8"), [override])


def test_every_preset_is_valid():
    for preset in PRESETS.values():
        validate_preset(preset)


def test_cli_helpers_validate():
    assert resolve_preset("digits-8", "folder:/x [1]", None, steps=3).train.steps == 3
    with pytest.raises(ConfigError, match="train.steps"):
        resolve_preset("digits-8", None, None, steps=-1)
    with pytest.raises(ConfigError, match="option.seed"):
        data_config_from_options("digits", None, None, None, 2**64, False)
    with pytest.raises(ConfigError, match="option.subset"):
        data_config_from_options("digits", None, None, -2, 0, False)


def test_model_fields_types():
    check_model_fields({"resolution": 8, "block_out_channels": [8, 16], "attention_levels": [False, True]})
    for bad in ({"resolution": "8"}, {"norm_num_groups": None}, {"attention_levels": [1, 0]}, {"bogus": 1}):
        with pytest.raises(ConfigError):
            check_model_fields(bad)


def test_one_line_escapes_control_characters():
    assert one_line("a\nb\rc") == "a\\nb\\rc"
    assert "\n" not in one_line("x\u2028y\x1b")
