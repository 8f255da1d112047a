"""One precedence for every program (README, "Which value wins"): defaults < the config
file (for evaluation: the checkpoint's recorded config) < the command line, where
``--config.field``, the original's flags and ``--hparams`` rank equally and one field
given two ways with different values is an error naming both."""

from __future__ import annotations

import sys

import pytest
from absl import flags

from alp_jax import cli, configs
from alp_jax import eval as eval_lib
from alp_jax import train as train_lib
from alp_jax.config import HPARAMS, ConfigError

BASE = configs.get_config("digits_baseline")


def _train_config(monkeypatch, *argv: str):
    """``alp_jax.train``'s config for ``argv`` (ml_collections reads --config.x overrides
    from sys.argv, so it is set too)."""
    argv = ["alp_jax.train", "--config=digits_baseline", "--output_dir=/tmp/x", *argv]
    monkeypatch.setattr(sys, "argv", argv)
    fv = flags.FlagValues()
    train_lib.define_flags(fv)
    cli.parse_flags(argv, fv)
    return train_lib.config_from_flags(fv)


def test_the_file_sets_what_the_command_line_does_not(monkeypatch):
    cfg = _train_config(monkeypatch)
    for field in ("batch_size", "learning_rate", "dataset_image_size", "model_name"):
        assert cfg[field] == BASE[field]


@pytest.mark.parametrize("argv, field, value", [
    (["--config.batch_size=7"], "batch_size", 7),                 # --config.x over the file
    (["--dataset_image_size=24"], "dataset_image_size", 24),      # a flag over the file
    (["--hparams=batch_size=9"], "batch_size", 9),                # --hparams over the file
    (["--max_steps=3"], "max_steps", 3),                          # a program flag
])
def test_each_command_line_source_overrides_the_file(monkeypatch, argv, field, value):
    assert BASE[field] != value
    assert _train_config(monkeypatch, *argv)[field] == value


@pytest.mark.parametrize("argv, names", [
    (["--config.batch_size=7", "--hparams=batch_size=9"],
     ("--config.batch_size=7", "--hparams batch_size=9")),
    (["--config.dataset_image_size=24", "--dataset_image_size=32"],
     ("--config.dataset_image_size=24", "--dataset_image_size=32")),
    (["--config.max_steps=5", "--max_steps=6"], ("--config.max_steps=5", "--max_steps=6")),
    (["--config.learning_rate=0.1", "--hparams=learning_rate=0.2"],
     ("--config.learning_rate=0.1", "--hparams learning_rate=0.2")),
])
def test_one_field_two_ways_with_different_values_is_an_error_naming_both(
        monkeypatch, argv, names):
    with pytest.raises(ConfigError, match="given twice with different values") as e:
        _train_config(monkeypatch, *argv)
    for name in names:
        assert name in str(e.value)


def test_one_field_two_ways_with_the_same_value_is_fine(monkeypatch):
    cfg = _train_config(monkeypatch, "--config.batch_size=7", "--hparams=batch_size=7",
                        "--config.dataset_image_size=24", "--dataset_image_size=24",
                        "--config.learning_rate=0.5", "--hparams=learning_rate=0.5")
    assert (cfg.batch_size, cfg.dataset_image_size, cfg.learning_rate) == (7, 24, 0.5)


def test_no_flag_and_hparam_share_a_field():
    """So the README's table has no flag-versus-hparams row to state."""
    fv = flags.FlagValues()
    train_lib.define_flags(fv)
    flag_fields = set(cli.COMMON_FLAGS) | set(train_lib._TRAIN_FLAGS) | set(eval_lib.EVAL_FIELDS)
    assert not flag_fields & set(HPARAMS)


def _eval_config(monkeypatch, meta, *argv):
    argv = ["alp_jax.eval", "--checkpoint_path=/nowhere", *argv]
    monkeypatch.setattr(sys, "argv", argv)
    fv = flags.FlagValues()
    eval_lib.define_flags(fv)
    cli.parse_flags(argv, fv)
    return eval_lib.eval_config(meta, fv)


def test_evaluation_starts_from_the_checkpoints_recorded_config(monkeypatch):
    recorded = BASE.to_dict() | {"dataset_image_size": 24, "eval_batch_size": 10,
                                 "model_name": "resnet_v2_small"}
    meta = {"model_name": "resnet_v2_small", "num_classes": 10, "config": recorded}
    cfg = _eval_config(monkeypatch, meta)
    assert (cfg.dataset_image_size, cfg.eval_batch_size, cfg.num_classes) == (24, 10, 10)
    cfg = _eval_config(monkeypatch, meta, "--dataset_image_size=32",
                       "--hparams=eval_batch_size=5", "--num_examples=20")
    assert (cfg.dataset_image_size, cfg.eval_batch_size, cfg.num_examples) == (32, 5, 20)
    # The checkpoint's model and classes, unless the command line names them (any source).
    cfg = _eval_config(monkeypatch, meta, "--config=digits_baseline",
                       "--config.num_classes=12")
    assert (cfg.model_name, cfg.num_classes) == ("resnet_v2_small", 12)
    with pytest.raises(ConfigError, match="--config.eval_batch_size=4.*--hparams"):
        _eval_config(monkeypatch, meta, "--config=digits_baseline",
                     "--config.eval_batch_size=4", "--hparams=eval_batch_size=6")
