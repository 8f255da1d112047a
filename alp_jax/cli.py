"""Flags shared by the programs, and how they layer onto a config.

Precedence (the README's table): ``alp_jax.config.default_config()``, then the
``--config`` file (for evaluation, the checkpoint's recorded config), then the command
line: ``--config.field=value``, the original's flags (``--dataset``, ``--output_dir``, ...)
and ``--hparams="k=v,..."``, all of equal rank: one field given two ways with different
values is an error naming both (``command_line_values``). ``validate_config`` checks
everything before a program writes anything, through each value's owner.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
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
    "allow_unverified_checkpoint": (
        flags.DEFINE_bool, "Load a checkpoint that has no checksums (written before they "
        "existed), with a warning; otherwise it is refused."),
}


def define_common_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Defines the flags both programs share on ``fv`` (tests pass a fresh FlagValues)."""
    from ml_collections import config_flags

    from alp_jax import configs

    config_flags.DEFINE_config_file(
        "config", None, "Experiment config: a shipped name FAMILY_VARIANT, FAMILY one of "
        f"{', '.join(configs.FAMILIES)} and VARIANT one of {', '.join(configs.VARIANTS)} "
        "(e.g. digits_alp; alp_jax/configs/), or the path of a config file with a "
        "get_config() (path/to/my_config.py, optionally :ARG for get_config); fields can be "
        "overridden with --config.field=value.", lock_config=False, flag_values=fv)
    for name, (define, help_) in _COMMON.items():
        define(name, None, help_, flag_values=fv)
    flags.DEFINE_string("hparams", "", 'Original-style hyperparameters, "name=value,...".',
                        flag_values=fv)
    flags.DEFINE_list("attack_modules", [], "Comma-separated Python modules of your own "
                      "attack families: each is imported and its register() called (it "
                      "calls alp_jax.attacks.register_family) before any spec is read.",
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
    """The ``--config`` file's config (its ``--config.x`` overrides applied), or
    ``default_config()`` without one."""
    cfg = fv.config
    if cfg is None:
        cfg = config_lib.default_config()
    return cfg


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: a tuple equals the list of its items; True is not 1."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def command_line_values(cfg: ml_collections.ConfigDict, flag_fields: dict[str, str],
                        fv: flags.FlagValues = FLAGS) -> dict[str, tuple[str, Any]]:
    """``{field: (how it was given, value)}`` for every field the command line sets.

    Three sources set fields, with equal rank: ``--config.field=value``, the flags in
    ``flag_fields`` (``{flag name: field}``: the original's flags and the program's own)
    and ``--hparams="field=value,..."``. A field given by two of them with different
    values is a ConfigError naming both; given twice with the same value, it is set once.
    """
    given: dict[str, list[tuple[str, Any]]] = {}
    if "config" in fv and fv["config"].value is not None:
        for path, value in fv["config"].override_values.items():
            given.setdefault(path, []).append((f"--config.{path}={value!r}", value))
    for flag_name, field in flag_fields.items():
        value = getattr(fv, flag_name, None)
        if value is None:
            continue
        if field not in cfg:
            raise ConfigError(f"Config has no field {field!r} for --{flag_name}.")
        given.setdefault(field, []).append((f"--{flag_name}={value!r}", value))
    if "hparams" in fv and fv.hparams:
        for name, value in config_lib.parse_hparams_values(cfg, fv.hparams).items():
            given.setdefault(name, []).append((f"--hparams {name}={value!r}", value))
    out = {}
    for field, ways in given.items():
        first = ways[0]
        for other in ways[1:]:
            if not _same(first[1], other[1]):
                raise ConfigError(
                    f"{field} is given twice with different values: {first[0]} and "
                    f"{other[0]}; give it once.")
        out[field] = first
    return out


def load_attack_modules(fv: flags.FlagValues = FLAGS) -> None:
    """Registers the families of ``--attack_modules`` (``attacks.register_modules``); each
    program calls it once, before it builds its config (whose specs may name them).
    ConfigError naming a module that cannot be loaded."""
    from alp_jax.attacks import register_modules

    if "attack_modules" not in fv:
        return
    try:
        register_modules(fv.attack_modules or [])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def config_from_command_line(base: ml_collections.ConfigDict, flag_fields: dict[str, str],
                             fv: flags.FlagValues = FLAGS
                             ) -> tuple[ml_collections.ConfigDict, set[str]]:
    """A copy of ``base`` with every command-line value set (``command_line_values``),
    and the set of fields the command line gave. ``flag_fields`` maps the program's own
    flags to fields; the shared flags (``COMMON_FLAGS``) set the fields of their names."""
    cfg = ml_collections.ConfigDict(base.to_dict())
    values = command_line_values(cfg, {n: n for n in COMMON_FLAGS} | flag_fields, fv)
    with cfg.ignore_type():
        for field, (_, value) in values.items():
            cfg[field] = tuple(value) if isinstance(cfg[field], tuple) else value
    return cfg, set(values)


def recorded_config(meta: dict[str, Any]) -> ml_collections.ConfigDict:
    """``default_config()`` with the fields a checkpoint's meta recorded (its training
    config; fields this version does not know are ignored)."""
    cfg = config_lib.default_config()
    with cfg.ignore_type():
        for k, v in meta.get("config", {}).items():
            if k in cfg:
                cfg[k] = tuple(v) if isinstance(cfg[k], tuple) else v
    return cfg


def checkpoint_config(meta: dict[str, Any], flag_fields: dict[str, str],
                      fv: flags.FlagValues = FLAGS) -> ml_collections.ConfigDict:
    """The config of an evaluation of a checkpoint: its recorded config (the ``--config``
    file instead, when one is given), then the command line; ``model_name`` and
    ``num_classes`` are the checkpoint's unless the command line gives them."""
    base = recorded_config(meta) if fv.config is None and "config" in meta else base_config(fv)
    cfg, given = config_from_command_line(base, flag_fields, fv)
    with cfg.ignore_type():
        for key in ("model_name", "num_classes"):
            if key in meta and key not in given:
                cfg[key] = meta[key]
        if "allow_unverified_checkpoint" not in given:
            # Accepting unverified weights is this command's decision, never a recorded one.
            cfg.allow_unverified_checkpoint = False
    if cfg.num_classes <= 0:
        from alp_jax import data

        cfg.num_classes = data.num_classes(cfg.dataset)
    return cfg


def maybe_initialize_distributed(fv: flags.FlagValues = FLAGS) -> None:
    from alp_jax import sharding

    sharding.initialize_distributed(
        fv.coordinator_address, fv.num_processes, fv.process_id,
        auto=fv.multihost, timeout_s=fv.distributed_timeout_s,
        heartbeat_timeout_s=fv.distributed_heartbeat_timeout_s)


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
    # Each rule lives with the module that uses the value; this only calls them.
    from alp_jax import data, model, objectives, pgd, train_state

    data.check_available(cfg.dataset)
    data.check_data_dir(cfg.dataset, data.data_dir(cfg))
    model.check_model(cfg.model_name, dtype=cfg.compute_dtype, conv_impl=cfg.conv_impl)
    check_ranges(cfg, RANGES | (TRAIN_RANGES if training else EVAL_RANGES))
    if training:
        pgd.parse_attack(cfg.train_adv_method)
        objectives.get_objective(cfg)
        train_state.check_optimizer(cfg.optimizer)
        train_state.check_schedule(cfg.lr_schedule, cfg.lr_list, cfg.lr_decay_epochs)
        if not cfg.output_dir:
            raise ValueError("--output_dir is required.")
    else:
        pgd.parse_attack(cfg.adv_method)
        data.check_num_examples(cfg.dataset, cfg.split_name, cfg.num_examples,
                                data.data_dir(cfg))
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


def _resolve_config_args(args: Sequence[str]) -> list[str]:
    """``args`` with each ``--config=V`` / ``--config V`` (also ``-config``) before ``--``
    made ``--config=alp_jax.configs.resolve(V)``: a shipped name becomes its file spelling;
    a name that is neither shipped nor a file is a ``flags.Error``."""
    from alp_jax import configs

    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        m = _CONFIG_GIVEN.match(arg)
        if arg == "--":
            out.extend(args[i:])
            break
        if i == 0 or not m or (m.group(1) != "=" and i + 1 == len(args)):
            out.append(arg)  # the program name, another flag, or a bare --config (absl's)
            i += 1
            continue
        value = arg.split("=", 1)[1] if m.group(1) == "=" else args[i + 1]
        i += 1 if m.group(1) == "=" else 2
        try:
            out.append(f"--config={configs.resolve(value)}")
        except ValueError as e:
            raise flags.Error(f"--config: {e}") from None
    return out


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
    given = _resolve_config_args(given)  # --config=digits_alp: alp_jax/configs/digits.py:alp
    overrides = [(a, m.group(1)) for a in given if (m := _OVERRIDE.match(a))]
    if overrides and not any(_CONFIG_GIVEN.match(a) for a in given):
        raise flags.Error(
            f"{overrides[0][0]} overrides a field of a config file: pass "
            "--config=NAME (a shipped config, e.g. --config=digits_alp) or "
            "--config=path/to/my_config.py before it.")
    try:
        rest = fv(given)
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
                              "shipped configs are named, e.g. --config=digits_alp.") from None
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
                run_dir.OutputDirNotWritable, run_dir.ResumeMismatch) as e:
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
