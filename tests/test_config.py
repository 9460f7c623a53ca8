import pytest

from tlapp import config as config_lib
from tlapp.config import Config, UserInputError


def test_toml_round_trip(tmp_path):
    config = Config(data="/data", backbone="vgg16", weights="none", cut="block4_pool",
                    image_size=64, epochs=3, lr=0.01, seed=7)
    path = tmp_path / "c.toml"
    path.write_text(config_lib.to_toml(config))
    assert config_lib.from_dict(config_lib.load_toml(path)) == config


def test_unknown_key_is_rejected_with_its_name(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('backbone = "vgg16"\nepochz = 3\n')
    with pytest.raises(UserInputError, match="unknown key 'epochz'.*epochs"):
        config_lib.from_dict(config_lib.load_toml(path), str(path))


@pytest.mark.parametrize("key, value, message", [
    ("epochs", 0, "epochs=0"),
    ("lr", -1.0, "lr=-1.0"),
    ("batch_size", "big", "batch_size='big'"),
    ("dropout", 1.5, "dropout=1.5"),
    ("val_fraction", 0.6, "val_fraction"),
    ("trainable_blocks", "some", "trainable_blocks='some'"),
    ("trainable_blocks", -1, "trainable_blocks=-1"),
])
def test_bad_values_name_key_and_value(key, value, message):
    values = {"test_fraction": 0.5} if key == "val_fraction" else {}
    with pytest.raises(UserInputError, match=message):
        config_lib.from_dict(values | {key: value})


def test_trainable_blocks_all_round_trips(tmp_path):
    config = config_lib.from_dict({"trainable_blocks": "all", "preprocess": "tf"})
    path = tmp_path / "c.toml"
    path.write_text(config_lib.to_toml(config))
    assert config_lib.from_dict(config_lib.load_toml(path)) == config
    assert config.trainable_blocks == "all"


def test_cut_and_trainable_blocks_conflict():
    with pytest.raises(UserInputError, match="either cut or trainable_blocks"):
        config_lib.from_dict({"cut": "mixed7", "trainable_blocks": 2})


def test_invalid_toml_is_a_user_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("epochs = = 3")
    with pytest.raises(UserInputError, match="not valid TOML"):
        config_lib.load_toml(path)


def test_cache_dir_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TLAPP_CACHE_DIR", str(tmp_path / "x"))
    assert config_lib.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("TLAPP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert config_lib.default_cache_dir() == tmp_path / "xdg" / "tlapp"
