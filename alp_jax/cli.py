"""Flags shared by the programs, and how they layer onto a config.

Precedence: ``--config`` file (default: ``alp_jax.config.default_config()``), then
``--config.field=value`` overrides, then the original's flags (``--dataset``,
``--hparams="k=v,..."``, ...) when given. ``validate_config`` checks everything before a
program writes anything.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from absl import flags

from alp_jax import config as config_lib

FLAGS = flags.FLAGS

# The original's flags, in both programs, layered onto the config when given.
COMMON_FLAGS = _COMMON = {
    "model_name": (flags.DEFINE_string, "Model: resnet_v2_50/101/152/200 or resnet_v2_small."),
    "moving_average_decay": (flags.DEFINE_float,
                             "Moving-average decay; <= 0 disables (released checkpoints: -1)."),
    "dataset": (flags.DEFINE_string, "digits, imagenet, imagenet_tfds or tiny_imagenet."),
    "dataset_image_size": (flags.DEFINE_integer, "Image size (single number)."),
    "imagenet_data_dir": (flags.DEFINE_string, "Directory with ImageNet TFRecords (or TFDS)."),
    "tiny_imagenet_data_dir": (flags.DEFINE_string, "Directory with Tiny ImageNet TFRecords."),
}


def define_common_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Defines the flags both programs share on ``fv`` (tests pass a fresh FlagValues)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "config", None, "Experiment config file (configs/NAME.py); fields can be "
        "overridden with --config.field=value.", lock_config=False, flag_values=fv)
    for name, (define, help_) in _COMMON.items():
        define(name, None, help_, flag_values=fv)
    flags.DEFINE_string("hparams", "", 'Original-style hyperparameters, "name=value,...".',
                        flag_values=fv)
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0 for a multi-process run (not needed on TPU "
                        "or SLURM with --multihost).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "Processes in the multi-process run.",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "This process's index in the run.", flag_values=fv)
    flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with automatic "
                      "cluster detection (Cloud TPU, SLURM).", flag_values=fv)
    flags.DEFINE_integer("distributed_timeout_s", 300,
                         "Seconds to wait for the cluster to form before failing.",
                         flag_values=fv)


def base_config(fv: flags.FlagValues = FLAGS) -> ml_collections.ConfigDict:
    cfg = fv.config
    if cfg is None:
        cfg = config_lib.default_config()
    return cfg


def layer_flags(cfg: ml_collections.ConfigDict, names: dict[str, str],
                fv: flags.FlagValues = FLAGS) -> None:
    """Copies given (non-None) flags onto config fields: ``{flag_name: field}``."""
    for flag_name, field in names.items():
        value = getattr(fv, flag_name)
        if value is None:
            continue
        if field not in cfg:
            raise ValueError(f"Config has no field {field!r} for --{flag_name}.")
        with cfg.ignore_type():
            cfg[field] = value


def common_config(fv: flags.FlagValues = FLAGS) -> ml_collections.ConfigDict:
    """The config with the shared flags and ``--hparams`` layered on."""
    cfg = base_config(fv)
    layer_flags(cfg, {n: n for n in _COMMON}, fv)
    if fv.hparams:
        config_lib.apply_hparams(cfg, fv.hparams)
    return cfg


def maybe_initialize_distributed(fv: flags.FlagValues = FLAGS) -> None:
    from alp_jax import sharding

    sharding.initialize_distributed(
        fv.coordinator_address, fv.num_processes, fv.process_id,
        auto=fv.multihost, timeout_s=fv.distributed_timeout_s)


def data_dir(cfg: Any) -> str | None:
    """The data directory the dataset reads (None for digits)."""
    if cfg.dataset == "digits":
        return None
    if cfg.dataset == "tiny_imagenet":
        return cfg.tiny_imagenet_data_dir or None
    return cfg.imagenet_data_dir or None


def validate_config(cfg: Any, *, training: bool) -> None:
    """Raises ValueError naming the bad field and what would be valid."""
    from alp_jax import data, model, objectives, pgd, train_state

    if cfg.dataset not in data.DATASETS:
        raise ValueError(f"Unknown dataset {cfg.dataset!r}; valid: {', '.join(data.DATASETS)}.")
    data.check_available(cfg.dataset)
    if cfg.model_name not in model.MODELS:
        raise ValueError(f"Unknown model_name {cfg.model_name!r}; valid: "
                         f"{', '.join(model.MODELS)}.")
    if cfg.dataset_image_size < 8:
        raise ValueError(f"dataset_image_size must be >= 8, got {cfg.dataset_image_size}.")
    from alp_jax.convolution import CONV_IMPLS

    if cfg.get("conv_impl", "auto") not in CONV_IMPLS:
        raise ValueError(f"conv_impl {cfg.conv_impl!r}; valid: {', '.join(CONV_IMPLS)}.")
    if cfg.compute_dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"compute_dtype {cfg.compute_dtype!r}: use float32 or bfloat16.")
    if cfg.dataset != "digits":
        d = data_dir(cfg)
        flag = "tiny_imagenet_data_dir" if cfg.dataset == "tiny_imagenet" else "imagenet_data_dir"
        if not d:
            raise ValueError(f"--dataset={cfg.dataset} needs --{flag}.")
        if not os.path.isdir(d):
            raise FileNotFoundError(f"--{flag}={d!r} is not a directory.")
    for name in ("batch_size", "eval_batch_size", "num_replicas"):
        if cfg[name] <= 0:
            raise ValueError(f"{name} must be positive, got {cfg[name]}.")
    if training:
        pgd.parse_attack(cfg.train_adv_method)
        objectives.get_objective(cfg)
        if cfg.optimizer not in train_state.OPTIMIZERS:
            raise ValueError(f"Unknown optimizer {cfg.optimizer!r}; valid: "
                             f"{', '.join(train_state.OPTIMIZERS)}.")
        if cfg.lr_schedule not in train_state.LR_SCHEDULES:
            raise ValueError(f"Unknown lr_schedule {cfg.lr_schedule!r}; valid: "
                             f"{', '.join(train_state.LR_SCHEDULES)}.")
        if cfg.lr_schedule == "step" and len(cfg.lr_list) != len(cfg.lr_decay_epochs) + 1:
            raise ValueError("lr_list needs exactly one more value than lr_decay_epochs.")
        if not cfg.output_dir:
            raise ValueError("--output_dir is required.")
    else:
        pgd.parse_attack(cfg.adv_method)


class _DropLibraryInfo:
    """Drops INFO records from Orbax and other libraries; keeps ours and all warnings."""

    _NOISY = ("/orbax/", "/jax/_src/", "/etils/")

    def filter(self, record) -> bool:
        return record.levelno >= 30 or not any(p in record.pathname for p in self._NOISY)


def setup_logging() -> None:
    """INFO logging for the programs without Orbax's per-save chatter."""
    import logging as pylogging

    from absl import logging

    logging.set_verbosity(logging.INFO)
    logger = pylogging.getLogger("absl")
    logger.setLevel(pylogging.INFO)
    logging.get_absl_handler().addFilter(_DropLibraryInfo())
