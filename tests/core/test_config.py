import dataclasses
import json
import logging
import typing

import pytest

from idc.core.config import DEFAULT_CONFIG, Config, load_config, with_overrides
from idc.core.errors import ConfigError

# Section name -> its settings class (Config's fields, less the file's path).
SECTIONS = {name: cls for name, cls in typing.get_type_hints(Config).items() if name != "path"}


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


def test_the_code_defaults_are_the_shipped_confs_json():
    """Every key has a default in the code, equal to the shipped confs.json's value, which lists every key."""
    shipped = json.loads(DEFAULT_CONFIG.read_text())
    assert set(shipped) == set(SECTIONS)
    for name, cls in SECTIONS.items():
        defaults = dataclasses.asdict(cls())
        assert defaults == shipped[name], name  # same keys, same values (300 == 300.0)


def test_an_older_confs_json_loads_and_the_keys_it_lacks_take_the_defaults(tmp_path, caplog):
    def older(raw):
        raw["ClassifierSettings"].pop("stain_normalization")
        raw["ClassifierSettings"].pop("patch_cnn_epochs")
        raw["ClassifierSettings"]["image_size"] = 299  # what it does set still counts
        raw.pop("Alarm")

    path = write(tmp_path, older)
    with caplog.at_level(logging.DEBUG, logger="idc.core.config"):
        config = load_config(path)
    assert config.classifier.stain_normalization == SECTIONS["ClassifierSettings"]().stain_normalization == "none"
    assert config.classifier.patch_cnn_epochs == SECTIONS["ClassifierSettings"]().patch_cnn_epochs == 16
    assert config.classifier.image_size == 299
    assert config.Alarm == SECTIONS["Alarm"]() and config.Alarm.topics == ["IDC/Devices/Lab/EdgeServer/Sensors"]
    # Logged once, at debug level, naming the keys, their section and the file.
    (record,) = [r for r in caplog.records if r.name == "idc.core.config"]
    assert record.levelno == logging.DEBUG
    message = record.getMessage()
    assert str(path) in message and "'stain_normalization', 'patch_cnn_epochs' of section 'ClassifierSettings'" in message
    assert "section 'Alarm'" in message
    # A complete confs.json logs nothing.
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="idc.core.config"):
        load_config()
    assert not [r for r in caplog.records if r.name == "idc.core.config"]


def test_an_empty_confs_json_is_all_defaults(tmp_path):
    path = tmp_path / "confs.json"
    path.write_text("{}")
    config, shipped = load_config(path), load_config()
    for name in SECTIONS:
        assert getattr(config, name) == getattr(shipped, name), name


def test_default_lists_and_dicts_are_not_shared():
    one, other = SECTIONS["ClassifierSettings"](), SECTIONS["ClassifierSettings"]()
    one.train_views.append("stain1")
    one.stain_jitter["hed"] = 0.5
    assert other.train_views == ["identity", "hflip", "vflip", "rot90", "jpeg1"] and other.stain_jitter["hed"] == 0.1


def test_unknown_keys_and_bad_values_still_fail_naming_key_section_and_file(tmp_path):
    cases = [
        (lambda raw: raw["Alarm"].update(buzer_seconds=1.0), r"unknown key 'buzer_seconds' in section 'Alarm' of .*; did you mean 'buzzer_seconds'\?"),
        (lambda raw: raw["Server"].update(port="80"), r"key 'port' in section 'Server' of .* must be int, got '80'"),
        (lambda raw: raw["OpenVINO"].update(precision="FP8"), r"key 'precision' in section 'OpenVINO' of .*: must be"),
        # A key that an older file lacks is still checked where it is given, even in a partial section.
        (lambda raw: raw.update(Alarm={"buzzer_seconds": -1}), r"key 'buzzer_seconds' in section 'Alarm' of .*: must not"),
    ]
    for mutate, message in cases:
        path = write(tmp_path, mutate)
        with pytest.raises(ConfigError, match=message) as err:
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


def test_unknown_section_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section 'Alarms' in .*confs\.json"):
        load_config(write(tmp_path, lambda raw: raw.update(Alarms=raw.pop("Alarm"))))
    with pytest.raises(ConfigError, match="section 'Alarm' of .* must be a JSON object"):
        load_config(write(tmp_path, lambda raw: raw.update(Alarm=[])))
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
    for weight in (0.0, 1.5):
        with pytest.raises(ConfigError, match="'patch_cnn_weight'.*share of the answer"):
            load_config(write(tmp_path, lambda raw: raw["ClassifierSettings"].update(patch_cnn_weight=weight)))
    for shift in (-1, 25):
        with pytest.raises(ConfigError, match="'random_shift'.*pixels in \\[0, 25\\)"):
            load_config(write(tmp_path, lambda raw: raw["ClassifierSettings"].update(random_shift=shift)))
    with pytest.raises(ConfigError, match="'random_shift'.*must be int"):
        load_config(write(tmp_path, lambda raw: raw["ClassifierSettings"].update(random_shift=2.5)))
    with pytest.raises(ConfigError, match="scan_invariance needs a linear head"):
        load_config(write(tmp_path, lambda raw: raw["ClassifierSettings"].update(head_hidden_units=64,
                                                                                scan_invariance=0.3)))


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
