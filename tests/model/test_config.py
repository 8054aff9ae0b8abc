"""Med2E3Config: presets, persistence, validation."""

from __future__ import annotations

import pytest

from med2e3.config import Med2E3Config
from med2e3.errors import ConfigError


def comparable(config: Med2E3Config) -> dict:
    d = config.to_dict()
    d.pop("_name_or_path", None)
    return d


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_config_save_and_reload_is_equal(tmp_path, preset):
    config = Med2E3Config.from_preset(preset, slice_aggregation="mean")
    config.save_pretrained(tmp_path)
    assert comparable(Med2E3Config.from_pretrained(tmp_path)) == comparable(config)
    assert "vision3d_config" in config.to_json_string()  # printable


def test_paper_preset_has_the_published_dimensions():
    c = Med2E3Config.from_preset("paper")
    assert c.text_config.model_type == "phi3"
    assert (c.text_config.hidden_size, c.text_config.num_hidden_layers, c.text_config.vocab_size) == (
        3072,
        32,
        32064,
    )
    assert (c.vision2d_config.hidden_size, c.vision2d_config.num_hidden_layers) == (1024, 24)
    assert (c.vision2d_config.image_size, c.vision2d_config.patch_size) == (256, 16)
    v3 = c.vision3d_config
    assert (v3.image_size, v3.patch_size, v3.hidden_size, v3.num_hidden_layers) == (
        [32, 256, 256],
        [4, 16, 16],
        768,
        12,
    )
    assert c.question_encoder_config.hidden_size == 768
    assert (c.tgis_temperature, c.tgis_score_dropout, c.pool_size, c.num_slices) == (5.0, 0.1, 2, 32)
    assert (c.vision3d_feature_layer, c.vision2d_normalize) == (-1, False)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"slice_aggregation": "max"}, "slice_aggregation"),
        ({"vision3d_config": {"image_size": [30, 64, 64], "patch_size": [4, 16, 16]}}, "image_size"),
        ({"pool_size": 3}, "pool_size"),
        ({"tgis_temperature": 0}, "tgis_temperature"),
        ({"tgis_score_dropout": 1.5}, "tgis_score_dropout"),
        ({"image_token_id": 10**6}, "image_token_id"),
        ({"vision3d_feature_layer": 5}, "vision3d_feature_layer"),
    ],
)
def test_invalid_geometry_names_the_field(overrides, field):
    tiny = Med2E3Config.from_preset("tiny").to_dict()
    for key, value in overrides.items():
        if isinstance(value, dict):
            tiny[key] = {**tiny[key], **value}
        else:
            tiny[key] = value
    tiny.pop("model_type", None)
    with pytest.raises(ConfigError, match=field):
        Med2E3Config(**tiny)


def test_slice_size_must_match_the_2d_encoder():
    tiny = Med2E3Config.from_preset("tiny").to_dict()
    tiny["vision2d_config"]["image_size"] = 32
    tiny.pop("model_type")
    with pytest.raises(ConfigError, match="vision2d_config.image_size"):
        Med2E3Config(**tiny)
    tiny["slice_aggregation"] = "none"  # no 2D branch, no constraint
    assert Med2E3Config(**tiny).num_image_tokens == 16


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        Med2E3Config.from_preset("huge")
