import json

import pytest

from magicseg_engine.config import PRESETS, PromptsConfig, load_preset, save_config
from magicseg_engine.errors import UsageError


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates(name):
    config = load_preset(name)
    assert config.preset == name


def test_preset_values_match_the_paper_where_they_should():
    sd = load_preset("sd15-random").diffusion
    assert (sd.height, sd.width, sd.steps, sd.guidance) == (512, 512, 20, 7.5)
    assert sd.architecture == "sd15" and sd.weights == "random"
    assert load_preset("sd15").diffusion.weights == "pretrained"
    tiny = load_preset("tiny")
    assert tiny.diffusion.architecture == "tiny" and tiny.diffusion.height < 512


def test_overrides_replace_single_fields_and_none_means_unset():
    config = load_preset("sd15-random", {"diffusion": {"steps": 30, "guidance": None}, "seed": 7})
    assert config.diffusion.steps == 30
    assert config.diffusion.guidance == 7.5
    assert config.diffusion.height == 512
    assert config.seed == 7


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"diffusion": {"height": 500}}, "diffusion.height: Value error, must be a multiple of 8"),
        ({"diffusion": {"steps": 0}}, "diffusion.steps"),
        ({"diffusion": {"scheduler": "pndm"}}, "diffusion.scheduler"),
        ({"diffusion": {"stepz": 3}}, "diffusion.stepz: Extra inputs are not permitted"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_overrides_are_usage_errors_naming_the_field(overrides, message):
    with pytest.raises(UsageError, match="invalid configuration for preset 'tiny'") as err:
        load_preset("tiny", overrides)
    assert message in str(err.value)


def test_pretrained_weights_need_a_model():
    with pytest.raises(UsageError, match="need a model path or hub id"):
        load_preset("sd15", {"diffusion": {"model": ""}})


def test_unknown_preset():
    with pytest.raises(UsageError, match="unknown preset 'sd3'; choose one of: tiny, shapes, sd15-random, "
                                         "sd21-random, sdxl-random, sd15, sd21, sdxl"):
        load_preset("sd3")


def test_saved_config_round_trips_with_versions(tmp_path):
    config = PromptsConfig(seed=3, negative_token="void")
    path = tmp_path / "out" / "prompts.config.json"
    save_config(config, path, summary={"written": 4})
    saved = json.loads(path.read_text())
    assert PromptsConfig.model_validate(saved["config"]) == config
    assert saved["versions"]["torch"].startswith("2.")
    assert saved["summary"] == {"written": 4}
    assert [p.name for p in path.parent.iterdir()] == ["prompts.config.json"]  # no temporary left
