import json

import pytest

from idc.core.config import DEFAULT_CONFIG, load_config, with_overrides
from idc.core.errors import ConfigError


def write(tmp_path, mutate):
    raw = json.loads(DEFAULT_CONFIG.read_text())
    mutate(raw)
    path = tmp_path / "confs.json"
    path.write_text(json.dumps(raw))
    return path


def test_project_config_loads():
    config = load_config()
    assert config.classifier.InceptionThreshold == 0.54
    assert config.Server.port == 7455 and config.Server.host == "127.0.0.1"
    assert config.model_dir == DEFAULT_CONFIG.parent / "model"


def test_missing_key_names_key_and_file(tmp_path):
    path = write(tmp_path, lambda raw: raw["ClassifierSettings"].pop("InceptionThreshold"))
    with pytest.raises(ConfigError, match=r"missing key 'InceptionThreshold' in section 'ClassifierSettings'") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_mistyped_key(tmp_path):
    path = write(tmp_path, lambda raw: raw["ClassifierSettings"].update(image_size="big"))
    with pytest.raises(ConfigError, match=r"key 'image_size' .* must be int, got 'big'"):
        load_config(path)


def test_bool_is_not_an_int(tmp_path):
    path = write(tmp_path, lambda raw: raw["Server"].update(port=True))
    with pytest.raises(ConfigError, match="'port'"):
        load_config(path)


def test_unknown_key_is_a_typo(tmp_path):
    path = write(tmp_path, lambda raw: raw["Server"].update(prot=1))
    with pytest.raises(ConfigError, match="unknown key 'prot'"):
        load_config(path)


def test_a_misspelt_key_is_named_with_the_closest_valid_one(tmp_path):
    def misspell(raw):
        raw["ClassifierSettings"]["InceptionTreshold"] = raw["ClassifierSettings"].pop("InceptionThreshold")

    with pytest.raises(ConfigError, match=r"unknown key 'InceptionTreshold' in section 'ClassifierSettings' of "
                                          r".*; did you mean 'InceptionThreshold'\?"):
        load_config(write(tmp_path, misspell))


def test_missing_section_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="missing section 'Alarm'"):
        load_config(write(tmp_path, lambda raw: raw.pop("Alarm")))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.json")


def test_value_checks(tmp_path):
    with pytest.raises(ConfigError, match="'InceptionThreshold'.*between 0 and 1"):
        load_config(write(tmp_path, lambda raw: raw["ClassifierSettings"].update(InceptionThreshold=1.5)))
    with pytest.raises(ConfigError, match="samples_per_class"):
        load_config(write(tmp_path, lambda raw: raw["ClassifierSettings"].update(samples_per_class="some")))
    with pytest.raises(ConfigError, match="'patch_cnn_epochs'.*0 \\(no patch CNN\\) or more"):
        load_config(write(tmp_path, lambda raw: raw["ClassifierSettings"].update(patch_cnn_epochs=-1)))
    with pytest.raises(ConfigError, match="'patch_cnn_learning_rate'.*positive"):
        load_config(write(tmp_path, lambda raw: raw["ClassifierSettings"].update(patch_cnn_learning_rate=0.0)))


def test_relative_paths_resolve_against_config_folder(tmp_path):
    config = load_config(write(tmp_path, lambda raw: None))
    assert config.resolve("model") == tmp_path / "model"
    assert config.resolve("/abs/x") .as_posix() == "/abs/x"
    changed = with_overrides(config, "ClassifierSettings", image_size=99)
    assert changed.classifier.image_size == 99 and config.classifier.image_size != 99


def test_patients_file_splits_must_map_to_known_splits(tmp_path):
    from tests.synthetic import write_config

    with pytest.raises(ConfigError, match="patients_file_splits"):
        load_config(write_config(tmp_path, patients_file_splits={"val": "testing"}))
