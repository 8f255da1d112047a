"""Fine-tuning initialisation: pretrained values for all but the excluded scopes."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from alp_jax import checkpoints, slim_names


def finetune_variables(fresh: dict[str, Any], checkpoint_path: str, *,
                       exclude_scopes: str | list[str] = "",
                       trainable_scopes: str | list[str] = "",
                       use_ema: bool = False,
                       allow_unverified: bool = False) -> dict[str, Any]:
    """``fresh`` variables with every variable outside ``exclude_scopes`` loaded.

    Excluded variables keep their fresh initialisation. With ``use_ema`` (and moving
    averages in the checkpoint; else the raw values, with a warning) the original's rule
    applies (``_get_finetuning_init_fn``): the parameters that train in the new run (under
    ``trainable_scopes``, or all when none are given) take their moving averages; frozen
    parameters and the BatchNorm statistics, which are never trainable, take their raw
    values. A scope that matches no variable, a variable the checkpoint lacks, or a shape
    that differs raises a ValueError naming them. A checkpoint without checksums is
    refused (CheckpointUnverified) unless ``allow_unverified``.
    """
    names = slim_names.slim_names(fresh)
    exclude = slim_names.parse_scopes(exclude_scopes)
    slim_names.check_scopes(exclude, names, "--finetune_exclude_pretrained_scopes")
    slim_names.check_scopes(slim_names.parse_scopes(trainable_scopes), names,
                            "--finetune_trainable_scopes")
    raw, _, step_dir = checkpoints.load_raw(checkpoint_path,
                                            allow_unverified=allow_unverified)
    if use_ema and raw.get("ema_params") is None:
        logging.warning("Checkpoint %s has no moving averages; loading its raw values.",
                        step_dir)
        use_ema = False
    named = slim_names.variables_to_slim(checkpoints.variables_from_tree(raw, step_dir))
    if use_ema:
        averaged = slim_names.variables_to_slim(
            checkpoints.variables_from_tree(raw, step_dir, use_ema=True))
        trainable = slim_names.parse_scopes(trainable_scopes)
        for name in slim_names.slim_names({"params": fresh["params"]}):
            if name in averaged and (not trainable or slim_names.in_scopes(name, trainable)):
                named[name] = averaged[name]
    fresh_named = slim_names.variables_to_slim(fresh)
    wanted = [n for n in names if not slim_names.in_scopes(n, exclude)]
    missing = [n for n in wanted if n not in named]
    mismatched = [f"{n}: checkpoint {named[n].shape} vs model {fresh_named[n].shape}"
                  for n in wanted if n in named and named[n].shape != fresh_named[n].shape]
    if missing or mismatched:
        lines = []
        if mismatched:
            lines.append("shapes differ (exclude these scopes with "
                         "--finetune_exclude_pretrained_scopes):\n  " + "\n  ".join(mismatched))
        if missing:
            shown = missing[:20] + (["..."] if len(missing) > 20 else [])
            lines.append(f"{len(missing)} variables missing from the checkpoint:\n  "
                         + "\n  ".join(shown))
        raise ValueError(f"Cannot fine-tune from {step_dir!r}: " + "\n".join(lines))
    merged = {n: (named[n] if n in wanted else np.asarray(fresh_named[n])) for n in names}
    logging.info("Fine-tuning from %s: %d variables loaded, %d kept fresh (%s).", step_dir,
                 len(wanted), len(names) - len(wanted), ", ".join(exclude) or "none")
    return slim_names.variables_from_slim(merged, fresh)
