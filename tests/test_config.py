"""Configuration: YAML plus overrides, unknown keys and bad values rejected before any work."""

import pytest
import yaml

from distal import config as config_module
from distal.config import ConfigError


def test_defaults_follow_paper_recipe():
    config = config_module.load()
    assert config.train.epochs == 200
    assert config.train.lr == 0.1
    assert config.train.milestones == (160,)
    assert config.train.gradient_stop_epoch == 120
    assert config.train.margin == 1.0
    assert config.train.loss_weight == 1.0
    assert config.train.batch_size == 128
    assert config.score.subset_size == 10_000
    assert config.select.k == 1_000


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"cycles": 3, "train": {"epochs": 7, "milestones": [5]}, "score": {"subset_size": 50}}))
    config = config_module.load(str(path), ["train.epochs=9", "score.subset_size=null"])
    assert config.cycles == 3
    assert config.train.epochs == 9
    assert config.train.milestones == (5,)
    assert config.score.subset_size is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=5"], "unknown configuration key"),
        (["trian.epochs=5"], "unknown configuration key"),
        (["train.epochs=five"], "train.epochs must be int"),
        (["oracle=yes please"], "oracle must be true or false"),
        (["train.batch_size=6", "train.num_workers=4"], "train.batch_size"),
        (["train.batch_size=9"], "even"),
        (["select.k=0"], "select.k"),
        (["score.max_skip_fraction=1.5"], "score.max_skip_fraction"),
        (["train.milestones=[10,5]"], "increasing"),
        (["model.arch=vit"], "model.arch"),
        (["no_equals_sign"], "KEY=VALUE"),
    ],
)
def test_bad_values_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_module.load(None, overrides)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 3\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.learning_rate"):
        config_module.load(str(path))


def test_resolved_config_round_trips():
    config = config_module.load(None, ["train.milestones=[3,4]", "pool.eval_path=null"])
    again = config_module.from_dict(yaml.safe_load(config_module.dump_yaml(config)))
    assert again == config
