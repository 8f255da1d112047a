"""The default configuration and the original's ``--hparams`` string.

Every shipped experiment config (``alp_jax/configs/``) starts from ``default_config()``
and overrides a few fields. The hyperparameters keep the original's names and defaults
(model_lib.py), so ``--hparams="train_adv_method=pgdll_16_2_10,train_lp_weight=0.5"``
still works.
"""

from __future__ import annotations

import ast
from typing import TYPE_CHECKING, Any

from alp_jax.errors import ConfigError

if TYPE_CHECKING:  # ml_collections is imported where a ConfigDict is built: HPARAMS and
    import ml_collections  # the parsers import without it (the benchmark's device image)

# The original's hyperparameters (settable through --hparams), with its defaults.
HPARAMS: dict[str, Any] = {
    "batch_size": 32,
    "eval_batch_size": 50,
    "weight_decay": 1e-4,
    "label_smoothing": 0.1,
    "train_adv_method": "clean",
    "train_lp_weight": 0.0,
    "optimizer": "rms",
    "momentum": 0.9,
    "rmsprop_decay": 0.9,
    "rmsprop_epsilon": 1.0,
    "lr_schedule": "exp_decay",
    "learning_rate": 0.045,
    "lr_decay_factor": 0.94,
    "lr_num_epochs_per_decay": 2.0,
    "lr_list": [1.0 / 6, 2.0 / 6, 3.0 / 6, 4.0 / 6, 5.0 / 6, 1.0, 0.1, 0.01, 0.001, 0.0001],
    "lr_decay_epochs": [1, 2, 3, 4, 5, 30, 60, 80, 90],
}


def default_config() -> ml_collections.ConfigDict:
    """All fields a run reads, with the original's defaults."""
    import ml_collections

    c = ml_collections.ConfigDict()
    for k, v in HPARAMS.items():
        c[k] = list(v) if isinstance(v, list) else v
    # Objective (alp = the original's clean / mixed PGD / ALP; more in alp_jax.objectives).
    c.train_objective = "alp"
    c.objective_weight = 0.0  # weight of the clp / lsq / trades term
    # Model.
    c.model_name = "resnet_v2_50"
    c.num_classes = -1  # -1: from the dataset
    c.compute_dtype = "float32"  # or bfloat16 (parameters stay float32)
    c.bn_group_size = 0  # 0: BatchNorm statistics over the global batch
    c.bn_decay = 0.997  # TF-slim's; short CPU demos use less so the statistics settle
    # How convolutions lower (alp_jax.convolution): auto = im2col matmuls on CPU, where XLA's
    # convolution kernels are several times slower, and lax.conv on GPU/TPU.
    c.conv_impl = "auto"
    c.moving_average_decay = 0.9999  # <= 0 disables the moving average
    # Data.
    c.dataset = "digits"  # digits | imagenet | imagenet_tfds | tiny_imagenet
    c.dataset_image_size = 64
    c.imagenet_data_dir = ""
    c.tiny_imagenet_data_dir = ""
    c.examples_per_epoch = -1  # -1: from the dataset
    c.bounds = (-1.0, 1.0)
    # Scale: num_replicas replica batches of batch_size make one global batch, and the
    # learning rate is multiplied by num_replicas, as in the original's sync replicas.
    c.num_replicas = 1
    c.mesh_model_axis = 1  # >1 shards parameters along a second mesh axis
    # Program.
    c.seed = 0
    c.max_steps = -1
    c.output_dir = ""
    c.save_model_steps = 500
    c.save_summaries_steps = 100
    c.log_every_steps = 20
    c.keep_checkpoints = 3
    c.num_summary_images = 4
    c.finetune_checkpoint_path = ""
    c.finetune_exclude_pretrained_scopes = ""
    c.finetune_trainable_scopes = ""
    # Run safety (alp_jax.run_dir, alp_jax.train): stop when the loss exceeds max_loss
    # (0: no ceiling, the default; NaN and infinity always stop), and refuse to resume a
    # run whose recorded config differs unless allow_resume_changes.
    c.max_loss = 0.0
    c.allow_resume_changes = False
    # Load checkpoints that have no checksums (written before checksums existed), with a
    # warning on each load; otherwise they are refused. Never taken from a recorded config.
    c.allow_unverified_checkpoint = False
    # Evaluation.
    c.eval_name = "default"
    c.adv_method = "clean"
    c.split_name = "validation"
    c.num_examples = -1
    c.eval_interval_secs = 120
    # ---- Evaluation engine and robustness (alp_jax.engine, alp_jax.robustness; issue 16) ----
    # Attack randomness is keyed per example: fold_in(PRNGKey(attack_seed), spec, index).
    c.attack_seed = 0
    # alp_jax.eval drops the last partial batch as the original did; False pads and masks
    # it so every example counts (alp_jax.robustness always counts every example).
    c.eval_drop_remainder = True
    c.robustness_attacks = ("pgdll_16_2_10,pgdtrue_16_2_20_r5,apgdce_16_100,apgddlr_16_100,"
                            "square_16_1000")  # comma-separated specs, each run at every eps
    c.robustness_eps = "2,4,8,16"  # comma-separated integers on the 0..255 scale
    c.robustness_large_eps_attack = "apgdce_128_50"  # masking check: must fool ~everything
    c.robustness_num_images = 8  # examples shown in adversarial_examples.png
    # ---- end of the evaluation block ----
    return c


def resolve_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy with the fields left to the dataset filled in: ``num_classes`` and
    ``examples_per_epoch`` (-1: from ``cfg.dataset``)."""
    import ml_collections

    from alp_jax import data

    cfg = ml_collections.ConfigDict(cfg.to_dict())
    if cfg.num_classes <= 0:
        cfg.num_classes = data.num_classes(cfg.dataset)
    if cfg.examples_per_epoch <= 0:
        cfg.examples_per_epoch = data.num_examples(cfg.dataset, "train", data.data_dir(cfg))
    return cfg


def _coerce(name: str, text: str, current: Any) -> Any:
    """Parses ``text`` into the type of the current value, with a clear error."""
    try:
        if isinstance(current, bool):
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, (list, tuple)):
            value = ast.literal_eval(text.replace(";", ","))
            value = list(value) if isinstance(value, (list, tuple)) else [value]
            return [float(x) for x in value]
        return text
    except (ValueError, SyntaxError):
        raise ConfigError(
            f"hparam {name}={text!r}: expected a {type(current).__name__} "
            f"(current value {current!r}).") from None


def parse_hparams(text: str) -> dict[str, str]:
    """``'a=1,b=x'`` -> ``{'a': '1', 'b': 'x'}``; list values use ``;`` or brackets."""
    out: dict[str, str] = {}
    text = text.strip()
    depth, buf, parts = 0, "", []
    for ch in text:  # split on commas outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(buf)
            buf = ""
        else:
            buf += ch
    if buf:
        parts.append(buf)
    for part in parts:
        if not part.strip():
            continue
        if "=" not in part:
            raise ConfigError(f"hparams entry {part!r} is not of the form name=value.")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_hparams_values(config: ml_collections.ConfigDict, text: str) -> dict[str, Any]:
    """``{name: value}`` of an original-style ``--hparams`` string, each value parsed as
    the type of ``config``'s field; ConfigError for an unknown name or a bad value."""
    out = {}
    for name, value in parse_hparams(text).items():
        if name not in HPARAMS:
            raise ConfigError(f"Unknown hparam {name!r}; valid names: {', '.join(HPARAMS)}.")
        out[name] = _coerce(name, value, config[name])
    return out


def apply_hparams(config: ml_collections.ConfigDict, text: str) -> ml_collections.ConfigDict:
    """Layers an original-style ``--hparams`` string onto ``config`` (in place)."""
    values = parse_hparams_values(config, text)
    with config.ignore_type():
        for name, value in values.items():
            config[name] = value
    return config
