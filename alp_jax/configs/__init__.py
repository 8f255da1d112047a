"""The shipped experiment configs: a few families, each with every objective variant.

A family module (``digits``, ``imagenet64``, ``tiny_imagenet``) sets its data, model and
schedule on ``alp_jax.config.default_config()``; ``get_config(variant)`` then applies one
row of ``VARIANTS``, the objective table every family shares. The shipped names are
``FAMILY_VARIANT`` (``NAMES``: ``digits_alp``, ``tiny_imagenet_trades``, ...), which the
programs take as ``--config=digits_alp``; ml_collections' file spelling of the same config
is ``--config=alp_jax/configs/digits.py:alp`` (``resolve`` turns a name into it), and
``--config=path/to/my_config.py`` loads a config file of your own.

The variants (the fields each sets on its family's baseline are ``VARIANTS[variant]``):

- ``baseline``: the family as it is, clean training.
- ``alp``: mixed minibatches of clean and ``pgdll_16_2_10`` examples with a logit-pairing
  weight of 0.5 (the paper's ImageNet recipe, the original README's commands).
- ``clp``: clean logit pairing (ALP paper, Sec. 4.2): clean images only plus 0.5 * the mean
  squared difference of the logits of random pairs of clean examples.
- ``lsq``: logit squeezing (ALP paper, Sec. 4.3): clean images only plus 0.05 * the mean
  squared logit.
- ``trades``: TRADES (Zhang et al. 2019): each step crafts examples that maximise
  KL(clean || adversarial) with 10 signed steps of 2/255 in the 16/255 ball, and trains on
  clean cross-entropy + 6 * that KL (TRADES' beta for CIFAR-10).

This module imports without ml_collections; building a config needs it.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ml_collections

FAMILIES = ("digits", "imagenet64", "tiny_imagenet")
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "alp": {"train_adv_method": "pgdll_16_2_10", "train_lp_weight": 0.5},
    "clp": {"train_objective": "clp", "objective_weight": 0.5},
    "lsq": {"train_objective": "lsq", "objective_weight": 0.05},
    "trades": {"train_objective": "trades", "train_adv_method": "pgd_16_2_10",
               "objective_weight": 6.0},
}
NAMES: tuple[str, ...] = tuple(f"{f}_{v}" for f in FAMILIES for v in VARIANTS)
DIR = os.path.dirname(os.path.abspath(__file__))


def with_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
    """Sets ``VARIANTS[variant]``'s fields on a family's baseline ``config`` (in place)."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown config variant {variant!r}; valid: {', '.join(VARIANTS)}.")
    for field, value in VARIANTS[variant].items():
        config[field] = value
    return config


def _split(name: str) -> tuple[str, str]:
    """``'tiny_imagenet_alp'`` -> ``('tiny_imagenet', 'alp')``."""
    if name not in NAMES:
        raise ValueError(f"Unknown config {name!r}; the shipped configs: {', '.join(NAMES)}.")
    family, variant = name.rsplit("_", 1)
    return family, variant


def get_config(name: str) -> ml_collections.ConfigDict:
    """The shipped config ``name`` (one of ``NAMES``, e.g. ``'digits_alp'``)."""
    family, variant = _split(name)
    return importlib.import_module(f"{__name__}.{family}").get_config(variant)


def file_spelling(name: str) -> str:
    """ml_collections' spelling of the shipped config ``name``: ``'/abs/.../digits.py:alp'``."""
    family, variant = _split(name)
    return f"{os.path.join(DIR, family + '.py')}:{variant}"


def resolve(arg: str) -> str:
    """A ``--config`` value as ml_collections loads it.

    A shipped name (``digits_alp``) becomes its file spelling (``file_spelling``); the path
    of an existing file, optionally with ``:arg`` for its ``get_config``, is returned as it
    is (a shipped family's file with an unknown variant is a ValueError too). Anything else
    raises ValueError naming the value and the shipped names.
    """
    if arg in NAMES:
        return file_spelling(arg)
    if os.path.isfile(arg):
        return arg
    path, _, variant = arg.partition(":")
    if os.path.isfile(path):
        family = os.path.splitext(os.path.basename(path))[0]
        if (variant and variant not in VARIANTS and family in FAMILIES
                and os.path.samefile(os.path.dirname(os.path.abspath(path)), DIR)):
            raise ValueError(f"{arg!r}: unknown variant {variant!r} of the family {family}; "
                             f"valid: {', '.join(VARIANTS)}.")
        return arg
    shipped = ", ".join(NAMES)
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in NAMES:  # the spelling of the files of the old top-level configs/ directory
        raise ValueError(
            f"{arg!r} is not a file: the shipped configs are now named, e.g. --config={stem} "
            f"(file spelling: alp_jax/configs/{stem.rsplit('_', 1)[0]}.py:"
            f"{stem.rsplit('_', 1)[1]}); the shipped configs: {shipped}.")
    raise ValueError(
        f"{arg!r} is neither a shipped config nor an existing file; the shipped configs: "
        f"{shipped}; or pass the path of your own config file (--config=path/to/my_config.py).")
