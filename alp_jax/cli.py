"""Flags shared by the programs, and how they layer onto a config.

Precedence: ``--config`` file (default: ``alp_jax.config.default_config()``), then
``--config.field=value`` overrides, then the original's flags (``--dataset``,
``--hparams="k=v,..."``, ...) when given. ``validate_config`` checks everything before a
program writes anything.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import flags

from alp_jax import config as config_lib
from alp_jax.config import ConfigError

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
    flags.DEFINE_integer("distributed_heartbeat_timeout_s", 60,
                         "A process whose peer stops beating for this long exits (status 75) "
                         "naming the lost process.", flag_values=fv)


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
            raise ConfigError(f"Config has no field {field!r} for --{flag_name}.")
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
        auto=fv.multihost, timeout_s=fv.distributed_timeout_s,
        heartbeat_timeout_s=fv.distributed_heartbeat_timeout_s)


def data_dir(cfg: Any) -> str | None:
    """The data directory the dataset reads (None for digits)."""
    if cfg.dataset == "digits":
        return None
    if cfg.dataset == "tiny_imagenet":
        return cfg.tiny_imagenet_data_dir or None
    return cfg.imagenet_data_dir or None


# ---- the valid values of the numeric fields (validate_config and parse_flags) -------------

@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric config field: ``ok(value)``, and ``valid``, the text
    an error states them with."""

    ok: Callable[[float], bool]
    valid: str
    integer: bool = False


def _at_least(lo: int, integer: bool = True) -> Range:
    return Range(lambda v: v >= lo, f">= {lo}", integer)


def _above(lo: int) -> Range:
    return Range(lambda v: v > lo, f"> {lo}")


def _fraction(*, open_low: bool = False) -> Range:
    """[0, 1), or (0, 1) with ``open_low``."""
    if open_low:
        return Range(lambda v: 0 < v < 1, "in (0, 1)")
    return Range(lambda v: 0 <= v < 1, "in [0, 1)")


def _auto_or_at_least(lo: int, auto: str) -> Range:
    return Range(lambda v: v == -1 or v >= lo, f"-1 ({auto}) or >= {lo}", True)


# Fields every run reads (training, evaluation, robustness). Checks that need more than the
# value (attack specs, dataset names, directories) stay with their owners, which
# validate_config calls; eval_batch_size, num_examples and the robustness fields are
# validate_evaluation_fields'.
RANGES: dict[str, Range] = {
    "num_classes": _auto_or_at_least(2, "from the dataset"),
    "dataset_image_size": _at_least(8),
    "num_replicas": _at_least(1),
    "mesh_model_axis": _at_least(1),
    "bn_group_size": _at_least(0),
    "bn_decay": _fraction(open_low=True),
    "moving_average_decay": Range(lambda v: v < 1, "< 1"),  # <= 0 disables the average
    "seed": Range(lambda v: 0 <= v < 2**32, f"in [0, {2**32})", True),
}
# Fields only training reads (an evaluation does not judge a recorded training config).
TRAIN_RANGES: dict[str, Range] = {
    "batch_size": _at_least(1),
    "learning_rate": _above(0),
    "lr_decay_factor": _above(0),
    "lr_num_epochs_per_decay": _above(0),
    "weight_decay": _at_least(0, integer=False),
    "label_smoothing": _fraction(),
    "momentum": _fraction(),
    "rmsprop_decay": _fraction(),
    "rmsprop_epsilon": _above(0),
    "train_lp_weight": _at_least(0, integer=False),
    "objective_weight": _at_least(0, integer=False),
    "examples_per_epoch": _auto_or_at_least(1, "from the dataset"),
    "max_steps": Range(lambda v: v >= -1, ">= -1", True),  # -1: forever
    "save_model_steps": _at_least(0),  # 0: only at the end
    "save_summaries_steps": _at_least(0),  # 0: none
    "log_every_steps": _at_least(1),
    "keep_checkpoints": _at_least(0),  # 0: keep all
    "num_summary_images": _at_least(0),
    "max_loss": _at_least(0, integer=False),  # 0: no ceiling
}
# Fields only evaluation reads.
EVAL_RANGES: dict[str, Range] = {
    "eval_interval_secs": _at_least(0, integer=False),
}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_value(name: str, value: Any, rule: Range) -> None:
    if rule.integer and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ConfigError(f"{name} must be an integer, got {value!r}.")
    if not _is_number(value):
        raise ConfigError(f"{name} must be a number, got {value!r}.")
    if not (math.isfinite(value) and rule.ok(value)):
        raise ConfigError(f"{name} must be {rule.valid}, got {value!r}.")


def check_ranges(cfg: Any, ranges: dict[str, Range]) -> None:
    """Raises ConfigError naming the first field of ``cfg`` outside its ``ranges`` entry
    (fields the config lacks are skipped), and checks ``bounds``."""
    for name, rule in ranges.items():
        if name in cfg:
            _check_value(name, cfg[name], rule)
    if "bounds" in cfg:
        b = cfg.bounds
        if not (len(b) == 2 and all(_is_number(x) and math.isfinite(x) for x in b)
                and b[0] < b[1]):
            raise ConfigError(f"bounds must be (low, high) with low < high, got {tuple(b)}.")


def validate_config(cfg: Any, *, training: bool) -> None:
    """Raises ConfigError (a ValueError) naming the bad field, its value and what is valid.

    ``training``: the checks of a training run; otherwise those of an evaluation, which
    reads a checkpoint's recorded config and so skips the fields only training reads.
    """
    try:
        _validate_config(cfg, training=training)
    except ConfigError:
        raise
    except (ValueError, OSError, ImportError) as e:
        # The other modules' validators (attack specs, objectives, data) raise their own
        # types; to the programs they are all a bad value, printed without a traceback.
        raise ConfigError(str(e)) from e


def _validate_config(cfg: Any, *, training: bool) -> None:
    from alp_jax import data, model, objectives, pgd, train_state

    if cfg.dataset not in data.DATASETS:
        raise ValueError(f"Unknown dataset {cfg.dataset!r}; valid: {', '.join(data.DATASETS)}.")
    data.check_available(cfg.dataset)
    if cfg.model_name not in model.MODELS:
        raise ValueError(f"Unknown model_name {cfg.model_name!r}; valid: "
                         f"{', '.join(model.MODELS)}.")
    check_ranges(cfg, RANGES | (TRAIN_RANGES if training else EVAL_RANGES))
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
        for i, v in enumerate(cfg.lr_list):
            _check_value(f"lr_list[{i}]", v, _above(0))
        epochs = list(cfg.lr_decay_epochs)
        if not all(_is_number(e) and e >= 0 for e in epochs) or any(
                b <= a for a, b in zip(epochs, epochs[1:], strict=False)):
            raise ConfigError(f"lr_decay_epochs must be increasing and >= 0, got {epochs}.")
        if not cfg.output_dir:
            raise ValueError("--output_dir is required.")
    else:
        pgd.parse_attack(cfg.adv_method)
        data.check_num_examples(cfg.dataset, cfg.split_name, cfg.num_examples, data_dir(cfg))
    validate_evaluation_fields(cfg)


# ---- evaluation engine and robustness fields (issue 16; alp_jax.engine owns them) ----------

def validate_evaluation_fields(cfg: Any) -> None:
    """Checks ``attack_seed``, ``num_examples`` and the ``robustness_*`` fields."""
    from alp_jax.attacks import grammar
    from alp_jax.engine import autoattack, suite

    if not autoattack.is_preset(cfg.robustness_attacks):
        suite.parse_attack_list(cfg.robustness_attacks, "--attacks (robustness_attacks)")
    suite.parse_eps_list(cfg.robustness_eps, "--eps (robustness_eps)")
    grammar.parse_attack(cfg.robustness_large_eps_attack)
    if cfg.num_examples == 0 or cfg.num_examples < -1:
        raise ValueError(f"num_examples must be positive or -1 (all), got {cfg.num_examples}.")
    if cfg.robustness_num_images < 0:
        raise ValueError(f"robustness_num_images must be >= 0, got {cfg.robustness_num_images}.")
    if cfg.eval_batch_size <= 0:
        raise ValueError(f"eval_batch_size must be positive, got {cfg.eval_batch_size}.")


# ---- the command line: short errors instead of tracebacks ---------------------------------

_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")
_CONFIG_GIVEN = re.compile(r"^--?config(=|$)")


def _override_error(argv: Sequence[str], overrides: list[tuple[str, str]],
                    fv: flags.FlagValues, error: Exception) -> str:
    """The message for ``--config.*`` overrides that ml_collections failed on (it raises a
    bare AttributeError / KeyError for a field the config does not have)."""
    fields: list[str] = []
    path = next((a.split("=", 1)[1] for a in argv if _CONFIG_GIVEN.match(a) and "=" in a), None)
    try:
        fields = list(fv["config"].parser.parse(path)) if path else []
    except Exception:  # noqa: BLE001 - only used for the suggestion
        fields = []
    fields = fields or list(config_lib.default_config())
    for arg, field in overrides:
        top = field.split(".")[0]
        if top not in fields:
            close = difflib.get_close_matches(top, fields, n=3)
            hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
            return (f"{arg}: the config has no field {top!r}{hint}; the fields are those of "
                    "alp_jax/config.py default_config().")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{' '.join(a for a, _ in overrides)}: {first}"


def parse_flags(argv: Sequence[str], fv: flags.FlagValues = FLAGS) -> list[str]:
    """Parses ``argv`` into ``fv`` like absl, raising ``flags.Error`` with a one-line message
    for an unknown or mistyped ``--config.field``, an override without ``--config``, and a
    flag value outside its config field's range (RANGES); returns the remaining arguments.
    """
    given = fv.read_flags_from_files(list(argv), force_gnu=False)  # as ml_collections reads
    overrides = [(a, m.group(1)) for a in given if (m := _OVERRIDE.match(a))]
    if overrides and not any(_CONFIG_GIVEN.match(a) for a in given):
        raise flags.Error(
            f"{overrides[0][0]} overrides a field of a config file: pass "
            "--config=configs/NAME.py (e.g. configs/digits_alp.py) before it.")
    try:
        rest = fv(list(argv))
    except flags.Error:
        raise
    except Exception as e:  # noqa: BLE001 - see _override_error
        if not overrides:
            raise
        raise flags.Error(_override_error(given, overrides, fv, e)) from None
    if "config" in fv and fv["config"].value is not None:
        try:  # ml_collections defers a failed load of the file to the config's first use
            fv["config"].value.get("seed")
        except OSError as e:
            lines = [x.strip() for x in str(e).splitlines() if x.strip()]
            raise flags.Error(f"--config: the file could not be loaded ({lines[-1]}); the "
                              "shipped configs are in configs/.") from None
    ranges = RANGES | TRAIN_RANGES | EVAL_RANGES
    for name, rule in ranges.items():
        if name in fv and fv[name].present and fv[name].value is not None:
            try:
                _check_value(name, fv[name].value, rule)
            except ConfigError as e:
                raise flags.Error(f"--{name}={fv[name].value}: {e}") from None
    return rest


def _parse_flags_or_exit(argv: Sequence[str]) -> list[str]:
    """``parse_flags`` for ``absl.app.run``: prints the error as absl does and exits 1."""
    try:
        return parse_flags(argv)
    except flags.Error as e:
        sys.stderr.write(f"FATAL Flags parsing error: {e}\n"
                         "Pass --helpshort or --helpfull to see help on flags.\n")
        sys.exit(1)


def _default_text(flag: flags.Flag, field: str | None, defaults_from: str) -> str:
    """What a flag whose absl default is None stands for when it is not given."""
    defaults = config_lib.default_config()
    if field is not None and field in defaults:
        return f"(default: {field} of {defaults_from}; default_config(): {defaults[field]!r})"
    if flag.name == "config":
        return "(default: alp_jax/config.py default_config())"
    return "(default: unset)"


def declare_key_flags(names: Sequence[str], fv: flags.FlagValues = FLAGS, *,
                      fields: dict[str, str] | None = None,
                      defaults_from: str = "the config") -> None:
    """Makes ``names`` the key flags of the running program, so ``--help`` lists them.

    absl's ``--help`` lists the flags of the module it takes to be the main one
    (``sys.argv[0]``); a console script's wrapper (``alp-train``) defines none, and the
    shared flags live in this module, so the program states its flags here. A flag whose
    default is None (it falls back to a config field) gets that fallback in its help;
    ``fields`` maps the program's own flags to the config fields they set (default: each
    flag sets the field of its name); the shared flags set the fields of their names.
    """
    for name in names:
        flag = fv[name]
        if flag.default is None and "default" not in (flag.help or "").lower():
            if fields is None or name in COMMON_FLAGS:
                field = name
            else:
                field = fields.get(name)
            flag.help = f"{flag.help} {_default_text(flag, field, defaults_from)}"
            flag.default_as_str = None  # absl would add "(default: 'None')"
        fv.register_key_flag_for_module(sys.argv[0], flag)


def run_program(main: Callable[[list[str]], Any], define_flags: Callable[[], None], *,
                fields: dict[str, str] | None = None,
                defaults_from: str = "the config") -> None:
    """Defines the flags and runs ``main`` under ``absl.app``; a bad command line or config
    value (``parse_flags``, or ConfigError from ``main``) ends the program with one line
    and status 1 instead of a traceback. ``--help`` lists every flag ``define_flags``
    defines (``declare_key_flags``) under the program module's docstring."""
    from absl import app

    def guarded(argv: list[str]) -> Any:
        from alp_jax import checkpoints, run_dir

        try:
            return main(argv)
        except ConfigError as e:
            sys.stderr.write(f"FATAL config error: {e}\n")
            sys.exit(1)
        except (checkpoints.CheckpointError, run_dir.OutputDirInUse,
                run_dir.ResumeMismatch) as e:
            # Damaged checkpoints, a busy or another run's directory: the message says
            # what and where; a traceback would only bury it.
            sys.stderr.write(f"FATAL: {e}\n")
            sys.exit(1)

    before = set(FLAGS)
    define_flags()
    declare_key_flags([n for n in FLAGS if n not in before], fields=fields,
                      defaults_from=defaults_from)
    main_module = sys.modules.get("__main__")
    if main_module is not None and not main_module.__doc__:
        # A console script's wrapper has no docstring: absl's usage line shows the program's.
        main_module.__doc__ = sys.modules[main.__module__].__doc__
    app.run(guarded, flags_parser=_parse_flags_or_exit)


class _DropLibraryInfo:
    """Drops INFO records from Orbax and other libraries; keeps ours and all warnings."""

    _NOISY = ("/orbax/", "/jax/_src/", "/etils/")

    def filter(self, record) -> bool:
        library = any(p in record.pathname for p in self._NOISY)
        if library and record.levelno >= 40 and record.exc_info:
            # Orbax logs each failed background write with its traceback (hundreds of
            # lines for one full disk); the program reports the cause in one line.
            record.exc_info, record.exc_text = None, None
        return record.levelno >= 30 or not library


def setup_logging() -> None:
    """INFO logging for the programs without Orbax's per-save chatter."""
    import logging as pylogging

    from absl import logging

    logging.set_verbosity(logging.INFO)
    logger = pylogging.getLogger("absl")
    logger.setLevel(pylogging.INFO)
    logging.get_absl_handler().addFilter(_DropLibraryInfo())
